"""Rendering of the unlearn report's `auto` (what --method auto chose, and why) and `quality` (spot check) entries."""

from __future__ import annotations

from typing import Any


def auto_lines(auto: dict[str, Any] | None) -> list[str]:
    """What auto chose, its projected cost and expected residual, and the alternatives it weighed."""
    if not auto:
        return []
    lines = [f"auto chose [bold]{auto['chosen']}[/]: projected {auto['projected_cost_steps']:g} training steps "
             f"(budget {auto['budget']}: {auto['budget_steps']:g}), expected residual {auto['expected_residual']:g} "
             f"({auto['residual_basis']})"]
    rejected: dict[str, list[str]] = {}
    for alt in auto["alternatives"]:
        if alt["verdict"] == "fits" or alt["verdict"].startswith("over budget"):
            lines.append(f"  {alt['name']:34s} cost {alt['projected_cost_steps']:>8g}  residual "
                         f"{alt['expected_residual']:>7g}  {alt['verdict']}")
        else:
            rejected.setdefault(alt["verdict"].split(" (")[0], []).append(alt["name"])
    lines += [f"  {why}: {', '.join(names)}" for why, names in rejected.items()]
    return lines


def quality_lines(quality: dict[str, Any] | None, method: str = "", hvp: str | None = None) -> list[str]:
    """The spot check in one line (the defect ratio, and the forget / retain loss changes), then the
    stability reading's line where there is one. The words stay with what each check can say
    (benchmarks/README.md, "Quality spot check")."""
    if not quality or not quality.get("check_steps"):
        return (["quality: no spot check (--check-steps 0, or no step to check)"] + stability_lines(quality)
                if quality is not None else [])
    ratio = quality["defect_ratio"]
    verdict = ("" if ratio is None else " [red](poor: about as far off as not correcting)[/]" if ratio >= 0.5
               else " [yellow](partly corrected at the sampled steps; errors between them add up)[/]" if ratio >= 0.05
               else " (exact at the sampled steps)")
    if method == "lmcleaner" and hvp == "krylov" and ratio is not None:
        # measured: 0.70 at residual 0.276 (TOFU forget01) and at 0.970 (bundled): no verdict either way
        verdict = (" [yellow](krylov leaves each injection uncorrected until the next anchor, so one step reads "
                   "off whatever the answer: the ratio does not tell a good krylov answer from a poor one; the stability line "
                   "below does on the runs measured)[/]")
    if method.startswith("replay(f="):
        verdict += " [yellow](control-variate noise accumulates between steps, unseen by the check)[/]"
    shown = "n/a" if ratio is None else f"{ratio:.3g}"

    def delta(name: str) -> str:
        d = (quality.get(name) or {}).get("delta")
        return "n/a" if d is None else f"{d:+.4g}"

    return [f"quality: defect ratio {shown} at steps {quality['check_steps']} (0 exact, 1 corrected nothing){verdict}; "
            f"forget loss {delta('forget_loss')}, retained-sample loss {delta('retain_loss')}"] + stability_lines(quality)


def stability_lines(quality: dict[str, Any]) -> list[str]:
    """The stability reading (ggn, krylov): whether the run trains at the edge of stability along the correction."""
    s = quality.get("stability")
    if not s:
        return []
    counted = (f"{s['clipped_steps']} of {s['steps']} propagated steps ({s['share']:.0%}) clipped at η·λ > 1.9 "
               "along the correction")
    if s["edge_of_stability"]:
        return [f"[red]stability: {counted}: the run trains at the edge of stability, where no linearised correction is "
                "reliable (every propagation measured on such runs ended 0.87 or more from retraining); use --method replay[/]"]
    return [f"stability: {counted}: not at the edge of stability"]
