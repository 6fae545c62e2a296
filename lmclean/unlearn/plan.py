"""`unlearn --dry-run`: what a run would touch and cost, timed on one real step."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmclean.unlearn.service import UnlearnOptions
    from lmclean.unlearn.trajectory import StoreTrajectory

from lmclean.unlearn.request import Window


def estimate(traj: StoreTrajectory, window: Window, options: UnlearnOptions, n_affected: int) -> dict[str, Any]:
    """Products needed and seconds, from one timed gradient and curvature product at the first step."""
    if not window.affected:
        return {"method": options.method, "steps_touched": [], "note": "no recorded step contains the forget set"}
    prop = options.propagation
    span = window.span
    grad_s, product_s = _time_one_step(traj, window.first, prop.operator.hvp if options.method == "lmcleaner" else None)
    products = 0
    if options.method == "lmcleaner":
        from lmclean.unlearn.operators import make_operator

        tau = window.tau
        stop = tau if options.K is None else min(tau, window.last + options.K + 1)
        products = make_operator(prop.operator, traj.manifest).products_for(stop - window.first)
        if prop.propagates_tail and prop.tail_operator is not None and stop < tau:
            products += make_operator(prop.tail_operator, traj.manifest).products_for(tau - stop)
        seconds = products * product_s + n_affected * grad_s
    elif options.method == "replay":
        seconds = span * grad_s * (1.0 if not options.fraction else 2 * options.fraction + 0.3)
    else:
        seconds = n_affected * grad_s
    return {
        "method": options.method, "steps_touched": list(window.affected), "first_step": window.first,
        "last_step": window.last, "window": [window.first, window.stop], "propagated_steps": span,
        "carried_steps": window.carried, "curvature_products_needed": products, "gradient_seconds": round(grad_s, 4),
        "product_seconds": round(product_s, 4), "estimated_seconds": round(seconds, 1),
    }


def _time_one_step(traj: StoreTrajectory, t: int, hvp: str | None) -> tuple[float, float]:
    """Seconds of one gradient and one curvature product on step t's batch (after a warm-up)."""
    from lmclean.curvature import get_product
    from lmclean.unlearn.common import flat_grad

    for _, theta, _ in traj.states(t, t):
        obj = traj.objective(t, [int(i) for i in traj.batch(t).sample_ids])
        timings = []
        for _ in range(2):  # the first call pays one-off costs
            began = time.perf_counter()
            g = flat_grad(obj, traj.manifest, theta)
            timings.append(time.perf_counter() - began)
        grad_s, product_s = timings[-1], 0.0
        if hvp not in (None, "fisher"):  # fisher uses the stored gradient: no product to time
            product = get_product("exact" if hvp == "exact" else "ggn")
            for _ in range(2):
                began = time.perf_counter()
                product(obj, traj.manifest.views(theta), traj.manifest.views(g))
                product_s = time.perf_counter() - began
        return grad_s, product_s
    return 0.0, 0.0
