"""`lmclean eval`: forget / retain loss, membership inference, distance to retraining and TOFU metrics,
for several models side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from lmclean.cli._app import err, handle_errors, out, print_json, progress_bar
from lmclean.cli._options import DEVICE_HELP, device_spec
from lmclean.errors import ConfigError


# (key, label, how to read it); rows appear when some model has the key
METRIC_ROWS: list[tuple[str, str, str]] = [
    ("forget_loss", "forget loss", "token NLL; unlearning raises it toward the reference"),
    ("forget_ppl", "forget perplexity", "exp(forget loss)"),
    ("retain_loss", "retain loss", "lower = better kept"),
    ("retain_ppl", "retain perplexity", "exp(retain loss)"),
    ("mia_auc_loss", "MIA AUC, LOSS", "0.5 = forget rows look unseen; compare with the reference"),
    ("mia_auc_zlib", "MIA AUC, zlib", "as above"),
    ("mia_auc_min_k", "MIA AUC, Min-K% (k=0.2)", "as above"),
    ("privleak", "PrivLeak (Min-K%)", "(AUC - AUC_ref) / AUC_ref; 0 = like retraining"),
    ("residual_ratio", "residual ratio", "‖θ-θ_ref‖/‖θ_orig-θ_ref‖; 0 = retrained, 1 = original"),
    ("distance_to_reference", "‖θ - θ_ref‖", "parameter distance to the reference"),
    ("kl_forget", "KL to reference, forget", "mean token KL(model‖ref); lower = closer"),
    ("kl_retain", "KL to reference, retain", "mean token KL(model‖ref); lower = closer"),
    ("truth_ratio_forget", "TOFU truth ratio, forget", "mean min(R, 1/R)"),
    ("forget_probability", "TOFU probability, forget", "P(answer)^(1/len); lower = forgotten"),
    ("forget_rouge_l_recall", "TOFU ROUGE-L, forget", "greedy answer recall; lower = forgotten"),
    ("forget_quality", "TOFU forget quality", "KS p-value vs reference: HIGHER = closer to retraining"),
    ("model_utility", "TOFU model utility", "harmonic mean of the 9 below; higher = better"),
    ("retain_probability", "  retain probability", "higher = better"),
    ("retain_rouge_l_recall", "  retain ROUGE-L", "higher = better"),
    ("retain_truth_ratio", "  retain truth ratio", "mean max(0, 1-R); higher = better"),
    ("real_authors_probability", "  real authors probability", "higher = better"),
    ("real_authors_rouge_l_recall", "  real authors ROUGE-L", "higher = better"),
    ("real_authors_truth_ratio", "  real authors truth ratio", "higher = better"),
    ("world_facts_probability", "  world facts probability", "higher = better"),
    ("world_facts_rouge_l_recall", "  world facts ROUGE-L", "higher = better"),
    ("world_facts_truth_ratio", "  world facts truth ratio", "higher = better"),
]


def _quiet_transformers() -> None:
    """Our progress bar replaces Transformers' per-model loading bars and notices on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@handle_errors
def eval_models(
    models: Annotated[list[str], typer.Argument(help="Hugging Face model directories, as DIR or NAME=DIR. The first is the original model unless --original is given.", metavar="MODEL...", show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", help="JSON Lines file the models were recorded on (default with --tofu: TOFU's full.jsonl).")] = None,
    forget: Annotated[str, typer.Option("--forget", help="Forget ids: 3,5,60-79 or @file. With --tofu, a TOFU forget split (3960-3999, 3800-3999 or 3600-3999).")] = "",
    retain: Annotated[Optional[str], typer.Option("--retain", help="Retain ids (default: every id of --data not in --forget).")] = None,
    holdout: Annotated[Optional[Path], typer.Option("--holdout", help="JSON Lines rows no model saw: the non-members of membership inference (default with --tofu: the matching holdout split).")] = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Model retrained without the forget set (`lmclean record --exclude`): enables privleak, residual ratio, KL and forget quality.")] = None,
    original: Annotated[Optional[str], typer.Option("--original", help="The model before unlearning, for the residual ratio (default: the first MODEL).")] = None,
    tofu_dir: Annotated[Optional[Path], typer.Option("--tofu", help="A folder in the TOFU release's layout: adds truth ratio, forget quality and model utility.")] = None,
    template: Annotated[Optional[str], typer.Option("--template", help="Row template used when recording (a typed \\n is a newline); with {answer} the loss is on the answer given the text before it.", show_default=r"Q: {question}\nA: {answer}, the record default")] = None,
    id_field: Annotated[str, typer.Option("--id-field", help="Row field holding the sample id ('' = the row number).")] = "id",
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="`byte` or a tokenizer directory (default: each model directory's own).")] = None,
    generate: Annotated[int, typer.Option("--generate", min=0, help="Greedy answers to show for the first N forget and the first N retain questions (0 = none).")] = 3,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Token limit of greedy answers (generation samples and TOFU ROUGE).")] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")] = 16,
    device: Annotated[str, typer.Option("--device", callback=device_spec, help=f"Where to run the models: {DEVICE_HELP}")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout instead of tables.")] = False,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Also write the JSON report to this file (must be new, or pass --overwrite).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
) -> None:
    """Evaluate unlearning: several models side by side on forget / retain / holdout data.

    Metrics are rows, models are columns. forget_quality (with --tofu and --reference) is a p-value: HIGHER means closer to the retrained reference.
    """
    # torch, transformers, scipy: loaded here, not at import, so `--help` stays fast
    from lmclean.eval.models import model_specs
    from lmclean.eval.report import evaluate
    from lmclean.eval.sets import DEFAULT_DATA_TEMPLATE, prepare
    from lmclean.train.data import parse_id_spec

    if not forget:
        raise ConfigError("--forget is required: ids, ranges like 60-79, or @file")
    if out_file is not None:
        from lmclean.paths import check_output

        check_output(out_file, overwrite=overwrite, kind="file")  # before any work
    from lmclean.device import resolve_device

    device = str(resolve_device(device))  # an absent device: refused before any work
    if data is None:
        if tofu_dir is None:
            raise ConfigError("--data is required: the JSON Lines file the models were recorded on")
        data = tofu_dir / "full.jsonl"
    _quiet_transformers()
    specs, (ref_spec, orig_spec) = model_specs(models, [reference, original])
    sets = prepare(data, parse_id_spec(forget), parse_id_spec(retain) if retain else None, holdout,
                   (template or DEFAULT_DATA_TEMPLATE).replace("\\n", "\n"), id_field or None, tofu_dir)  # fmt: skip
    with progress_bar("eval", total=1, fields="{task.fields[stage]}") as advance:

        def progress(label: str, done: int, total: int) -> None:
            advance(0, stage=label, total=total, completed=done)

        report = evaluate(specs, sets, reference=ref_spec, original=orig_spec, n_generate=generate,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                          device=device, progress=progress)  # fmt: skip
    if out_file is not None:
        from lmclean.store.atomic import atomic_write_bytes

        out_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_file, (json.dumps(report, indent=2, default=str) + "\n").encode())
        err.print(f"[green]wrote[/] {out_file}")
    if json_out:
        print_json(report)
        return
    render(report)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def render(report: dict[str, Any]) -> None:
    """The metrics table (rows = metrics, columns = models), the generation samples and the notes."""
    names = list(report["models"])
    ref = report.get("reference")
    holdout = report["holdout"]
    extra = f", {holdout['n']} holdout" if holdout else ""
    title = (f"lmclean eval: {report['forget']['n']} forget rows ({report['forget']['ids']}), "
             f"{report['retain']['n']} retain{extra}; scored: {report['scored']}")
    table = Table(title=title, title_justify="left")
    table.add_column("metric", style="bold cyan")
    for name in names:
        label = f"{name}\n(original)" if name == report.get("original") else name
        table.add_column(escape(f"{label}\n(reference)" if name == ref else label), justify="right")
    inline = out.width >= 70 + 13 * len(names)  # else the explanations go below the table, unwrapped
    if inline:
        table.add_column("how to read", style="dim")
    shown = [(label, how) for key, label, how in METRIC_ROWS if any(report["models"][n].get(key) is not None for n in names)]
    for key, label, how in METRIC_ROWS:
        values = [report["models"][n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        table.add_row(label, *(_fmt(v) for v in values), *([how] if inline else []))
    out.print(table)
    if not inline:
        for label, how in shown:
            out.print(f"  [bold cyan]{escape(label.strip())}[/]: [dim]{escape(how)}[/]")
    forgotten, kept = report["generations"], report.get("retain_generations") or []
    if forgotten or kept:
        gen = Table(title="greedy answers to forget questions, then to kept ones (✓ = the training answer)",
                    title_justify="left")
        gen.add_column("question / training answer", style="bold")
        for name in names:
            gen.add_column(escape(name))
        for heading, rows in (("forgotten", forgotten), ("kept", kept)):
            if rows:
                gen.add_section()
                gen.add_row(f"[italic]{heading}[/]", *("" for _ in names))
            for g in rows:
                gold = (g["answer"] or "").strip()
                head = escape(f"[{g['id']}] {' '.join((g['prompt'] or '').split())}")
                gen.add_row(f"{head}\n[dim]{escape(gold)}[/]",
                            *(escape(o) + (" ✓" if o.strip() == gold else "") for o in (g["outputs"][n] for n in names)))
        out.print(gen)
    for note in report["notes"]:
        out.print(f"note: {escape(note)}")
