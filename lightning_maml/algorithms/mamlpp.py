"""MAML++: MAML with learned per-step inner loops, the multi-step loss and derivative annealing."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_maml.algorithms.base import ChunkSize, CompileMode, HessianBatch
from lightning_maml.algorithms.maml import MAML
from lightning_maml.checks import check_int
from lightning_maml.inner import InnerUpdate, PerStepRates

__all__ = ["MAMLPlusPlus"]


class MAMLPlusPlus(MAML):
    """MAML++: MAML made stable and fast to train by five changes of Antoniou et al.

    Update rule: ``w <- w - beta grad sum_j m_j(t) f_o(phi_{j+1}, D_o)``, differentiated with
    respect to ``w`` and the inner update's learned tensors, where ``phi_{j+1}`` is the point
    after inner step ``j`` of ``phi_{j+1} = phi_j - alpha_j (.) grad f_in(phi_j)`` and
    ``m(t)`` the multi-step loss weights at meta-step ``t``. The changes, each a setting:

    - learned per-layer per-step step sizes (LSLR) and per-step BatchNorm weights and biases
      (BNWB): the default inner update, ``PerStepRates(batch_norm=True)``;
    - the multi-step loss (MSL): the query loss after every inner step, weighted; the weights
      start equal (``1/k``) and move linearly to the last step over ``multi_step_loss_steps``
      meta-steps, the others keeping at least ``min_step_weight / k``; after that, the last
      step alone;
    - derivative-order annealing (DA): first-order meta-gradients (inner gradients treated as
      constants, the step sizes still learned) for the first ``first_order_steps`` meta-steps,
      second-order after;
    - cosine annealing of the meta learning rate (CA) is a scheduler of the learner
      (``lr_scheduler``), as in the recipes.

    MAML++'s per-step running statistics (BNRS) have no counterpart: the models here normalize
    with each batch's statistics (``track_running_stats=False``). It is :class:`~lightning_maml.MAML`
    (``backward="graph"``) with the multi-step loss weights and the derivative order chosen at
    each meta-step: one objective serves both.

    Args:
        inner_lr: The starting value of the learned step sizes.
        inner_steps: The number of inner steps k, in training and evaluation alike.
        multi_step_loss_steps: Meta-steps over which the multi-step loss anneals to the last
            step (0: the last step's loss only, from the start).
        first_order_steps: Meta-steps of first-order meta-gradients before second-order ones.
        min_step_weight: The floor of a non-final step's multi-step loss weight, times ``k``
            (0.03 in the paper's code, 0.01 in the authors' released configurations).
        hessian_batch: ``"inner"`` or ``"independent"`` (see :class:`~lightning_maml.MAML`).
        task_chunk_size: Tasks per vectorised call (see :class:`MetaAlgorithm`).
        track_loss_before: Also report the pre-adaptation query loss (see :class:`MetaAlgorithm`).
        compile: Compile the per-chunk computation with ``torch.compile`` (see :class:`MetaAlgorithm`).
        inner_update: The inner update (default ``PerStepRates(batch_norm=True)``; pass
            ``PerStepRates()`` to leave BatchNorm alone or ``InnerUpdate()`` for fixed steps).

    References:
        A. Antoniou, H. Edwards, A. Storkey. How to Train Your MAML. ICLR 2019.
    """

    def __init__(
        self,
        inner_lr: float,
        inner_steps: int = 5,
        multi_step_loss_steps: int = 0,
        first_order_steps: int = 0,
        min_step_weight: float = 0.03,
        hessian_batch: HessianBatch = "inner",
        task_chunk_size: ChunkSize = "auto",
        track_loss_before: bool = False,
        compile: bool | CompileMode = False,
        inner_update: InnerUpdate | None = None,
    ) -> None:
        if inner_update is None:
            inner_update = PerStepRates(batch_norm=True)
        super().__init__(
            inner_lr,
            inner_steps,
            hessian_batch,
            task_chunk_size,
            track_loss_before,
            compile,
            inner_update=inner_update,
        )
        self.multi_step_loss_steps = check_int("multi_step_loss_steps", multi_step_loss_steps, 0)
        self.first_order_steps = check_int("first_order_steps", first_order_steps, 0)
        if isinstance(min_step_weight, bool) or not 0 <= min_step_weight <= 1:
            raise ValueError(f"min_step_weight must be within [0, 1], got {min_step_weight!r}.")
        self.min_step_weight = float(min_step_weight)

    def step_weights(self, step: int | None) -> Tensor | None:
        """The multi-step loss weights at meta-step ``step``; ``None`` once only the last counts."""
        k = self.inner_steps
        t = 0 if step is None else step
        if t >= self.multi_step_loss_steps or k == 1:
            return None
        floor = self.min_step_weight / k
        early = max(1.0 / k - t / (k * self.multi_step_loss_steps), floor)
        return torch.tensor([early] * (k - 1) + [1.0 - early * (k - 1)])

    def step_args(self, step: int | None) -> tuple:
        second_order = step is not None and step >= self.first_order_steps
        return self.step_weights(step), second_order
