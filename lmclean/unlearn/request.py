"""Typed policy of one unlearning request, computed once and passed down.

`ResolvedForget` is what a user named, resolved against a store (ids, fingerprints, level);
`Window` is the span of recorded steps a method sweeps; `default_K` is the one place that says how
far each method propagates by default. Resolve, plan, service and audit all read these objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmclean.errors import DataError
from lmclean.unlearn.common import ForgetSet

__all__ = ["DEFAULT_K", "OUTSIDE_WINDOW", "ForgetSpec", "Requester", "ResolvedForget", "Window", "default_K",
           "outside_window"]

# lmcleaner propagates K steps past the last affected step by default; replay runs to the end;
# rollback does not propagate.
DEFAULT_K: dict[str, int | None] = {"lmcleaner": 800, "replay": None, "rollback": None}


def default_K(method: str, K: int | None) -> int | None:
    """The K a run uses: the user's, else the method's default."""
    return K if K is not None else DEFAULT_K.get(method)


@dataclass(frozen=True)
class ForgetSpec:
    """What the user named: ids (`3,5,60-79` or `@file`), JSON Lines rows, or whole steps."""

    ids: str | None = None
    data: Path | None = None
    steps: str | None = None
    level: str = "sample"


@dataclass(frozen=True)
class Requester:
    """Who asked and why: goes into the audit record, never into the model."""

    request_id: str | None = None
    reason: str | None = None
    requested_by: str | None = None
    keep_data: bool = False  # False: scrub the forgotten samples' tokens from the store afterwards


@dataclass(frozen=True)
class ResolvedForget:
    """A request resolved against a store: the ForgetSet the engine runs, and what the audit records."""

    forget: ForgetSet
    sample_ids: tuple[int, ...]
    fingerprints: tuple[str, ...]
    level: str  # sample | batch
    steps: tuple[int, ...] = ()  # batch level: the recorded steps removed whole
    collateral_samples: int = 0  # batch level: other samples' terms removed with those steps


@dataclass(frozen=True)
class Window:
    """Steps a method touches: affected steps, and the sweep [first, stop) before carrying."""

    affected: tuple[int, ...]
    tau: int  # recorded steps
    stop: int  # one past the last swept step

    @classmethod
    def of(cls, affected: list[int] | tuple[int, ...], tau: int, method: str, K: int | None,
           to_end: bool = False) -> Window:
        """rollback visits first..last; the others go K past the last affected step (or to the end:
        replay without K, a propagation whose tail keeps propagating)."""
        steps = tuple(sorted(affected))
        if not steps:
            return cls((), tau, tau)
        if method == "rollback":
            return cls(steps, tau, steps[-1] + 1)
        end = tau if (K is None or to_end) else min(tau, steps[-1] + K + 1)
        return cls(steps, tau, end)

    @property
    def first(self) -> int:
        return self.affected[0] if self.affected else self.tau

    @property
    def last(self) -> int:
        return self.affected[-1] if self.affected else self.tau - 1

    @property
    def span(self) -> int:
        """Steps swept."""
        return max(0, self.stop - self.first)

    @property
    def carried(self) -> int:
        """Steps past the window over which the correction is carried unchanged."""
        return max(0, self.tau - self.stop)


# What a request whose occurrences left a windowed store's retention window (record.keep_steps) does:
# refuse (default) or carry them (correct the in-window occurrences only; report the others).
OUTSIDE_WINDOW = ("refuse", "carry")


def outside_window(affected: dict[int, list[int]], retained_from: int, keep_steps: int | None, tau: int,
                   policy: str) -> tuple[int, ...]:
    """The affected steps before the store's retained start (θ there can no longer be rebuilt, so
    their influence cannot be corrected). None: (). Some: a one-line DataError saying when the
    samples were seen and what the window is, unless `policy` is "carry": then the steps, which the
    caller leaves uncorrected (ForgetSet.from_step) and reports."""
    if policy not in OUTSIDE_WINDOW:
        raise DataError(f"--outside-window {policy!r} is not known; use one of {list(OUTSIDE_WINDOW)}")
    out = tuple(t for t in sorted(affected) if t < retained_from)
    if not out or policy == "carry":
        return out
    ids = sorted({int(i) for t in out for i in affected[t]})
    inside = [t for t in sorted(affected) if t >= retained_from]
    seen = ", ".join(map(str, out[:8])) + (", …" if len(out) > 8 else "")
    also = f" (and at {len(inside)} step{'s' if len(inside) > 1 else ''} inside the window)" if inside else ""
    who = f"sample {ids[0]}" if len(ids) == 1 else f"samples {', '.join(map(str, ids[:6]))}{', …' if len(ids) > 6 else ''}"
    verb, where = ("was" if len(ids) == 1 else "were"), ("step" if len(out) == 1 else "steps")
    raise DataError(f"{who} {verb} seen at {where} {seen}{also}, before the store's retention window (record.keep_steps: "
                    f"{keep_steps} keeps θ and gradients of steps {retained_from}..{tau - 1}), so that influence cannot "
                    "be corrected; pass --outside-window carry to correct the in-window steps only (the report and "
                    "audit record list the carried steps)")
