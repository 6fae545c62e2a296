"""`lmclean inspect-log`: what a trajectory store holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from lmclean.cli._app import handle_errors, on_store, out, print_json
from lmclean.errors import DataError


@handle_errors
@on_store("inspect-log")
def inspect_log(
    store: Annotated[Path, typer.Argument(help="Store directory written by `lmclean record`.")],
    sample: Annotated[Optional[int], typer.Option("--sample", min=0, help="Show the steps and batch positions where this sample id was seen.")] = None,
    step: Annotated[Optional[int], typer.Option("--step", min=0, help="Show one step: lr, loss, gradient norm, sample ids.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print everything as JSON on stdout.")] = False,
) -> None:
    """Summarise a store: model, steps, schedule, checkpoints, samples, bytes and compression."""
    from lmclean.store.scrub import pending_scrub, tombstones  # zarr and torch: imported when the command runs
    from lmclean.store.reader import TrajectoryStore
    from lmclean.store.summary import sample_report, step_report, summarize

    s = TrajectoryStore(store)
    data: dict[str, Any] = summarize(s)
    if sample is not None:
        if sample not in s.sample_fingerprints:
            raise DataError(f"sample id {sample} is not in store {store}; list ids with `lmclean inspect-log {store} --json`")
        data["sample"] = sample_report(s, sample)
    if step is not None:
        data["step"] = step_report(s, step)
    data["tombstones"] = {str(i): seq for i, seq in sorted(tombstones(s.path).items())}
    data["history"] = _history(s.path)
    data["scrub_pending"] = pending_scrub(s.path) is not None
    if sample is not None and str(sample) in data["tombstones"]:
        data["sample"]["tombstoned_by_audit_record"] = data["tombstones"][str(sample)]
    if json_out:
        print_json(data)
        return
    _render(data)


def _render(d: dict[str, Any]) -> None:
    m, st, b = d["model"], d["steps"], d["bytes"]
    table = Table(title=f"lmclean store {d['store']}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    opt = d["optimizer"]
    opt_text = ", ".join(f"{k}={v}" for k, v in opt.items() if k != "name")
    rows = [
        ("format", f"v{d['format_version']} (lmclean {d['lmclean_version']}), created {d['created']}"),
        ("model", f"{m['model_type']} hidden {m['hidden_size']} layers {m['layers']}: {m['parameters']:,} parameters in {m['tensors']} tensors"
                  + (f" ({m['kind']}: only these are recorded; frozen base {escape(str(m['base']))})" if m.get("kind", "full") != "full" else "")),
        ("optimizer", f"{opt['name']} ({opt_text}), schedule {d['schedule']}"),
        ("steps", f"{st['committed']} committed of {st['planned']} planned ({'complete' if st['closed'] else 'incomplete: resume with record --resume'}), "
                  f"{st['epochs']} epochs, batch {st['batch_size']}"),
        ("lr", f"{d['lr']['min']:.3g} .. {d['lr']['max']:.3g}" if d["lr"]["min"] is not None else "-"),
        ("loss", f"{d['loss']['first']:.4f} -> {d['loss']['last']:.4f}  {d['loss']['sparkline']}" if d["loss"]["first"] is not None else "-"),
        ("checkpoints", f"{len(d['checkpoints'])} at steps {_short(d['checkpoints'])}"),
        ("window", _window_text(d["window"], st["committed"])),
        ("samples", f"{d['samples']['in_dataset']} in data set, {d['samples']['seen']} seen, {d['samples']['excluded']} excluded"),
        ("gradients", "none stored (gradients: recompute): recomputed from the stored batches when θ is rebuilt"
         if d.get("gradients") == "recompute" else
         f"{d['precision']} / {d['codec']}: {b['gradients_on_disk'] / 1e6:.1f} MB on disk vs {b['gradients_raw_fp32'] / 1e6:.1f} MB raw fp32 "
         f"= {b['compression_vs_fp32']}x, {b['bytes_per_param_per_step']} bytes/param/step"),
        ("on disk", f"{b['on_disk'] / 1e6:.1f} MB in total"),
        ("scrubbed", _tombstone_text(d)),
        *_history_rows(d["history"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    if "sample" in d:
        occ = d["sample"]["occurrences"]
        out.print(f"sample {d['sample']['sample_id']} (fingerprint {str(d['sample']['fingerprint'])[:16]}…) seen {len(occ)} times: "
                  + ", ".join(f"step {o['step']} pos {o['position']}" for o in occ))
        if "tombstoned_by_audit_record" in d["sample"]:
            out.print(f"  unlearned and scrubbed by audit record {d['sample']['tombstoned_by_audit_record']}: its tokens are gone from the store")
    if "step" in d:
        s = d["step"]
        out.print(f"step {s['step']}: lr {s['lr']:.4g}, loss {s['loss']:.4f}, |g| {s['grad_norm']:.4g}, "
                  f"{s['tokens']} tokens, samples {s['sample_ids']}")


def _history(store: Path) -> dict[str, Any]:
    """The current model, its chain and every forgotten sample, from the audit log."""
    from lmclean.audit.history import load_history
    from lmclean.errors import AuditError

    try:
        return load_history(store).to_dict()
    except AuditError as exc:
        return {"problem": str(exc)}


def _history_rows(h: dict[str, Any]) -> list[tuple[str, str]]:
    if "problem" in h:
        return [("current model", f"[red]unknown[/]: {escape(h['problem'])}")]
    chain = [c for c in h["chain"] if c["kind"] == "unlearn"]
    lineage = " -> ".join(["recorded"] + [f"{c['request_id']} ({c['method']})" for c in chain])
    forgotten = h["forgotten_ids"]
    kept = set(h["kept_data_ids"])
    ids = ", ".join(f"{i}{' (data kept)' if i in kept else ''}" for i in forgotten[:8]) + (", …" if len(forgotten) > 8 else "")
    return [("current model", f"{escape(h['current_model'])}: {lineage}"),
            ("forgotten", f"{len(forgotten)} samples: {ids}" if forgotten else "none")]


def _tombstone_text(d: dict[str, Any]) -> str:
    tomb = d.get("tombstones", {})
    if not tomb:
        text = "no samples unlearned and scrubbed"
    else:
        ids = ", ".join(f"{i} (audit record {seq})" for i, seq in list(tomb.items())[:6])
        text = f"{len(tomb)} samples tombstoned, tokens overwritten: {ids}{', …' if len(tomb) > 6 else ''}"
    return text + ("; [yellow]a scrub is pending[/]: the next unlearn or record --resume finishes it" if d.get("scrub_pending") else "")


def _window_text(w: dict[str, Any], committed: int) -> str:
    if w["keep_steps"] is None:
        return "every step kept"
    return (f"keep_steps {w['keep_steps']}: gradients and θ of steps {w['retained_from']}..{committed - 1} kept; "
            f"steps before {w['retained_from']} keep their batches only (unlearning them needs --outside-window carry)")


def _short(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 8 else ", ".join(map(str, values[:4])) + ", …, " + ", ".join(map(str, values[-2:]))
