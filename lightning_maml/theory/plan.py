"""A planner: batch sizes, inner_lr range and iteration bound that the theory asks for.

Given the constants of the assumptions (``L``, ``rho``, ``sigma``, ``sigma_tilde``, ``sigma_H``;
see :mod:`lightning_maml.theory.estimate`), an inner step size alpha and a target accuracy eps,
each variant's theorem (Fallah et al. 2020) reads

    E||grad F(w_eps)|| <= max{ sqrt(a (1 + rho alpha sigma / L) S'), b rho alpha S' / L, eps },
    S  = sigma^2 / B + sigma_tilde^2 / (B D_o) + sigma_tilde^2 / D_in,
    S' = S + bias alpha^2 L^2 sigma^2          (bias > 0 for FO-MAML only),

within ``O(1) Delta (L + rho alpha (sigma + eps)) / eps^2`` iterations, ``Delta = F(w_0) - min F``.
The planner inverts this: it finds the largest S for which both error terms stay below eps,
splits it equally between the three terms of S (a choice of this planner, not of the paper) and
rounds each batch size up. For FO-MAML the bias term alone sets a floor: an eps below it is
refused, with the inner_lr that would reach it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lightning_maml.theory.constants import THEORY, VARIANTS, SharedConstants, VariantConstants

__all__ = [
    "Line",
    "Unreachable",
    "VariantPlan",
    "format_plan",
    "plan_variant",
    "step_size_batches",
]

#: Display names of the variants.
TITLES = {"maml": "MAML", "fomaml": "FO-MAML", "hfmaml": "HF-MAML"}
#: S is split into this many equal shares, one per term (sigma^2/B, .../(B D_o), .../D_in).
S_SHARES = 3


class Unreachable(ValueError):
    """The target eps lies below the floor of the variant's bound (FO-MAML).

    Attributes:
        floor: The bound's value with infinite batches.
        inner_lr_needed: The largest inner_lr whose floor is below eps.
    """

    def __init__(self, message: str, floor: float, inner_lr_needed: float) -> None:
        super().__init__(message)
        self.floor = floor
        self.inner_lr_needed = inner_lr_needed


@dataclass
class Line:
    """One row of a plan: a quantity, its value, and how it was obtained."""

    name: str
    value: str
    how: str


@dataclass
class VariantPlan:
    """What the theory asks of one variant for a target eps.

    Attributes:
        variant: ``"maml"``, ``"fomaml"`` or ``"hfmaml"``.
        inner_lr_max: The largest inner_lr the theorem covers.
        task_batch: B, tasks per step.
        inner_shots: D_in, support examples per task.
        query_shots: D_o, query examples per task.
        hessian_shots: D_h, Hessian-set examples per task (``None`` for FO-MAML).
        step_tasks: B', tasks of the step-size estimate.
        step_shots: D_beta, examples per task of the step-size estimate.
        delta_coefficient: HF-MAML's ``delta_i = delta_coefficient / ||v_i||`` (``inf`` when
            ``rho = 0``: the finite difference is then exact for any delta); ``None`` otherwise.
        step_size_constant: c of ``beta_k = c / L~(w_k)``.
        max_step: ``c / (4 L)``, the step when ``rho alpha ||grad f_i||`` is negligible.
        iterations: The iteration bound, rounded up, with its O(1) factor ``iteration_constant``.
        floor: The bound with infinite batches (0 except for FO-MAML).
        guaranteed: The bound with the rounded batch sizes (at most eps).
        lines: The plan as explained rows.
    """

    variant: str
    inner_lr_max: float
    task_batch: int
    inner_shots: int
    query_shots: int
    hessian_shots: int | None
    step_tasks: int
    step_shots: int
    delta_coefficient: float | None
    step_size_constant: float
    max_step: float
    iterations: int
    floor: float
    guaranteed: float
    lines: list[Line] = field(default_factory=list)


def _ceil(raw: float, minimum: int = 1) -> int:
    """Rounds a required size up (and to at least ``minimum``); sizes are integers."""
    return max(minimum, math.ceil(raw - 1e-9))


def _g(value: float) -> str:
    return f"{value:.4g}"


def step_size_batches(
    L: float,
    rho: float,
    sigma: float,
    sigma_tilde: float,
    inner_lr: float,
    shared: SharedConstants | None = None,
) -> tuple[tuple[float, int], tuple[float, int]]:
    """B' and D_beta of the step-size estimate, each as ``(required value, rounded up)``.

    ``B' >= 0.5 (rho alpha sigma / L)^2`` and ``D_beta >= (2 rho alpha sigma_tilde / L)^2``
    (Fallah et al. 2020; the constants are ``shared``'s), and at least 1.
    """
    shared = shared or SharedConstants()
    raw_tasks = shared.step_task_batch * (rho * inner_lr * sigma / L) ** 2
    raw_shots = (shared.step_data_batch * rho * inner_lr * sigma_tilde / L) ** 2
    return (raw_tasks, _ceil(raw_tasks)), (raw_shots, _ceil(raw_shots))


def plan_variant(
    variant: str,
    L: float,
    rho: float,
    sigma: float,
    sigma_tilde: float,
    sigma_H: float,
    inner_lr: float,
    eps: float,
    Delta: float = 1.0,
    iteration_constant: float = 1.0,
    constants: VariantConstants | None = None,
    shared: SharedConstants | None = None,
) -> VariantPlan:
    """The batch sizes, step size and iteration bound of one variant for a target eps.

    Args:
        variant: ``"maml"``, ``"fomaml"`` or ``"hfmaml"``.
        L: Smoothness of the task losses.
        rho: Lipschitz constant of the task Hessians.
        sigma: Task-gradient spread.
        sigma_tilde: Within-task gradient spread.
        sigma_H: Within-task Hessian spread.
        inner_lr: The inner step size alpha.
        eps: The target ``E||grad F|| <= eps``.
        Delta: ``F(w_0) - min F`` for the iteration bound (1: the bound per unit of Delta).
        iteration_constant: The theorem's unspecified O(1) factor in the iteration bound.
        constants: The variant's constants (default: ``THEORY[variant]``, Fallah et al. 2020).
        shared: The shared constants (default: ``SharedConstants()``, Fallah et al. 2020).

    Returns:
        The plan.

    Raises:
        ValueError: On an unknown variant or an invalid constant.
        Unreachable: If eps is below the variant's floor (FO-MAML).
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}: use one of {list(VARIANTS)}.")
    # NaN passes every comparison: it would surface as "cannot convert float NaN to integer".
    for name, value in {"L": L, "inner_lr": inner_lr, "eps": eps, "Delta": Delta}.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    spreads = {"rho": rho, "sigma": sigma, "sigma_tilde": sigma_tilde, "sigma_H": sigma_H}
    for name, value in spreads.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    k = constants or THEORY[variant]
    shared = shared or SharedConstants()
    title = TITLES[variant]
    lines: list[Line] = []

    def error_terms(alpha: float, s: float) -> tuple[float, float]:
        """The two terms of the bound for S = s (the bias term added)."""
        total = s + k.bias * alpha**2 * L**2 * sigma**2
        return (
            math.sqrt(k.error_sqrt * (1 + rho * alpha * sigma / L) * total),
            k.error_linear * rho * alpha * total / L,
        )

    alpha = inner_lr
    inner_lr_max = k.inner_lr_factor / L
    inside = alpha <= inner_lr_max
    lines.append(
        Line(
            "inner_lr",
            f"{_g(alpha)} in (0, {_g(inner_lr_max)}]"
            if inside
            else f"{_g(alpha)} > {_g(inner_lr_max)}",
            f"the theorem needs inner_lr <= {_g(k.inner_lr_factor)} / L"
            + ("" if inside else "; OUTSIDE the range: the bound below does not apply"),
        )
    )

    floor_sqrt, floor_linear = error_terms(alpha, 0.0)
    floor = max(floor_sqrt, floor_linear)
    if k.bias:
        floor_how = (
            f"S gains {_g(k.bias)} alpha^2 L^2 sigma^2 = {_g(k.bias * alpha**2 * L**2 * sigma**2)}, "
            f"which no batch size removes: max(sqrt term {_g(floor_sqrt)}, linear term "
            f"{_g(floor_linear)})"
        )
        if floor >= eps:
            low, high = 0.0, alpha
            for _ in range(100):  # the floor grows with alpha: bisect for the alpha that meets eps
                mid = (low + high) / 2
                low, high = (mid, high) if max(error_terms(mid, 0.0)) < eps else (low, mid)
            raise Unreachable(
                f"{title} cannot reach eps = {_g(eps)} at inner_lr = {_g(alpha)}: its bound has the "
                f"floor {_g(floor)} ({floor_how}; it holds even with infinite batches). "
                f"Use inner_lr <= {_g(low)}, a family with a smaller task spread sigma, or MAML / "
                "HF-MAML, whose bounds have no floor.",
                floor,
                low,
            )
        lines.append(Line("floor", _g(floor), floor_how))

    # The largest S that keeps both error terms at or below eps.
    cap_sqrt = eps**2 / (k.error_sqrt * (1 + rho * alpha * sigma / L))
    cap_linear = eps * L / (k.error_linear * rho * alpha) if rho > 0 else math.inf
    bias_term = k.bias * alpha**2 * L**2 * sigma**2
    budget = min(cap_sqrt, cap_linear) - bias_term
    binding = "sqrt term" if cap_sqrt <= cap_linear else "linear term"
    lines.append(
        Line(
            "S budget",
            _g(budget),
            f"min(eps^2 / ({_g(k.error_sqrt)} (1 + rho alpha sigma / L)) = {_g(cap_sqrt)}, "
            f"eps L / ({_g(k.error_linear)} rho alpha) = {_g(cap_linear)})"
            + (f" - bias {_g(bias_term)}" if k.bias else "")
            + f"; the {binding} binds; split in {S_SHARES} equal shares",
        )
    )
    share = budget / S_SHARES

    raw_b = sigma**2 / share
    task_batch = _ceil(raw_b, shared.min_task_batch)
    lines.append(
        Line(
            "B",
            str(task_batch),
            f"sigma^2 / share = {_g(raw_b)} -> {_ceil(raw_b)}; "
            + (
                f"B >= {shared.min_task_batch} dominates"
                if task_batch == shared.min_task_batch
                else "the task spread dominates"
            ),
        )
    )
    raw_in = sigma_tilde**2 / share
    inner_shots = _ceil(raw_in)
    lines.append(
        Line("D_in", str(inner_shots), f"sigma_tilde^2 / share = {_g(raw_in)} -> {inner_shots}")
    )
    raw_o = sigma_tilde**2 / (task_batch * share)
    query_shots = _ceil(raw_o)
    lines.append(
        Line("D_o", str(query_shots), f"sigma_tilde^2 / (B share) = {_g(raw_o)} -> {query_shots}")
    )

    hessian_shots = None
    if k.hessian_batch is not None:
        raw_h = k.hessian_batch * (alpha * sigma_H) ** 2
        hessian_shots = _ceil(raw_h)
        lines.append(
            Line(
                "D_h",
                str(hessian_shots),
                f"{_g(k.hessian_batch)} (alpha sigma_H)^2 = {_g(raw_h)} -> {hessian_shots}",
            )
        )

    (raw_bp, step_tasks), (raw_db, step_shots) = step_size_batches(
        L, rho, sigma, sigma_tilde, alpha, shared
    )
    lines.append(
        Line(
            "B'",
            str(step_tasks),
            f"{_g(shared.step_task_batch)} (rho alpha sigma / L)^2 = {_g(raw_bp)} -> {step_tasks}",
        )
    )
    lines.append(
        Line(
            "D_beta",
            str(step_shots),
            f"({_g(shared.step_data_batch)} rho alpha sigma_tilde / L)^2 = {_g(raw_db)} -> {step_shots}",
        )
    )

    delta_coefficient = None
    if variant == "hfmaml":
        if rho > 0:
            delta_coefficient = 1.0 / (shared.delta_denominator * rho * alpha)
            how = f"1 / ({_g(shared.delta_denominator)} rho alpha ||v||) = {_g(delta_coefficient)} / ||v||"
            lines.append(Line("delta", f"{_g(delta_coefficient)} / ||v||", how))
        else:
            delta_coefficient = math.inf
            lines.append(
                Line("delta", "any", "rho = 0: the finite difference is exact for any delta")
            )

    max_step = k.step_size / (4 * L)
    lines.append(
        Line(
            "c",
            _g(k.step_size),
            f"beta_k = c / L~(w_k) <= c / (4 L) = {_g(max_step)}",
        )
    )
    raw_iterations = iteration_constant * Delta * (L + rho * alpha * (sigma + eps)) / eps**2
    iterations = _ceil(raw_iterations)
    lines.append(
        Line(
            "iterations",
            str(iterations),
            f"O(1) Delta (L + rho alpha (sigma + eps)) / eps^2 = {_g(raw_iterations)} with "
            f"O(1) = {_g(iteration_constant)}, Delta = {_g(Delta)}",
        )
    )

    s_rounded = (
        sigma**2 / task_batch
        + sigma_tilde**2 / (task_batch * query_shots)
        + sigma_tilde**2 / inner_shots
    )
    guaranteed = max(error_terms(alpha, s_rounded))
    lines.append(
        Line(
            "bound",
            _g(guaranteed),
            f"max(sqrt term, linear term) with the rounded sizes (S = {_g(s_rounded)}) <= eps = {_g(eps)}",
        )
    )
    return VariantPlan(
        variant=variant,
        inner_lr_max=inner_lr_max,
        task_batch=task_batch,
        inner_shots=inner_shots,
        query_shots=query_shots,
        hessian_shots=hessian_shots,
        step_tasks=step_tasks,
        step_shots=step_shots,
        delta_coefficient=delta_coefficient,
        step_size_constant=k.step_size,
        max_step=max_step,
        iterations=iterations,
        floor=floor,
        guaranteed=guaranteed,
        lines=lines,
    )


def format_plan(plan: VariantPlan) -> str:
    """The plan as an aligned text table with a title line."""
    width = max(len(line.name) for line in plan.lines)
    value_width = max(len(line.value) for line in plan.lines)
    rows = [f"{line.name:<{width}}  {line.value:<{value_width}}  {line.how}" for line in plan.lines]
    return "\n".join([TITLES[plan.variant], *rows])
