"""First-order MAML: the meta-gradient without Hessian terms."""

from __future__ import annotations

from torch import Tensor

from lightning_maml.algorithms.base import ChunkSize, CompileMode, MetaAlgorithm
from lightning_maml.functional import Params, TaskModel
from lightning_maml.inner import InnerUpdate

__all__ = ["FOMAML"]


class FOMAML(MetaAlgorithm):
    """First-order MAML: the outer gradient at the adapted point, every Hessian dropped.

    Update rule: ``w_{k+1} = w_k - beta_k / B * sum_i grad f_i(w_k - alpha grad f_i(w_k, D_in), D_o)``
    (with k inner steps, the gradient at the k-th adapted point).

    Cheapest of the three, but Fallah et al. 2020 show that its error does not vanish with
    larger batches: it stalls at a floor of order ``alpha * L * sigma`` (task spread sigma).

    Args:
        inner_lr: The inner step size alpha (> 0).
        inner_steps: The number of inner steps (>= 1).
        task_chunk_size: Tasks per vectorised call (see :class:`MetaAlgorithm`).
        track_loss_before: Also report the pre-adaptation query loss (see :class:`MetaAlgorithm`).
        compile: Compile the per-chunk computation with ``torch.compile`` (see :class:`MetaAlgorithm`).

    References:
        C. Finn, P. Abbeel, S. Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks. ICML 2017 (first-order approximation).
        A. Fallah, A. Mokhtari, A. Ozdaglar. On the Convergence Theory of Gradient-Based
        Model-Agnostic Meta-Learning Algorithms. AISTATS 2020 (Section 5, FO-MAML).
    """

    def __init__(
        self,
        inner_lr: float,
        inner_steps: int = 1,
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

    def task_meta_gradient(
        self, task: TaskModel, params: Params, rates: Params, data: dict[str, Tensor]
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        outer, trajectory, stats = self.outer_gradient(task, params, rates, data, keep_points=False)
        # Without Hessians the meta-gradient is v at every step back: alpha_j's gradient is
        # -grad f_in(w_j) (.) v.
        cotangents = [{n: -g[n] * outer[n] for n in g} for g in trajectory.grads]
        return outer, self.inner_update.rate_gradient(rates, self.inner_steps, cotangents), stats
