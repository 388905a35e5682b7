"""Multi-step MAML: how the theory's conditions change with N inner steps per task.

Fallah et al. 2020 cover one inner step. Ji, Yang and Liang (JMLR 2022) extend the analysis to N
steps. Their central finding, used here: after N inner steps the Jacobian of the adapted point,
``prod_j (I - alpha hess f_i(u_j))``, has norm up to ``(1 + alpha L)^N``, so the smoothness of F
(and with it the meta step size) degrades exponentially in N unless the inner step size shrinks
like 1/N; with ``alpha <= c_alpha / (N L)`` the factor stays below ``e^(2 c_alpha)`` and N-step
MAML keeps the one-step ``O(1 / eps^2)`` iteration complexity, each iteration costing N inner
gradients.

What this module takes, and from where (read it before relying on a number):

- ``alpha <= inner_lr_factor / (N L)``: the 1/N scaling is Ji et al.'s; the factor is the
  variant's one-step ``inner_lr_factor`` of Fallah et al. 2020, so N = 1 is their condition.
  NOT CHECKED against Ji et al.'s text (no copy was at hand): their own constant in
  ``alpha = O(1/(N L))`` is recalled only as being of the order of 1/8, and is not used.
- The smoothness factor ``(1 + 1/N)^(2N)`` replacing Fallah et al.'s 4 in ``L~ = 4 L + ...``:
  the bound ``(1 + alpha L)^(2N)`` on the squared Jacobian norm, at the largest alpha of MAML's
  range, ``1 / (N L)``. At N = 1 it is 4. This project's own arithmetic in the form of Ji et
  al.'s Lipschitz bound, not their constant.
- The rho term ``2 rho alpha E||grad f_i||`` of ``L~`` multiplied by ``N (1 + 1/N)^(3(N - 1))``:
  the chain rule through N Hessians, each rho-Lipschitz, at the same largest alpha, normalised
  so that N = 1 gives Fallah et al.'s term. This project's own arithmetic; Ji et al.'s constant
  (recalled as growing like ``(1 + alpha L)^(4N)``) NOT CHECKED.
- The batch sizes: Fallah et al.'s one-step conditions, unchanged. Ji et al. report the same
  ``O(1 / eps^2)`` orders for B and the data batches when alpha = O(1/N) (from memory, NOT
  CHECKED); their constants are not used.
- The iteration bound: Fallah et al.'s with L replaced by ``L (1 + 1/N)^(2N) / 4``, the
  smoothness ratio (1 at N = 1), and the rho term scaled as in ``L~``.

References:
    K. Ji, J. Yang, Y. Liang. Theoretical Convergence of Multi-Step Model-Agnostic
    Meta-Learning. JMLR 23, 2022 (arXiv 2002.07836).
    A. Fallah, A. Mokhtari, A. Ozdaglar. On the Convergence Theory of Gradient-Based
    Model-Agnostic Meta-Learning Algorithms. AISTATS 2020.
"""

from __future__ import annotations

__all__ = ["curvature_factor", "hessian_chain_factor", "inner_lr_bound"]


def _check(inner_steps: int) -> None:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}.")


def curvature_factor(inner_steps: int) -> float:
    """``(1 + 1/N)^(2N)``: the factor of L in F's local smoothness (4 at N = 1)."""
    _check(inner_steps)
    return (1.0 + 1.0 / inner_steps) ** (2 * inner_steps)


def hessian_chain_factor(inner_steps: int) -> float:
    """``N (1 + 1/N)^(3(N - 1))``: the growth of the rho term with N (1 at N = 1)."""
    _check(inner_steps)
    return inner_steps * (1.0 + 1.0 / inner_steps) ** (3 * (inner_steps - 1))


def inner_lr_bound(inner_lr_factor: float, L: float, inner_steps: int) -> float:
    """``inner_lr_factor / (N L)``: the largest inner step size for N inner steps."""
    _check(inner_steps)
    return inner_lr_factor / (inner_steps * L)
