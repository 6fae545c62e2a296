"""The `lmclean` command: record a training trajectory, inspect it, unlearn samples, audit it."""

from __future__ import annotations

import typer

from lmclean import __version__
from lmclean.cli import audit, export, inspect_log, reconcile, record, request, unlearn
from lmclean.cli._app import PolishedHelp
from lmclean.cli._options import OneLineErrors
from lmclean.cli import eval as eval_cmd
from lmclean.cli import check as check_cmd


class _Root(PolishedHelp, OneLineErrors):
    """The `lmclean` group: one-line usage errors, and help that reads as written."""


app = typer.Typer(
    name="lmclean",
    help=(
        "Online unlearning for language models.\n\n"
        "1. `lmclean record` trains a causal LM and records its trajectory into a Zarr store.\n"
        "2. `lmclean inspect-log STORE` shows what the store holds.\n"
        "3. `lmclean unlearn STORE --forget IDS` removes samples' influence and writes a new model.\n"
        "4. `lmclean audit show|verify STORE` proves what was done."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Root,  # bad option values: one `error:` line and exit 1, like every other error
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmclean {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit.")) -> None:
    """Online unlearning for language models."""


# Every command, registered statically: a renamed module fails here, loudly. The command modules
# import torch, transformers and the engine inside their functions, so `--help` starts in well under a second.
app.command("record")(record.record)
app.command("inspect-log")(inspect_log.inspect_log)
app.command("unlearn")(unlearn.unlearn)
app.command("request")(request.request)
app.add_typer(audit.audit_app, name="audit")
app.command("eval")(eval_cmd.eval_models)
app.command("export")(export.export)
app.command("check")(check_cmd.check)
app.command("reconcile")(reconcile.reconcile)


if __name__ == "__main__":
    app()
