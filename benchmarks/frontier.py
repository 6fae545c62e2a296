"""Draw the fidelity/cost frontier of one or more `fidelity.py --json` cases: one panel per case.

Residual ‖θ̂ − θ_retrain‖ / ‖θ − θ_retrain‖ against wall time as a multiple of exact replay (log x),
one marker per method family; hollow markers are `cb=full` rows (curvature on the recorded batch).
The dashed line at residual 1 is "did nothing"; the dotted box is issue 15's target (residual ≤ 0.25
at ≤ 0.3× replay). Rows above the panel's top are drawn on its edge with their value.

  python benchmarks/frontier.py benchmarks/results/fidelity_*.json --out benchmarks/frontier.png

`A.json+B.json` draws B's rows into A's panel (a later run on the same stores, each row's cost
relative to its own run's exact replay), e.g. the ekfac-rq runs beside their case's frontier.

Needs matplotlib (the `bench` extra); imported here only, so fidelity.py runs without it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# family: (marker, colour). Order = legend order; the first family whose key the name contains wins.
FAMILIES: dict[str, tuple[str, str]] = {
    "replay (exact)": ("*", "black"),
    "replay f=": ("D", "tab:gray"),
    "rollback": ("X", "tab:red"),
    "tail=ekfac": ("P", "tab:olive"),
    "krylov": ("p", "crimson"),
    "ggn": ("o", "tab:blue"),
    "lmcleaner exact": ("h", "tab:cyan"),
    "ekfac-rq": ("d", "darkgreen"),
    "ekfac": ("^", "tab:green"),
    "kfac": ("s", "tab:orange"),
    "diag": ("v", "tab:purple"),
    "lowrank": ("<", "tab:brown"),
    "fisher": (">", "tab:pink"),
}
LABELS = {"krylov": "krylov (GGN on v's Krylov space)", "ekfac-rq": "ekfac rescaled along v (ekfac-rq)", "replay f=": "control-variate replay", "tail=ekfac": "ggn K=20 + ekfac tail", "lmcleaner exact": "exact Hessian",
          "diag": "diag (experimental)", "lowrank": "lowrank (experimental)", "fisher": "fisher (experimental)"}
DROP = {"lmcleaner", "krylov", "af=0.5", "ggn", "kfac", "ekfac", "ekfac-rq", "exact", "diag", "lowrank", "fisher", "replay", "(exact)", "rollback",
        "K=800", "K=20", "tail=ekfac"}
XMIN = 2e-3  # cheaper rows (rollback of 8 steps: ~0 s) are drawn at this cost
TOP = 2.5  # residual axis limit: anything above is off the useful scale (1 = did nothing)


def family(method: str) -> str | None:
    return next((key for key in FAMILIES if key in method), None)


def short(method: str) -> str:
    """The variant part of a row name, for the point's annotation ("r10 full", "f=0.25", "cf=0.25")."""
    words = [w.replace("refresh=", "r").replace("k=", "k").replace("cb=full", "full") for w in method.split() if w not in DROP]
    return " ".join(words)


def draw(cases: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 if len(cases) in (2, 4) else min(3, len(cases))
    rows_n = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(max(10.0, 5.2 * cols), 4.2 * rows_n + 0.8), squeeze=False)
    seen: dict[str, object] = {}
    for ax, case in zip(axes.flat, cases):
        for row in case["rows"]:
            fam = family(row["method"])
            if fam is None or "residual" not in row:
                continue
            marker, colour = FAMILIES[fam]
            full = "cb=full" in row["method"]
            y = min(row["residual"], TOP)
            handle = ax.scatter(max(row["x_replay"], XMIN), y, marker=marker, s=70 if marker == "*" else 40,
                                facecolors="none" if full else colour, edgecolors=colour, linewidths=1.3, zorder=3)
            if not full:
                seen.setdefault(fam, handle)
            note = short(row["method"]) + (f" ({row['residual']:.3g})" if row["residual"] > TOP else "")
            if note:
                ax.annotate(note, (max(row["x_replay"], XMIN), y), xytext=(4, -9 if full else 3), textcoords="offset points", fontsize=6)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.text(XMIN, 1.03, "did nothing", fontsize=7, color="gray")
        ax.plot([XMIN / 1.2, 0.3, 0.3], [0.25, 0.25, 0.0], color="tab:green", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlim(XMIN / 1.2, 6)
        ax.set_ylim(-0.05, TOP + 0.1)
        ax.set_xlabel("cost, × exact replay (log)")
        ax.set_ylabel("residual to retraining (0 = exact)")
        ax.set_title(case["case"], fontsize=9)
        ax.grid(True, which="both", alpha=0.2)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    order = [f for f in FAMILIES if f in seen]
    fig.legend([seen[f] for f in order], [LABELS.get(f, f) for f in order], loc="lower center",
               ncol=min(6, len(order)), fontsize=8, frameon=False)
    fig.suptitle("Fidelity vs cost of every unlearning method (hollow: --curvature-batch full; "
                 "dotted: issue 15 target)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _merged(arg: str) -> dict:
    """One case from `A.json` or `A.json+B.json+...` (A's title and figures, every file's rows)."""
    first, *more = [json.loads(Path(p).read_text()) for p in arg.split("+")]
    for extra in more:
        names = {r["method"] for r in first["rows"]}
        first["rows"] += [r for r in extra["rows"] if r["method"] not in names]
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", help="JSON files written by fidelity.py --json; A.json+B.json: one panel")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/frontier.png"))
    args = ap.parse_args()
    draw([_merged(arg) for arg in args.cases], args.out)
    print(f"wrote {args.out} ({len(args.cases)} panels)")


if __name__ == "__main__":
    main()
