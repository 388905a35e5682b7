"""Reptile: the meta-gradient is the way back from the adapted point."""

from __future__ import annotations

from torch import Tensor

from lightning_maml.algorithms.base import (
    ChunkSize,
    CompileMode,
    MetaAlgorithm,
    Supports,
    query_stats,
)
from lightning_maml.functional import Params, TaskModel
from lightning_maml.inner import InnerUpdate

__all__ = ["Reptile"]


class Reptile(MetaAlgorithm):
    """Reptile: move the meta-parameters towards each task's adapted parameters.

    Update rule: ``w <- w - beta / B * sum_i (w - W_i)``, with ``W_i`` the parameters after
    ``inner_steps`` steps of gradient descent on task i's support set: the meta-gradient is
    ``w - W_i``, no gradient is taken at the adapted point and nothing is differentiated
    through the inner loop. With the meta-optimizer ``torch.optim.SGD(lr=epsilon)`` this is
    Nichol et al.'s batched update ``w <- w + epsilon (mean_i W_i - w)``; with Adam (the
    learner's default), Adam applied to that direction. Reptile needs several inner steps (with
    one, ``w - W_i`` is ``inner_lr`` times the support gradient: joint training). The query set
    only scores the adapted model.

    Args:
        inner_lr: The inner step size alpha (> 0).
        inner_steps: The number of inner steps (>= 1; Reptile uses several).
        task_chunk_size: Tasks per vectorised call (see :class:`MetaAlgorithm`).
        track_loss_before: Also report the pre-adaptation query loss (see :class:`MetaAlgorithm`).
        compile: Compile the per-chunk computation with ``torch.compile`` (see :class:`MetaAlgorithm`).
        inner_update: Which parameters adapt (default: all, with ``inner_lr``); its step sizes
            cannot be learned, as ``w - W_i`` is not the gradient of a loss they change.

    References:
        A. Nichol, J. Achiam, J. Schulman. On First-Order Meta-Learning Algorithms.
        arXiv:1803.02999, 2018.
    """

    def __init__(
        self,
        inner_lr: float,
        inner_steps: int = 5,
        task_chunk_size: ChunkSize = "auto",
        track_loss_before: bool = False,
        compile: bool | CompileMode = False,
        inner_update: InnerUpdate | None = None,
    ) -> None:
        super().__init__(
            inner_lr,
            inner_steps,
            "inner",
            task_chunk_size,
            track_loss_before,
            compile,
            inner_update,
        )

    def supports(self) -> Supports:
        return Supports(
            rates=False,
            note=": its meta-gradient w - W is not the gradient of a loss, so it gives them none",
        )

    def task_meta_gradient(
        self, task: TaskModel, params: Params, rates: Params, data: dict[str, Tensor]
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        adapted, trajectory, query = self.adapt(task, params, rates, data)
        loss, prediction = query(adapted)
        stats = query_stats(
            task, params, trajectory, loss, prediction, data, self.track_loss_before
        )
        return {n: params[n] - adapted[n] for n in params}, {}, stats
