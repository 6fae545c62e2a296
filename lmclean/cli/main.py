"""The `lmclean` command: record a training trajectory, inspect it, unlearn samples, audit it."""

from __future__ import annotations

import typer

from lmclean import __version__
from lmclean.cli import export, inspect_log, record

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
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmclean {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit.")) -> None:
    """Online unlearning for language models."""


app.command("record")(record.record)
app.command("inspect-log")(inspect_log.inspect_log)
app.command("export")(export.export)

for _name in ("unlearn", "audit", "eval"):
    try:  # later commands register themselves when their module exists
        module = __import__(f"lmclean.cli.{_name}", fromlist=["register"])
        module.register(app)
    except ModuleNotFoundError as exc:
        if exc.name != f"lmclean.cli.{_name}":
            raise


if __name__ == "__main__":
    app()
