"""The theory's adaptive step size ``beta_k = c / L~(w_k)`` (Fallah et al. 2020).

The MAML objective F is only locally smooth, ``||grad F(w) - grad F(u)|| <= L(w) ||w - u||``
with ``L(w) = 4 L + 2 rho alpha E_i ||grad f_i(w)||``, so the step is set from an estimate of
``L(w_k)`` on a task batch B' of its own, with data batches D_beta:

    L~(w_k) = 4 L + 2 rho alpha (1 / B') sum_j || grad~f_j(w_k, D_beta^j) ||
    beta_k  = c / L~(w_k)

with c per variant (``step_size`` of its :class:`~lightning_maml.theory.VariantConstants`;
:func:`lightning_maml.variants.theory_constants` finds an algorithm's). With N inner steps the 4
becomes ``(1 + 1/N)^(2N)`` and the rho term grows by ``N (1 + 1/N)^(3(N - 1))``
(:mod:`lightning_maml.theory.multistep`, after Ji, Yang, Liang 2022; both 1-step values at N = 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad

from lightning_maml.functional import LossFn, Params, TaskModel, map_tasks, tree_norm
from lightning_maml.theory.multistep import curvature_factor, hessian_chain_factor

__all__ = ["local_smoothness", "task_gradient_norms", "theory_step_size"]


def local_smoothness(
    L: float, rho: float, inner_lr: float, grad_norms: Tensor | None, inner_steps: int = 1
) -> float:
    """``L~(w) = 4 L + 2 rho alpha mean_j ||grad~f_j(w, D_beta^j)||``, F's local smoothness.

    With N inner steps: ``(1 + 1/N)^(2N) L + N (1 + 1/N)^(3(N - 1)) 2 rho alpha mean_j ||...||``
    (:mod:`lightning_maml.theory.multistep`).

    Args:
        L: The smoothness constant of each task loss.
        rho: The Lipschitz constant of each task's Hessian.
        inner_lr: The inner step size alpha.
        grad_norms: The gradient norms of the B' tasks of the estimate; may be ``None`` when
            ``rho == 0``, where they do not enter.
        inner_steps: N, the inner steps per task.
    """
    smooth = curvature_factor(inner_steps) * L
    if rho == 0:
        return smooth
    if grad_norms is None or grad_norms.numel() == 0:
        raise ValueError("rho > 0 needs the gradient norms of at least one task.")
    chain = hessian_chain_factor(inner_steps)
    return smooth + chain * 2.0 * rho * inner_lr * grad_norms.double().mean().item()


def theory_step_size(
    L: float,
    rho: float,
    inner_lr: float,
    c: float,
    grad_norms: Tensor | None,
    inner_steps: int = 1,
) -> tuple[float, float]:
    """The step size ``beta_k = c / L~(w_k)`` and ``L~(w_k)`` (Fallah et al. 2020).

    Args:
        L: The smoothness constant of each task loss.
        rho: The Lipschitz constant of each task's Hessian.
        inner_lr: The inner step size alpha.
        c: The variant's constant (``VariantConstants.step_size``).
        grad_norms: See :func:`local_smoothness`.
        inner_steps: N, the inner steps per task.

    Returns:
        ``(beta_k, L~(w_k))``.
    """
    L_tilde = local_smoothness(L, rho, inner_lr, grad_norms, inner_steps)
    return c / L_tilde, L_tilde


def task_gradient_norms(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    """``||grad f_j(w, D_j)||`` for each task j of a batch, at the model's weights.

    Args:
        model: The model at ``w``.
        loss_fn: The task loss.
        x: Inputs shaped ``(tasks, examples, ...)``.
        y: Targets shaped ``(tasks, examples, ...)``.

    Returns:
        The norms, shaped ``(tasks,)``.
    """
    task = TaskModel(model, loss_fn)

    def norm(params: Params, data: dict[str, Tensor]) -> Tensor:
        return tree_norm(grad(task.loss)(params, data["x"], data["y"]))

    with torch.no_grad():  # torch.func.grad differentiates regardless
        return map_tasks(norm, task.params(), {"x": x, "y": y})
