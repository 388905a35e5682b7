"""Multi-step MAML: how the theory's conditions change with N inner steps per task.

Fallah et al. 2020 cover one inner step. Ji, Yang and Liang (JMLR 2022) extend the analysis to N
steps; their finding, as their abstracts state it (quoted below): the inner step size must shrink
like 1/N, and then N-step MAML converges with a complexity linear in N. The mechanism, as this
project models it: after N inner steps the Jacobian of the adapted point,
``prod_j (I - alpha hess f_i(u_j))``, has norm up to ``(1 + alpha L)^N``, so the smoothness of F
(and with it the meta step size) degrades exponentially in N unless alpha shrinks like 1/N; with
``alpha <= c_alpha / (N L)`` the factor stays below ``e^(2 c_alpha)`` and N-step MAML keeps the
one-step ``O(1 / eps^2)`` iteration complexity, each iteration costing N inner gradients.

What Ji et al.'s text says, as far as it could be read here. The theorem statements (the
constant in their inner step size condition, the meta step size, the batch sizes, the Lipschitz
bound of the N-step meta-gradient) could NOT be read: the stored copies of the paper (the JMLR
text, ar5iv, and the arXiv v1 page at groundai.com) were reachable only through their opening,
the title, abstract and the start of the introduction. No theorem number or constant of theirs is
therefore quoted or used here. What the abstracts state, and what this module makes of it:

- JMLR abstract: "our results suggest that an inner-stage stepsize needs to be chosen inversely
  proportional to the number N of inner-stage steps in order for N-step MAML to have guaranteed
  convergence". Hence ``alpha <= inner_lr_factor / (N L)``. The 1/N is theirs; the factor is
  the variant's one-step ``inner_lr_factor`` of Fallah et al. 2020, so that N = 1 is Fallah et
  al.'s condition. Ji et al.'s own constant could not be read and is not used.
- arXiv v1 abstract (2002.07836v1): "the estimation bias and variance of the stochastic meta
  gradient involve exponential factors of [N] ..., MAML still attains the convergence with
  complexity increasing only linearly with [N] with a properly chosen inner stepsize"; v2:
  "N-step MAML attains the convergence with linearly increasing complexity with N". The factors
  below grow exponentially in N at a fixed alpha and stay bounded at ``alpha = 1/(N L)``, so that
  the planned iteration count stays bounded in N and the cost, N inner gradients per task and
  iteration, grows linearly (``tests/theory/test_theory_multistep.py`` checks both). That is the
  order the abstracts state; the constants are this project's.
- The smoothness factor ``(1 + 1/N)^(2N)`` replacing Fallah et al.'s 4 in ``L~ = 4 L + ...``:
  the bound ``(1 + alpha L)^(2N)`` on the squared norm of the adapted point's Jacobian
  ``prod_j (I - alpha hess f_i(u_j))`` at the largest alpha of MAML's range, ``1 / (N L)``; at
  N = 1 it is 4, and it stays below ``e^2``. This project's own arithmetic, not Ji et al.'s
  constant.
- The rho term ``2 rho alpha E||grad f_i||`` of ``L~`` multiplied by ``N (1 + 1/N)^(3(N - 1))``:
  the chain rule through N Hessians, each rho-Lipschitz, at the same largest alpha, normalised
  so that N = 1 gives Fallah et al.'s term. This project's own arithmetic.
- The batch sizes: Fallah et al.'s one-step conditions, unchanged. With alpha of order 1/N the
  exponential factors the v1 abstract names are bounded by constants, so their orders are
  unchanged; the constants Ji et al. give for them could not be read.
- The iteration bound: Fallah et al.'s with L replaced by ``L (1 + 1/N)^(2N) / 4``, the
  smoothness ratio (1 at N = 1), and the rho term scaled as in ``L~``.

References:
    K. Ji, J. Yang, Y. Liang. Theoretical Convergence of Multi-Step Model-Agnostic
    Meta-Learning. JMLR 23, 2022 (arXiv 2002.07836; v1 titled Multi-Step Model-Agnostic
    Meta-Learning: Convergence and Improved Algorithms).
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
