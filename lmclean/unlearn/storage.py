"""How what a store kept bounds an unlearning request: its retention window and its gradient precision.

A windowed store (`record.keep_steps`) no longer holds θ before its retained start, so a request's
occurrences there are refused or, if the user accepts it, carried uncorrected (the policy itself is
`lmclean.unlearn.request.outside_window`). A lossy store (`record.precision` bf16 or int8) rebuilds
θ[t] approximately, so no method is exact on it, replay included, unless θ is rebuilt from
recomputed gradients (`--exact-states`). The service calls these once per request and reports them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lmclean.errors import UnsupportedError
from lmclean.store.format import LOSSY_PRECISIONS
from lmclean.unlearn.common import ForgetSet
from lmclean.unlearn.request import outside_window

if TYPE_CHECKING:
    from lmclean.store.reader import TrajectoryStore
    from lmclean.unlearn.service import UnlearnOptions
    from lmclean.unlearn.trajectory import StoreTrajectory

__all__ = ["exact_states", "lossy_store", "retention_policy", "storage_notes"]


def retention_policy(store: TrajectoryStore, traj: StoreTrajectory, forget: ForgetSet, policy: str,
                     ) -> tuple[ForgetSet, tuple[int, ...]]:
    """(the ForgetSet the engine runs, the carried steps): a windowed store's occurrences before its
    retained start are refused (DataError), or with policy "carry" left uncorrected and returned."""
    retained = store.retained_from
    if not retained:
        return forget, ()
    carried = outside_window(forget.affected(traj), retained, store.keep_steps, traj.n_steps, policy)
    return dataclasses.replace(forget, from_step=retained), carried


def exact_states(traj: StoreTrajectory) -> None:
    """`--exact-states`: θ[t] is rebuilt by recomputing each replayed step's gradient at θ[t] from its
    stored batch (as a `gradients: recompute` store is), so a lossy store gives exact states on the
    CPU; the recomputed g[t] is then also what the sweep reads (cached: no extra cost)."""
    if not hasattr(traj, "step_grad"):
        raise UnsupportedError("--exact-states needs θ[t] rebuilt from recomputed gradients "
                               "(StoreTrajectory.step_grad), which this lmclean lacks; omit --exact-states")
    traj.recompute = True


def lossy_store(store: TrajectoryStore, exact: bool) -> str | None:
    """The lossy precision θ[t] is rebuilt from (bf16, int8); None when the states are exact."""
    precision = store.meta["precision"]
    if exact or store.recompute or precision not in LOSSY_PRECISIONS:
        return None
    return precision


def storage_notes(store: TrajectoryStore, options: UnlearnOptions, carried: tuple[int, ...]) -> list[str]:
    """The report's note lines about a lossy or windowed store (empty for a plain one)."""
    notes = []
    lossy = lossy_store(store, options.exact_states)
    if lossy:
        replay = " (replay is no longer exact retraining)" if options.method == "replay" else ""
        notes.append(f"θ[t] was rebuilt from {lossy} gradient rows (lossy): the states are approximate, so "
                     f"{options.method} is not exact{replay}; --exact-states rebuilds θ by recomputing the gradients")
    if carried:
        notes.append(f"carried: the forget set's occurrences at steps {list(carried)} are outside the store's "
                     f"retention window (steps {store.retained_from}..) and were not corrected")
    return notes
