"""`unlearn` under `torchrun`: every rank runs the same sweep on its share of each step's batch.

Rank 0 does what a single process does (lock, recovery, checks, sweep, output, audit record,
scrub); rank r > 0 waits until rank 0 has checked the request, then prepares the same read-only
view of the store and runs the same sweep, its gradients and curvature products summed with rank
0's (lmclean/unlearn/sharded.py), and writes nothing. See docs/distributed.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmclean.dist import Dist, Gate
from lmclean.errors import ConfigError


def refuse_unsupported(options: Any) -> None:
    """One-line refusals of what a torchrun unlearn does not do (yet)."""
    if options.method == "auto":
        raise ConfigError("--method auto times each method on this machine, which ranks would not agree on: name the "
                          "method (lmcleaner, replay, rollback) under torchrun")


def peer_unlearn(store_path: Path, spec: Any, options: Any, output: Any, who: Any, d: Dist) -> dict[str, Any]:
    """Rank r > 0: the sweep of rank 0's request, its shares only; returns the report it computed
    (rank 0's is the one written and audited)."""
    from lmclean.unlearn.service import _compute, prepare

    gate = Gate(d)
    gate.open()  # rank 0 holds the lock and has finished interrupted work (or failed: this raises too)
    p = prepare(store_path, spec, options, output, who)  # alongside rank 0's: the same read-only checks
    gate.open()  # rank 0's checks passed too
    _, _, report = _compute(p, options, None)
    d.barrier()  # rank 0 has written the output and its audit record
    return report
