"""MAML: the exact second-order meta-gradient."""

from __future__ import annotations

from torch import Tensor
from torch.func import grad

from lightning_maml.algorithms.base import MetaAlgorithm, query_stats
from lightning_maml.functional import Params, TaskModel

__all__ = ["MAML"]


class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning with the exact meta-gradient.

    Update rule (one inner step, tasks i of the meta-batch B_k):
    ``w_{k+1} = w_k - beta_k / B * sum_i (I - alpha hess f_i(w_k, D_h)) grad f_i(w_k - alpha grad f_i(w_k, D_in), D_o)``.

    With ``inner_steps = k > 1`` the meta-gradient is the derivative through all k inner steps,
    ``prod_j (I - alpha hess f_i(w_j)) grad f_i(w_k, D_o)``. ``hessian_batch="inner"`` takes
    the Hessians on the support set ``D_in`` (Finn et al. 2017: backpropagation through the
    inner loop; a biased estimate of grad F); ``"independent"`` takes them on the task's own
    Hessian set ``D_h`` (the unbiased estimator of Fallah et al. 2020) while the inner steps
    themselves still use ``D_in``. The cost is a double backward per inner step.

    Args:
        inner_lr: The inner step size alpha (> 0).
        inner_steps: The number of inner steps (>= 1).
        hessian_batch: ``"inner"`` or ``"independent"``.
        task_chunk_size: Tasks per vectorised call (see :class:`MetaAlgorithm`).
        track_loss_before: Also report the pre-adaptation query loss (see :class:`MetaAlgorithm`).
        compile: Compile the per-chunk computation with ``torch.compile`` (see :class:`MetaAlgorithm`).

    References:
        C. Finn, P. Abbeel, S. Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks. ICML 2017.
        A. Fallah, A. Mokhtari, A. Ozdaglar. On the Convergence Theory of Gradient-Based
        Model-Agnostic Meta-Learning Algorithms. AISTATS 2020 (Algorithm 1, MAML).
    """

    def task_meta_gradient(
        self, task: TaskModel, params: Params, data: dict[str, Tensor]
    ) -> tuple[Params, dict[str, Tensor]]:
        hessian = (
            (data["hessian_x"], data["hessian_y"]) if self.hessian_batch == "independent" else None
        )

        def objective(p: Params) -> tuple[Tensor, dict[str, Tensor]]:
            adapted, trajectory = task.adapt(
                p, data["support_x"], data["support_y"], self.inner_lr, self.inner_steps, hessian
            )
            loss, prediction = task.loss_and_prediction(adapted, data["query_x"], data["query_y"])
            return loss, query_stats(
                task, p, trajectory, loss, prediction, data, self.track_loss_before
            )

        # Per task, then vmapped by the base class. The other order, one grad of the vmapped
        # sum, gets BatchNorm's double backward wrong in torch.func (measured: conv biases
        # before BatchNorm, whose true gradient is 0, got 1e-3; see tests/test_algorithms.py).
        return grad(objective, has_aux=True)(params)
