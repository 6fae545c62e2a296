"""LMCleaner propagation: push the forget set's initial perturbation through the recorded steps.

Linearised counterfactual (design note), for SGD with momentum μ and coupled weight decay λ (AdamW:
the same δg, pushed through Adam's linearised moments, see `adamw_tangent`):

    d[t]     = (H_t^{−F} + (λ + damping) I) v_θ[t] − Σ_{j ∈ F∩S_t} w_{t,j} ∇ℓ_j(θ[t])
    v_m[t+1] = μ v_m[t] + d[t]            (μ = 0: v_m[t+1] = d[t])
    v_θ[t+1] = v_θ[t] − η_t v_m[t+1]

with H_t taken at the recorded θ[t] on the recorded batch minus F. A batch-level step t_z is
skipped: v_θ −= u[t_z], v_m −= Δm[t_z]. All terms share one accumulator (superposition), which is
propagated from the first affected step to K steps past the last one and then carried unchanged:
M requests cost one sweep of (span + K) products.

The engine asks the curvature operator what it is (lmclean.unlearn.operators) rather than its name:
the stabiliser applies to PSD operators; a reused operator is estimated at the first step of each
block of `refresh` steps; a closed-form one (krylov, kfac, ekfac, ekfac-rq) applies each run of injection-free steps
inside a block at once in its eigenbasis, exactly for SGD with momentum and weight decay (the 2×2
(v, m) recursion per eigen-direction). AdamW takes the per-step products: its preconditioner is
not diagonal in that basis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmclean.errors import ConfigError, DivergenceError, UnsupportedError
from lmclean.optim import AdamWRule, SGDRule, clip_tangent, decay_of, is_uniform, lr_scale_of
from lmclean.unlearn.common import ForgetSet, SweepResult, flat_grad, update_of_step
from lmclean.unlearn.request import DEFAULT_K, Window
from lmclean.unlearn.operators import OPERATORS, CurvatureOperator, OperatorSettings, make_operator
from lmclean.store import TrajectoryStore
from lmclean.unlearn.trajectory import Trajectory

Progress = Callable[[int, float], None]  # (step, ‖v‖)


@dataclass
class PropagationSettings:
    K: int = DEFAULT_K["lmcleaner"]  # type: ignore[assignment]
    damping: float = 1e-4
    divergence_factor: float = 50.0  # ‖v‖ above this × its largest post-injection value = diverged
    on_divergence: str = "stop"  # stop | damp (raise damping ×10 and sweep again, at most 3 times)
    # "retained": H_t of L_t^{−F} (exact for quadratics); "full": H_t of the recorded L_t, which makes
    # the map from forget sets to corrections exactly linear (superposition) at second-order cost
    # (except with hvp "ekfac-rq", whose eigenvalue scale depends on the propagated vector).
    curvature_batch: str = "retained"
    # Past the K window: "carry" v unchanged (the paper), or keep propagating it with a reused
    # curvature ("krylov", "lowrank", "diag", "kfac", "ekfac": estimated at anchor steps, reused for `refresh`).
    tail: str = "carry"
    # Keep each linearised step non-expansive for PSD curvature: where η_t·λ(G) > 2 (training at the
    # edge of stability) (I − ηG) flips and grows v, which the real dynamics do not do. The curvature
    # term's step is clipped to c = min(η, 1.9·vᵀGv/‖Gv‖²), which guarantees ‖v − cGv‖ ≤ ‖v‖ at
    # no extra product (closed-form windows cap η·λ at 1.9 per eigen-direction). Never applied to
    # an operator that is not PSD (the exact Hessian).
    stabilize: bool = True
    operator: OperatorSettings = field(default_factory=OperatorSettings)
    # The tail's curvature. None: the operator's own settings (rank, refresh, seed, anchor share...)
    # with hvp = tail, so the CLI's --rank/--refresh/--seed reach --tail lowrank.
    tail_operator: OperatorSettings | None = None

    def __post_init__(self) -> None:
        reused = [name for name, cls in OPERATORS.items() if not cls.per_step]
        if self.tail != "carry" and (self.tail not in OPERATORS or OPERATORS[self.tail].per_step):
            raise ConfigError(f"--tail {self.tail!r} must be carry or a reused curvature: one of {reused}")
        if self.tail_operator is None:
            self.tail_operator = dataclasses.replace(self.operator, hvp="lowrank" if self.tail == "carry" else self.tail)

    @property
    def propagates_tail(self) -> bool:
        """Whether the sweep runs to the last recorded step (a tail curvature) instead of carrying."""
        return self.tail != "carry"


def require_supported(traj: Trajectory | TrajectoryStore, forget: ForgetSet) -> SGDRule | AdamWRule:
    """SGD (momentum, weight decay) at both levels; AdamW at sample level only: a removed step would
    also shift Adam's step counter (its bias corrections), which is no small perturbation."""
    if isinstance(traj.rule, SGDRule):
        return traj.rule
    if isinstance(traj.rule, AdamWRule):
        if forget.steps:
            raise UnsupportedError(
                "batch-level unlearning of an adamw trajectory is not supported by lmcleaner (removing a step "
                "shifts Adam's bias corrections); use --level sample or --method replay")
        return traj.rule
    raise UnsupportedError(f"unlearning a {traj.rule.name} trajectory is not supported; use --method replay")


def adamw_tangent(rule: AdamWRule, t: int, lr: float, grad: torch.Tensor, state: dict[str, torch.Tensor],
                  v: torch.Tensor, dm: torch.Tensor, ds: torch.Tensor, dg: torch.Tensor,
                  wd: torch.Tensor | float | None = None, scale: torch.Tensor | float = 1.0) -> None:
    """One AdamW step linearised at the recorded (θ[t], m[t], s[t], g[t]), applied in place to the
    perturbations (v = δθ, dm = δm, ds = δs) given the gradient perturbation dg = δg (all (P,)).

        m' = β1 m + (1−β1) g,  s' = β2 s + (1−β2) g²,  θ' = (1 − ηλ) θ − (η/b1) m' / (√s'/b2 + ε)
        δm' = β1 δm + (1−β1) δg,  δs' = β2 δs + 2(1−β2) g δg
        δθ' = (1 − ηλ) δθ − (η/b1) [δm' / D − m' δD / D²],  D = √s'/b2 + ε,  δD = δs' / (2 b2 √s')

    with b1 = 1 − β1^(t+1), b2 = √(1 − β2^(t+1)). Where s' = 0 (parameters no batch ever touched)
    δD is taken as 0: √· is not differentiable there and the true change is second order.
    `wd` and `scale` are the per-position weight decay and lr scale of parameter groups."""
    wd = rule.weight_decay if wd is None else wd
    m_new = torch.lerp(state["exp_avg"], grad, 1 - rule.beta1)  # (P,)
    s_new = state["exp_avg_sq"] * rule.beta2 + (1 - rule.beta2) * grad * grad  # (P,)
    b1 = 1 - rule.beta1 ** (t + 1)
    b2 = math.sqrt(1 - rule.beta2 ** (t + 1))
    dm.mul_(rule.beta1).add_(dg, alpha=1 - rule.beta1)
    ds.mul_(rule.beta2).add_(grad * dg, alpha=2 * (1 - rule.beta2))
    root = s_new.sqrt()
    denom = root / b2 + rule.eps
    d_denom = torch.where(root > 0, ds / (2 * b2 * root.clamp(min=torch.finfo(root.dtype).tiny)), torch.zeros_like(ds))
    v.mul_(1 - (lr * scale) * wd).sub_((dm / denom - m_new * d_denom / denom**2) * ((lr / b1) * scale))


def propagate(traj: Trajectory, forget: ForgetSet, settings: PropagationSettings, progress: Progress | None = None,
              keep: frozenset[int] = frozenset()) -> SweepResult:
    """One sweep; on divergence either raise DivergenceError or retry with more damping.
    `keep`: steps before which to keep v and the state perturbation (SweepResult.kept, for the spot
    check); those steps are never folded into a closed-form window."""
    damping = settings.damping
    for attempt in range(4):
        try:
            result = _sweep(traj, forget, settings, damping, progress, keep)
            if attempt:
                result.notes.append(f"diverged {attempt} time(s); damping raised to {damping:g}")
                result.divergence = f"recovered with damping {damping:g}"
            return result
        except DivergenceError:
            if settings.on_divergence != "damp" or attempt == 3:
                raise
            damping = max(damping * 10, 1e-3)
    raise AssertionError("unreachable")


def _sweep(traj: Trajectory, forget: ForgetSet, settings: PropagationSettings, damping: float,
           progress: Progress | None, keep: frozenset[int] = frozenset()) -> SweepResult:
    rule = require_supported(traj, forget)
    adam = isinstance(rule, AdamWRule)
    affected = forget.affected(traj)
    tau = traj.n_steps
    if not affected:
        return SweepResult(torch.zeros(traj.manifest.size), "lmcleaner", [], (tau, tau), damping=damping,
                           notes=["no recorded step contains the forget set: nothing to do"])
    first, last = min(affected), max(affected)
    stop = Window.of(list(affected), tau, "lmcleaner", settings.K).stop  # propagate first..stop-1, then carry (or tail)
    end = tau if settings.propagates_tail else stop
    assert settings.tail_operator is not None  # set by PropagationSettings.__post_init__
    op = make_operator(settings.operator, traj.manifest)
    tail_op = make_operator(settings.tail_operator, traj.manifest)
    momentum = 0.0 if adam else rule.momentum
    P = traj.manifest.size
    # parameter groups: weight decay and lr scale per flat position (floats for a single group)
    decay = (0.0 if adam else decay_of(rule, P)) + damping  # AdamW's decay is decoupled
    wd_adam, scale = decay_of(rule, P), lr_scale_of(rule, P)
    uniform = is_uniform(rule)
    v = m = s2 = None  # (P,) perturbations of θ, of the momentum buffer (Adam: exp_avg) and of exp_avg_sq
    reference = 0.0
    theta_norm = 1.0  # ‖θ‖ at the sweep's first step, set below
    result = SweepResult(torch.zeros(0), "lmcleaner", sorted(affected), (first, end), damping=damping)
    # closed-form windows: steps without injections whose curvature is a reused eigenbasis estimate
    # are collected here and applied at once (SGD and momentum: exact for the fixed curvature)
    pending: list[float] = []
    pending_op: CurvatureOperator | None = None
    closed_steps = 0

    def record(t: int) -> None:
        nonlocal reference
        assert v is not None
        norm = float(torch.linalg.vector_norm(v))
        # the guard's yardstick: ‖v‖ right after injections. Adam's update is scale-invariant in g
        # (first step: η·sign(g)), so an injection first lands in the moments and reaches θ over the
        # next steps: for AdamW every step up to the last affected one counts.
        if t in affected or (adam and t <= last):
            reference = max(reference, norm)
        result.v_norms.append((t, norm))
        if progress:
            progress(t, norm)
        # the correction is also never allowed past divergence_factor × ‖θ‖: the post-injection yardstick
        # grows with v wherever every step counts (AdamW up to the last affected step)
        if not math.isfinite(norm) or (reference > 0 and norm > settings.divergence_factor * reference):
            what = f"its post-injection size {reference:.3g}"
        elif norm > settings.divergence_factor * theta_norm:
            what = f"the parameters' own norm {theta_norm:.3g}"
        else:
            return
        raise DivergenceError(
            f"propagation diverged at step {t}: ‖v‖ = {norm:.3g} is over {settings.divergence_factor:g}× {what} "
            f"(hvp={settings.operator.hvp}, damping={damping:g}); "
            "raise --damping, lower --K, use --hvp ggn, or pass --on-divergence damp")

    def flush(t: int) -> None:
        nonlocal closed_steps
        if not pending or pending_op is None or v is None:
            return
        cap = 1.9 if settings.stabilize and pending_op.psd else None
        _, _, capped = pending_op.window(v, m if momentum else None, pending, momentum, decay, cap)
        result.clipped_steps += capped
        closed_steps += len(pending)
        pending.clear()
        record(t)

    def keep_state(t: int) -> None:
        if t in keep and v is not None:
            moved = {"exp_avg": m, "exp_avg_sq": s2} if adam else {"momentum_buffer": m} if rule.momentum else {}
            result.kept[t] = (v.clone(), {k: x.clone() for k, x in moved.items() if k in rule.state_names()})

    # a reused curvature is estimated at the first step of each block it visits: start at the block
    # of `first` (no products before `first`, only that anchor) so every request anchors alike
    for t, theta, state in traj.states(op.block_start(first), end - 1):
        if v is None:
            v, m, s2 = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
            theta_norm = max(float(torch.linalg.vector_norm(theta)), 1.0)
            decay, wd_adam, scale = (x.to(theta.device, theta.dtype) if isinstance(x, torch.Tensor) else x
                                     for x in (decay, wd_adam, scale))
        info = traj.batch(t)
        operator = op if t < stop else tail_op
        retained = [int(i) for i in info.sample_ids
                    if settings.curvature_batch == "full" or int(i) not in forget.sample_ids]
        if operator.reused_across_steps and not operator.current(t) and retained and t not in forget.steps:
            flush(t - 1)  # the pending steps belong to the previous estimate
            operator.at(t, theta, lambda: traj.objective(t, retained), lambda: traj.stored_grad(t))
        if t < first:
            continue
        if (operator.closed_form and not adam and uniform and info.clip >= 1.0 and t not in affected and operator.current(t)
                and t not in keep
                and (not pending or pending_op is operator) and bool(torch.any(v != 0))):
            pending.append(info.lr)
            pending_op = operator
            continue
        flush(t - 1)
        keep_state(t)
        if t in forget.steps:  # batch level: the step never happened
            u, dstate = update_of_step(traj, t, theta, state, info.lr)
            v -= u
            if rule.momentum:
                m -= dstate["momentum_buffer"]
        else:
            d = torch.zeros_like(theta)  # δ of the data gradient, then of the clipped gradient
            if torch.any(v != 0) and retained:
                hv = operator.at(t, theta, lambda: traj.objective(t, retained), lambda: traj.stored_grad(t))(v)
                if settings.stabilize and not adam and operator.psd:
                    shrink = _stable_scale(v, hv, info.lr)
                    if shrink < 1.0:
                        hv = hv * shrink
                        result.clipped_steps += 1
                d += hv
            if t in affected:
                d -= flat_grad(traj.objective(t, affected[t], micro=True), traj.manifest, theta)
                result.gradients += 1
            if info.clip < 1.0:  # the run clipped this step: δ(clip(g)) = J_clip δg (docs/algorithm.md)
                d = clip_tangent(d, traj.stored_grad(t), info.grad_norm, info.clip)
            d += decay * v  # weight decay (SGD's is coupled, applied after clipping) and damping
            if adam:
                adamw_tangent(rule, t, info.lr, traj.stored_grad(t), state, v, m, s2, d, wd_adam, scale)
            elif rule.momentum:
                m.mul_(rule.momentum).add_(d)
                v.sub_(_scaled(m, scale), alpha=info.lr)
            else:
                v.sub_(_scaled(d, scale), alpha=info.lr)
        record(t)
    flush(end - 1)
    keep_state(end)
    result.delta = v if v is not None else torch.zeros(traj.manifest.size)
    if v is not None:  # the optimizer state of θ̂: v_m (SGD momentum), δm and δs (AdamW)
        moved = {"exp_avg": m, "exp_avg_sq": s2} if adam else {"momentum_buffer": m} if rule.momentum else {}
        result.state_delta = {k: x for k, x in moved.items() if k in rule.state_names()}
    result.products = op.products + tail_op.products
    if settings.stabilize and not adam and all(o.psd and o.gauss_newton_along_v
                                               for o in ([op, tail_op] if settings.propagates_tail else [op])):
        result.stability_steps = end - first
    if result.clipped_steps:
        result.notes.append(f"{result.clipped_steps} steps had η·λ(H) > 2 along v; their curvature step was clipped "
                            "to stay non-expansive (--no-stabilize to disable)")
    if closed_steps:
        result.notes.append(f"{closed_steps} steps without injections were applied in closed form in the "
                            "curvature's eigenbasis (no product per step)")
    if stop < tau:
        tail = f"propagated with {settings.tail} curvature" if settings.propagates_tail else "carried unchanged"
        result.notes.append(f"propagated {stop - first} steps ({first}..{stop - 1}) with {settings.operator.hvp}; the "
                            f"correction is {tail} over the last {tau - stop} steps")
    return result


def _scaled(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x times the per-position lr scale of parameter groups (x itself for one group)."""
    return x if isinstance(scale, float) and scale == 1.0 else x * scale


def _stable_scale(v: torch.Tensor, hv: torch.Tensor, lr: float) -> float:
    """Factor s ≤ 1 so that ‖v − s·η·Hv‖ ≤ ‖v‖ (non-expansive step), 1 when the step already is."""
    vhv = float(torch.dot(v, hv))
    hh = float(torch.dot(hv, hv))
    if vhv <= 0 or hh == 0:
        return 1.0
    limit = 1.9 * vhv / hh  # ‖v − c·Hv‖² ≤ ‖v‖²  ⟺  c ≤ 2 vᵀHv / ‖Hv‖²
    return min(1.0, limit / lr)
