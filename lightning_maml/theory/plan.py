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

With N inner steps (``inner_steps``) the inner_lr range, the step size and the iteration bound
take the multi-step factors of :mod:`lightning_maml.theory.multistep` (after Ji, Yang, Liang
2022, whose abstracts fix the 1/N inner step size and a cost linear in N; the constants are this
project's, as that module says); N = 1 is the plan above exactly.

:func:`compute_plan` does the arithmetic and returns the numbers (:class:`VariantPlan`);
:func:`explain_plan`, :func:`format_plan` and :func:`explain_refusal` turn them into the text
that ``lightning-maml plan`` prints. Both take a variant's constants
(:class:`~lightning_maml.theory.VariantConstants`), not its name: the variant registry
(:mod:`lightning_maml.variants`) knows which constants and title belong to which variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from lightning_maml.theory.constants import SharedConstants, VariantConstants
from lightning_maml.theory.multistep import (
    curvature_factor,
    hessian_chain_factor,
    inner_lr_bound,
)

__all__ = [
    "Line",
    "Unreachable",
    "VariantPlan",
    "compute_plan",
    "explain_plan",
    "explain_refusal",
    "format_plan",
    "step_size_batches",
]

#: S is split into this many equal shares, one per term (sigma^2/B, .../(B D_o), .../D_in).
S_SHARES = 3


@dataclass
class Line:
    """One row of a plan: a quantity, its value, and how it was obtained."""

    name: str
    value: str
    how: str


class Unreachable(ValueError):
    """The target eps lies below the floor of the variant's bound (FO-MAML).

    Attributes:
        floor: The bound's value with infinite batches.
        inner_lr_needed: The largest inner_lr whose floor is below eps.
        eps: The target.
        inner_lr: The inner_lr asked for.
        bias: The variant's bias constant.
        bias_term: ``bias alpha^2 L^2 sigma^2``, what S gains.
        floor_sqrt: The bound's square-root term with infinite batches.
        floor_linear: Its linear term with infinite batches.
    """

    def __init__(
        self,
        floor: float,
        inner_lr_needed: float,
        *,
        eps: float,
        inner_lr: float,
        bias: float,
        bias_term: float,
        floor_sqrt: float,
        floor_linear: float,
    ) -> None:
        self.floor = floor
        self.inner_lr_needed = inner_lr_needed
        self.eps = eps
        self.inner_lr = inner_lr
        self.bias = bias
        self.bias_term = bias_term
        self.floor_sqrt = floor_sqrt
        self.floor_linear = floor_linear
        super().__init__(explain_refusal(self))


@dataclass(frozen=True)
class VariantPlan:
    """What the theory asks of one variant for a target eps: the numbers of the plan.

    Each rounded size comes with the raw value it was rounded up from (``raw_...``).

    Attributes:
        constants, shared, L, rho, sigma, sigma_tilde, sigma_H, inner_lr, eps, Delta,
            iteration_constant, inner_steps: The inputs, as :func:`compute_plan` takes them.
        inner_lr_max: The largest inner_lr the theorem covers, ``inner_lr_factor / (N L)``.
        floor_sqrt: The square-root term of the bound with infinite batches.
        floor_linear: Its linear term with infinite batches.
        floor: The bound with infinite batches (0 except for FO-MAML).
        bias_term: ``bias alpha^2 L^2 sigma^2``, what FO-MAML's S gains.
        cap_sqrt: The largest S for which the square-root term stays at or below eps.
        cap_linear: The same for the linear term (``inf`` when ``rho = 0``).
        budget: What is left of S for the three batch terms.
        task_batch: B, tasks per step.
        inner_shots: D_in, support examples per task.
        query_shots: D_o, query examples per task.
        hessian_shots: D_h, Hessian-set examples per task (``None`` for FO-MAML).
        step_tasks: B', tasks of the step-size estimate.
        step_shots: D_beta, examples per task of the step-size estimate.
        delta_coefficient: HF-MAML's ``delta_i = delta_coefficient / ||v_i||`` (``inf`` when
            ``rho = 0``: the finite difference is then exact for any delta); ``None`` otherwise.
        step_size_constant: c of ``beta_k = c / L~(w_k)``.
        max_step: ``c / (4 L)`` (N steps: ``c / ((1 + 1/N)^(2N) L)``), the step when
            ``rho alpha ||grad f_i||`` is negligible.
        iterations: The iteration bound, rounded up, with its O(1) factor ``iteration_constant``.
        rounded_S: S with the rounded batch sizes.
        guaranteed: The bound with the rounded batch sizes (at most eps).
    """

    constants: VariantConstants
    shared: SharedConstants
    L: float
    rho: float
    sigma: float
    sigma_tilde: float
    sigma_H: float
    inner_lr: float
    eps: float
    Delta: float
    iteration_constant: float
    inner_steps: int
    inner_lr_max: float
    floor_sqrt: float
    floor_linear: float
    floor: float
    bias_term: float
    cap_sqrt: float
    cap_linear: float
    budget: float
    raw_task_batch: float
    task_batch: int
    raw_inner_shots: float
    inner_shots: int
    raw_query_shots: float
    query_shots: int
    raw_hessian_shots: float | None
    hessian_shots: int | None
    raw_step_tasks: float
    step_tasks: int
    raw_step_shots: float
    step_shots: int
    delta_coefficient: float | None
    step_size_constant: float
    max_step: float
    raw_iterations: float
    iterations: int
    rounded_S: float
    guaranteed: float

    @property
    def share(self) -> float:
        """Each of the three batch terms' share of the budget."""
        return self.budget / S_SHARES

    @property
    def lines(self) -> list[Line]:
        """The plan as explained rows (:func:`explain_plan`)."""
        return explain_plan(self)


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


def compute_plan(
    constants: VariantConstants,
    L: float,
    rho: float,
    sigma: float,
    sigma_tilde: float,
    sigma_H: float,
    inner_lr: float,
    eps: float,
    Delta: float = 1.0,
    iteration_constant: float = 1.0,
    shared: SharedConstants | None = None,
    inner_steps: int = 1,
) -> VariantPlan:
    """The batch sizes, step size and iteration bound of one variant for a target eps.

    Args:
        constants: The variant's constants (``lightning_maml.variants.get(name).theory``, or
            e.g. ``MAML_CONSTANTS`` with another value: ``dataclasses.replace``).
        L: Smoothness of the task losses.
        rho: Lipschitz constant of the task Hessians.
        sigma: Task-gradient spread.
        sigma_tilde: Within-task gradient spread.
        sigma_H: Within-task Hessian spread.
        inner_lr: The inner step size alpha.
        eps: The target ``E||grad F|| <= eps``.
        Delta: ``F(w_0) - min F`` for the iteration bound (1: the bound per unit of Delta).
        iteration_constant: The theorem's unspecified O(1) factor in the iteration bound.
        shared: The shared constants (default: ``SharedConstants()``, Fallah et al. 2020).
        inner_steps: N, the inner steps per task (:mod:`lightning_maml.theory.multistep`).

    Returns:
        The plan's numbers; :func:`explain_plan` says how each was obtained.

    Raises:
        ValueError: On constants that are not a ``VariantConstants`` or an invalid value.
        Unreachable: If eps is below the variant's floor (FO-MAML).
    """
    if not isinstance(constants, VariantConstants):
        raise ValueError(
            "compute_plan takes a variant's VariantConstants (lightning_maml.variants."
            f"get(name).theory), got {type(constants).__name__}."
        )
    # NaN passes every comparison: it would surface as "cannot convert float NaN to integer".
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}.")
    values = {"L": L, "inner_lr": inner_lr, "eps": eps, "Delta": Delta}
    values["iteration_constant"] = iteration_constant
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    spreads = {"rho": rho, "sigma": sigma, "sigma_tilde": sigma_tilde, "sigma_H": sigma_H}
    for name, value in spreads.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    k = constants
    shared = shared or SharedConstants()
    alpha = inner_lr

    def error_terms(alpha: float, s: float) -> tuple[float, float]:
        """The two terms of the bound for S = s (the bias term added)."""
        total = s + k.bias * alpha**2 * L**2 * sigma**2
        return (
            math.sqrt(k.error_sqrt * (1 + rho * alpha * sigma / L) * total),
            k.error_linear * rho * alpha * total / L,
        )

    bias_term = k.bias * alpha**2 * L**2 * sigma**2
    floor_sqrt, floor_linear = error_terms(alpha, 0.0)
    floor = max(floor_sqrt, floor_linear)
    if k.bias and floor >= eps:
        low, high = 0.0, alpha
        for _ in range(100):  # the floor grows with alpha: bisect for the alpha that meets eps
            mid = (low + high) / 2
            low, high = (mid, high) if max(error_terms(mid, 0.0)) < eps else (low, mid)
        raise Unreachable(
            floor,
            low,
            eps=eps,
            inner_lr=alpha,
            bias=k.bias,
            bias_term=bias_term,
            floor_sqrt=floor_sqrt,
            floor_linear=floor_linear,
        )

    # The largest S that keeps both error terms at or below eps.
    cap_sqrt = eps**2 / (k.error_sqrt * (1 + rho * alpha * sigma / L))
    cap_linear = eps * L / (k.error_linear * rho * alpha) if rho > 0 else math.inf
    budget = min(cap_sqrt, cap_linear) - bias_term
    share = budget / S_SHARES

    raw_task_batch = sigma**2 / share
    task_batch = _ceil(raw_task_batch, shared.min_task_batch)
    raw_inner_shots = sigma_tilde**2 / share
    raw_query_shots = sigma_tilde**2 / (task_batch * share)
    raw_hessian_shots = (
        None if k.hessian_batch is None else k.hessian_batch * (alpha * sigma_H) ** 2
    )
    (raw_step_tasks, step_tasks), (raw_step_shots, step_shots) = step_size_batches(
        L, rho, sigma, sigma_tilde, alpha, shared
    )
    delta_coefficient = None
    if k.finite_difference:
        delta_coefficient = 1.0 / (shared.delta_denominator * rho * alpha) if rho > 0 else math.inf
    smoothness = curvature_factor(inner_steps) / 4 * L  # L itself at N = 1
    chain = hessian_chain_factor(inner_steps)  # 1 at N = 1
    raw_iterations = (
        iteration_constant * Delta * (smoothness + chain * rho * alpha * (sigma + eps)) / eps**2
    )
    inner_shots, query_shots = _ceil(raw_inner_shots), _ceil(raw_query_shots)
    rounded_S = (
        sigma**2 / task_batch
        + sigma_tilde**2 / (task_batch * query_shots)
        + sigma_tilde**2 / inner_shots
    )
    return VariantPlan(
        constants=k,
        shared=shared,
        L=L,
        rho=rho,
        sigma=sigma,
        sigma_tilde=sigma_tilde,
        sigma_H=sigma_H,
        inner_lr=alpha,
        eps=eps,
        Delta=Delta,
        iteration_constant=iteration_constant,
        inner_steps=inner_steps,
        inner_lr_max=inner_lr_bound(k.inner_lr_factor, L, inner_steps),
        floor_sqrt=floor_sqrt,
        floor_linear=floor_linear,
        floor=floor,
        bias_term=bias_term,
        cap_sqrt=cap_sqrt,
        cap_linear=cap_linear,
        budget=budget,
        raw_task_batch=raw_task_batch,
        task_batch=task_batch,
        raw_inner_shots=raw_inner_shots,
        inner_shots=inner_shots,
        raw_query_shots=raw_query_shots,
        query_shots=query_shots,
        raw_hessian_shots=raw_hessian_shots,
        hessian_shots=None if raw_hessian_shots is None else _ceil(raw_hessian_shots),
        raw_step_tasks=raw_step_tasks,
        step_tasks=step_tasks,
        raw_step_shots=raw_step_shots,
        step_shots=step_shots,
        delta_coefficient=delta_coefficient,
        step_size_constant=k.step_size,
        max_step=k.step_size / (curvature_factor(inner_steps) * L),
        raw_iterations=raw_iterations,
        iterations=_ceil(raw_iterations),
        rounded_S=rounded_S,
        guaranteed=max(error_terms(alpha, rounded_S)),
    )


# -- the explanation ---------------------------------------------------------------------------


def _floor_how(bias: float, bias_term: float, floor_sqrt: float, floor_linear: float) -> str:
    return (
        f"S gains {_g(bias)} alpha^2 L^2 sigma^2 = {_g(bias_term)}, which no batch size "
        f"removes: max(sqrt term {_g(floor_sqrt)}, linear term {_g(floor_linear)})"
    )


def explain_plan(plan: VariantPlan) -> list[Line]:
    """The plan as rows: each quantity, its value, and how it was obtained."""
    k, shared, alpha = plan.constants, plan.shared, plan.inner_lr
    inside = alpha <= plan.inner_lr_max
    lines = [
        Line(
            "inner_lr",
            f"{_g(alpha)} in (0, {_g(plan.inner_lr_max)}]"
            if inside
            else f"{_g(alpha)} > {_g(plan.inner_lr_max)}",
            (
                f"the theorem needs inner_lr <= {_g(k.inner_lr_factor)} / L"
                if plan.inner_steps == 1
                else f"inner_lr <= {_g(k.inner_lr_factor)} / (N L), N = {plan.inner_steps} "
                "(Ji et al. 2022's 1/N scaling; multistep module)"
            )
            + ("" if inside else "; OUTSIDE the range: the bound below does not apply"),
        )
    ]
    if k.bias:
        floor_how = _floor_how(k.bias, plan.bias_term, plan.floor_sqrt, plan.floor_linear)
        lines.append(Line("floor", _g(plan.floor), floor_how))
    binding = "sqrt term" if plan.cap_sqrt <= plan.cap_linear else "linear term"
    lines.append(
        Line(
            "S budget",
            _g(plan.budget),
            f"min(eps^2 / ({_g(k.error_sqrt)} (1 + rho alpha sigma / L)) = {_g(plan.cap_sqrt)}, "
            f"eps L / ({_g(k.error_linear)} rho alpha) = {_g(plan.cap_linear)})"
            + (f" - bias {_g(plan.bias_term)}" if k.bias else "")
            + f"; the {binding} binds; split in {S_SHARES} equal shares",
        )
    )
    lines.append(
        Line(
            "B",
            str(plan.task_batch),
            f"sigma^2 / share = {_g(plan.raw_task_batch)} -> {_ceil(plan.raw_task_batch)}; "
            + (
                f"B >= {shared.min_task_batch} dominates"
                if plan.task_batch == shared.min_task_batch
                else "the task spread dominates"
            ),
        )
    )
    lines.append(
        Line(
            "D_in",
            str(plan.inner_shots),
            f"sigma_tilde^2 / share = {_g(plan.raw_inner_shots)} -> {plan.inner_shots}",
        )
    )
    lines.append(
        Line(
            "D_o",
            str(plan.query_shots),
            f"sigma_tilde^2 / (B share) = {_g(plan.raw_query_shots)} -> {plan.query_shots}",
        )
    )
    if plan.hessian_shots is not None:
        lines.append(
            Line(
                "D_h",
                str(plan.hessian_shots),
                f"{_g(cast(float, k.hessian_batch))} (alpha sigma_H)^2 = {_g(cast(float, plan.raw_hessian_shots))} -> "
                f"{plan.hessian_shots}",
            )
        )
    lines.append(
        Line(
            "B'",
            str(plan.step_tasks),
            f"{_g(shared.step_task_batch)} (rho alpha sigma / L)^2 = {_g(plan.raw_step_tasks)} "
            f"-> {plan.step_tasks}",
        )
    )
    lines.append(
        Line(
            "D_beta",
            str(plan.step_shots),
            f"({_g(shared.step_data_batch)} rho alpha sigma_tilde / L)^2 = "
            f"{_g(plan.raw_step_shots)} -> {plan.step_shots}",
        )
    )
    if plan.delta_coefficient is not None:
        if plan.rho > 0:
            coefficient = _g(plan.delta_coefficient)
            how = f"1 / ({_g(shared.delta_denominator)} rho alpha ||v||) = {coefficient} / ||v||"
            lines.append(Line("delta", f"{coefficient} / ||v||", how))
        else:
            lines.append(
                Line("delta", "any", "rho = 0: the finite difference is exact for any delta")
            )
    lines.append(
        Line(
            "c",
            _g(k.step_size),
            f"beta_k = c / L~(w_k) <= c / (4 L) = {_g(plan.max_step)}"
            if plan.inner_steps == 1
            else f"beta_k = c / L~(w_k) <= c / ((1 + 1/N)^(2N) L) = {_g(plan.max_step)}",
        )
    )
    lines.append(
        Line(
            "iterations",
            str(plan.iterations),
            (
                "O(1) Delta (L + rho alpha (sigma + eps)) / eps^2"
                if plan.inner_steps == 1
                else "O(1) Delta ((1 + 1/N)^(2N) L / 4 + N (1 + 1/N)^(3N - 3) rho alpha "
                "(sigma + eps)) / eps^2"
            )
            + f" = {_g(plan.raw_iterations)} with "
            f"O(1) = {_g(plan.iteration_constant)}, Delta = {_g(plan.Delta)}",
        )
    )
    lines.append(
        Line(
            "bound",
            _g(plan.guaranteed),
            f"max(sqrt term, linear term) with the rounded sizes (S = {_g(plan.rounded_S)}) "
            f"<= eps = {_g(plan.eps)}",
        )
    )
    return lines


def explain_refusal(
    refusal: Unreachable, title: str = "This variant", alternatives: Sequence[str] = ()
) -> str:
    """Why eps is out of reach, and what would reach it.

    Args:
        refusal: The refusal.
        title: The variant's display name.
        alternatives: The display names of variants whose bounds have no floor.
    """
    floor_how = _floor_how(
        refusal.bias, refusal.bias_term, refusal.floor_sqrt, refusal.floor_linear
    )
    needed = f"inner_lr <= {_g(refusal.inner_lr_needed)}"
    if alternatives:
        remedies = (
            f"{needed}, a family with a smaller task spread sigma, or "
            f"{' / '.join(alternatives)}, whose bounds have no floor"
        )
    else:
        remedies = f"{needed} or a family with a smaller task spread sigma"
    return (
        f"{title} cannot reach eps = {_g(refusal.eps)} at inner_lr = {_g(refusal.inner_lr)}: "
        f"its bound has the floor {_g(refusal.floor)} ({floor_how}; it holds even with infinite "
        f"batches). Use {remedies}."
    )


def format_plan(plan: VariantPlan, title: str) -> str:
    """The plan as an aligned text table under a title line (the variant's display name)."""
    lines = explain_plan(plan)
    width = max(len(line.name) for line in lines)
    value_width = max(len(line.value) for line in lines)
    rows = [f"{line.name:<{width}}  {line.value:<{value_width}}  {line.how}" for line in lines]
    return "\n".join([title, *rows])
