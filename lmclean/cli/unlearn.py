"""`lmclean unlearn`: remove samples' (or steps') influence from a recorded model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from lmclean.errors import ConfigError
from lmclean.cli._app import err, handle_errors, on_store, print_json, progress_bar
from lmclean.cli._quality import auto_lines, quality_lines
from lmclean.cli._options import DEVICE_HELP, Curvature, CurvatureBatch, Level, Method, OnDivergence, Tail, budget_spec, check_unlearn_options, device_spec, unit_fraction


@handle_errors
@on_store("unlearn", lambda a: "read" if a.get("dry_run") else "write")
def unlearn(
    store: Annotated[Path, typer.Argument(help="Store directory written by `lmclean record`.")],
    forget: Annotated[Optional[str], typer.Option(help="Sample ids to forget: 3,5,60-79 or @file (one id per line).")] = None,
    forget_data: Annotated[Optional[Path], typer.Option(help="JSON Lines rows to forget, matched to recorded samples by their token fingerprint.")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Forget whole recorded steps, e.g. 12,40 (implies --level batch).")] = None,
    level: Annotated[Level, typer.Option(help="sample: remove each forget sample's own terms; batch: remove every step that contains one, whole.")] = "sample",
    method: Annotated[Method, typer.Option(help="lmcleaner (propagate through recorded curvature), rollback (no propagation), replay (exact re-run), or auto (the lowest expected residual within --budget, from the shipped benchmark table).")] = "lmcleaner",
    budget: Annotated[Optional[str], typer.Option(callback=budget_spec, help="--method auto: the most it may cost, in training steps (200, 200steps) or seconds (90s, converted with the store's recorded step time). Default: exact replay's cost.")] = None,
    check_steps: Annotated[int, typer.Option(min=0, help="Quality spot check: at this many sampled steps run one exact counterfactual step from the method's state and report the defect ratio (0 exact, 1 did nothing); 0 disables.")] = 3,
    K: Annotated[Optional[int], typer.Option("--K", min=0, help="Steps to propagate (or replay) past the last affected step; the rest is carried unchanged. Default: 800 for lmcleaner, to the end for replay.")] = None,
    hvp: Annotated[Curvature, typer.Option(help="Curvature for lmcleaner (residual to exact retraining on TOFU forget01, cost as a multiple of exact replay; benchmarks/README.md): ggn (Gauss-Newton at every step, PSD, default; 0.214 at ~2.5x), exact (Hessian), krylov (the anchor's GGN on the Krylov space of the propagated correction: a --krylov-dim space every --refresh steps; 0.276 at ~0.25x with its defaults, 0.24-0.25 at ~0.35-0.4x with --refresh 8). Experimental, worse than doing nothing (residual > 1): kfac 1.31 / ekfac 1.24 (Kronecker-factored GGN reused for --refresh 10 steps, ~0.2x), diag 1.78, lowrank 2.02, fisher 2.17. Experimental, better than nothing but short of krylov: ekfac-rq (EK-FAC rescaled along the correction by one exact GGN product per anchor) 0.711 at --refresh 10 (0.44x), 0.731 at --refresh 50 (0.22x).")] = "ggn",
    damping: Annotated[float, typer.Option(min=0.0, help="Add damping·I to the curvature: more stable, slightly biased.")] = 1e-4,
    on_divergence: Annotated[OnDivergence, typer.Option(help="When ‖v‖ blows up: stop (error naming the step) or damp (raise damping and retry).")] = "stop",
    curvature_batch: Annotated[CurvatureBatch, typer.Option(help="retained (default): curvature of the batch without the forget set (exact for quadratics; closer to retraining on TOFU forget01: ggn residual 0.214 vs 0.239); full: the recorded batch (exactly linear in requests: sequential requests compose exactly, with ggn; krylov builds its space from the correction and composes to 4-10% on TOFU).")] = "retained",
    tail: Annotated[Tail, typer.Option(help="Past the K window: carry the correction unchanged (paper), or keep propagating it with a cheap reused curvature (ekfac: best measured with --K 20, residual 1.017 vs 1.091 on the early scenario).")] = "carry",
    stabilize: Annotated[bool, typer.Option(help="Clip curvature steps where η·λ > 2 so the propagation stays non-expansive (PSD curvature only).")] = True,
    rank: Annotated[int, typer.Option(min=1, help="lowrank: eigenpairs per anchor step.")] = 8,
    refresh: Annotated[Optional[int], typer.Option(min=1, help="krylov/kfac/ekfac/ekfac-rq/lowrank/diag: reuse an anchor's curvature for this many steps. Default: 16 for krylov, 100 for the others.")] = None,
    krylov_dim: Annotated[int, typer.Option(min=1, help="krylov: the Krylov space's dimension per anchor (that many minus one exact GGN products, and one quadratic form).")] = 4,
    curvature_fraction: Annotated[float, typer.Option(callback=unit_fraction, help="ggn/exact: take each step's curvature product on a random share of its batch (weights rescaled): about that share of the cost, noisier.")] = 1.0,
    anchor_fraction: Annotated[float, typer.Option(callback=unit_fraction, help="krylov/kfac/ekfac/ekfac-rq/lowrank/diag: share of the anchor step's batch the curvature estimate uses (1 = all; 0.5 halves its cost).")] = 0.5,
    fraction: Annotated[Optional[float], typer.Option(callback=unit_fraction, help="replay: estimate the gradient change on this fraction of each batch (control variate).")] = None,
    noise: Annotated[float, typer.Option(min=0.0, help="Add Gaussian noise N(0, σ²) to the unlearned weights.")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed for noise, subsets and random probes.")] = 0,
    device: Annotated[str, typer.Option("--device", callback=device_spec, help=f"Where the sweep runs: {DEVICE_HELP} The report records it, and the drift of recomputed gradients against the stored ones.")] = "auto",
    base: Annotated[Optional[Path], typer.Option(help="Apply the correction to this model directory instead of the store's current model (the latest unlearning's output, else the recorded final model); it must hold a model of the store's chain.")] = None,
    base_unrelated: Annotated[bool, typer.Option(help="Accept a --base that is not the store's current model (the audit log records it, and verify reports the broken lineage).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output model directory (default: <store>-unlearned-N next to the store); must be new or empty.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty --out directory (never a store or a directory holding one).")] = False,
    merge: Annotated[bool, typer.Option(help="LoRA stores: write the merged full model (base + adapter; the adapter is kept in its adapter/ folder) instead of the adapter directory.")] = False,
    request_id: Annotated[Optional[str], typer.Option(help="Your id for this deletion request (recorded in the audit log; default: generated).")] = None,
    reason: Annotated[Optional[str], typer.Option(help="Why, for the audit log (e.g. 'GDPR art. 17 request').")] = None,
    requested_by: Annotated[Optional[str], typer.Option(help="Who asked, for the audit log.")] = None,
    keep_data: Annotated[bool, typer.Option(help="Keep the forgotten samples' tokens in the store (default: scrub them; the audit record says which).")] = False,
    outside_window: Annotated[Literal["refuse", "carry"], typer.Option(help="A store recorded with record.keep_steps keeps θ only for its last steps: a sample seen before that window is refused (refuse), or its in-window occurrences are corrected and the earlier ones left as they are (carry; the report and audit record list them).")] = "refuse",
    exact_states: Annotated[bool, typer.Option(help="Rebuild θ[t] by recomputing each step's gradient from its stored batch instead of from the stored rows: exact for lossy stores (precision bf16/int8), one forward+backward per replayed step.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the plan (steps touched, products needed, time estimate) and exit.")] = False,
    pending: Annotated[bool, typer.Option("--pending", help="Apply every request queued with `lmclean request` (in one sweep: their union); each is marked applied, or refused with the reason.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Make the store's current model forget samples, and write the unlearned model.

    Starts from the store's current model (its latest unlearning's output, else the recorded final
    model), so requests compose. LMCleaner injects each forget sample's recorded update at every step
    it was seen and propagates it through the following steps with curvature products taken at the
    recorded parameters; replay re-runs training without every sample forgotten so far.
    """
    check_unlearn_options()  # option combinations that cannot work: refused before any work, --dry-run too
    from lmclean.unlearn.lmcleaner import PropagationSettings
    from lmclean.unlearn.operators import OperatorSettings
    from lmclean.unlearn.request import ForgetSpec, Requester
    from lmclean.unlearn.service import OutputSpec, UnlearnOptions, plan
    from lmclean.unlearn.service import unlearn as run_unlearn

    spec = ForgetSpec(ids=forget, data=forget_data, steps=steps, level=level)
    options = UnlearnOptions(
        method=method, K=K, fraction=fraction, noise=noise, seed=seed, device=device, outside_window=outside_window,
        budget=budget, check_steps=check_steps,
        exact_states=exact_states,
        propagation=PropagationSettings(damping=damping, on_divergence=on_divergence, curvature_batch=curvature_batch, tail=tail, stabilize=stabilize,
                                        operator=OperatorSettings(hvp=hvp, rank=rank, refresh=refresh, krylov_dim=krylov_dim, anchor_fraction=anchor_fraction,
                                                                   curvature_fraction=curvature_fraction, seed=seed)))
    output = OutputSpec(out=out, overwrite=overwrite, base=base, base_unrelated=base_unrelated, merge=merge)
    who = Requester(request_id, reason, requested_by, keep_data)
    from lmclean.dist import init_from_env

    main = init_from_env().main  # under torchrun: join the group; only rank 0 reports (docs/distributed.md)
    if init_from_env().active and (pending or dry_run):
        raise ConfigError(f"{'--pending' if pending else '--dry-run'} runs as a single process: run it without torchrun")
    if pending:
        from lmclean.cli._pending import run_pending

        return run_pending(store, options, output, who, given=[n for n, v in (("--forget", forget), ("--forget-data", forget_data), ("--steps", steps), ("--dry-run", dry_run)) if v], method=method, json_out=json_out)
    if dry_run:
        data = plan(store, spec, options, output, who)
        if json_out:
            print_json(data)
        else:
            for key, value in data.items():
                if key != "auto":
                    err.print(f"{key:28s} {value}")
            for line in auto_lines(data.get("auto")):
                err.print(line)
        return
    with progress_bar(f"{method}", total=None, fields="‖v‖ {task.fields[vnorm]:.3e}", enabled=not json_out and main, lazy=True) as advance:
        report = run_unlearn(store, spec, options, output, who, progress=lambda t, n: advance(1, vnorm=n),
                             on_start=lambda total: advance(0, total=total))
    if not main:
        return
    if json_out:
        print_json(report)
        return
    if report["level"] == "batch":
        err.print(f"batch level: removed {len(report['forget_steps'])} steps whole, taking "
                  f"{report['collateral_samples']} other samples' terms with them")
    base_line = f"from {report['base_model']}" + (f" (after {len(report['composes_with'])} earlier requests)"
                                                  if report["composes_with"] else "")
    err.print(f"[green]unlearned[/] {len(report['forget_sample_ids'])} samples / {len(report['steps_touched'])} steps with "
              f"{report['method']} {base_line} in {report['wall_seconds']} s ({report['curvature_products']} curvature "
              f"products, ‖Δθ‖ {report['delta_norm']:.3e}); model written to {report['output']}")
    for line in auto_lines(report.get("auto")) + quality_lines(report.get("quality"), report["method"], report.get("hvp")):
        err.print(line)
    for note in report["notes"]:
        err.print(f"note: {note}")
    scrubbed = f"; scrubbed their tokens from {report['scrubbed_steps']} steps" if "scrubbed_steps" in report else " (data kept)"
    err.print(f"audit record {report['audit_seq']} (request {report['request_id']}){scrubbed}")
