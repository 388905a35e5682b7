"""Per-step inner-loop parameters: MAML++'s step sizes (LSLR) and BatchNorm weights (BNWB)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_maml.inner.base import InnerUpdate
from lightning_maml.inner.parts import PerStepBatchNorm, PerTensorPerStep, batch_norm_parameters

__all__ = ["PerStepRates", "batch_norm_parameters"]


class PerStepRates(InnerUpdate):
    """One learned step size per adapted parameter tensor and per inner step, and optionally
    per-step BatchNorm weights and biases.

    Update rule: ``w_{j+1}[n] = w_j[n] - alpha_j[n] grad_n f_in(w_j; b_j)``, with a scalar
    ``alpha_j[n]`` for each parameter tensor ``n`` (a layer's weight, its bias) and each step
    ``j``, meta-learned from ``inner_lr``: MAML++'s "learning per-layer per-step learning rates"
    (LSLR). With ``batch_norm``, step ``j`` computes with BatchNorm weights and biases
    ``b_j = b + delta_j``: the model's own plus a learned per-step offset (starting at 0), which
    is MAML++'s "per-step batch normalization weights and biases" (BNWB) written so that the
    model keeps its parameters; the BatchNorm parameters then do not adapt in the inner loop, as
    in MAML++. The query set is scored with the last step's. Being per step, all of these fix
    the number of inner steps: evaluation adapts as many steps as training.

    Args:
        adapt: The parameters that adapt (default: all that ``freeze`` leaves).
        freeze: The parameters that do not adapt.
        batch_norm: Learn per-step BatchNorm weights and biases.

    References:
        A. Antoniou, H. Edwards, A. Storkey. How to Train Your MAML. ICLR 2019.
    """

    step_rule = PerTensorPerStep()

    def __init__(
        self,
        adapt: Sequence[str] | None = None,
        freeze: Sequence[str] = (),
        batch_norm: bool = False,
    ) -> None:
        super().__init__(adapt, freeze)
        self.batch_norm = batch_norm
        self.per_step_view = PerStepBatchNorm() if batch_norm else None

    def hparams(self) -> dict[str, object]:
        return {**super().hparams(), "batch_norm": self.batch_norm}
