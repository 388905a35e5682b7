"""Per-step inner-loop parameters: MAML++'s step sizes (LSLR) and BatchNorm weights (BNWB)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from lightning_maml.inner.base import InnerUpdate, Params, StepSizes, key

__all__ = ["PerStepRates"]


def batch_norm_parameters(model: nn.Module) -> list[str]:
    """The names of the affine parameters of the model's BatchNorm layers."""
    return [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]


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

    learns_step_sizes = True

    def __init__(
        self,
        adapt: Sequence[str] | None = None,
        freeze: Sequence[str] = (),
        batch_norm: bool = False,
    ) -> None:
        super().__init__(adapt, freeze)
        self.batch_norm = batch_norm
        self.changes_params = batch_norm
        self.normalized: list[str] = []

    def chosen(self, model: nn.Module) -> list[str]:
        if self.batch_norm:
            self.normalized = batch_norm_parameters(model)
            if not self.normalized:
                raise ValueError(
                    f"PerStepRates(batch_norm=True): {type(model).__name__} has no BatchNorm "
                    "layer with affine parameters; set batch_norm=False."
                )
        chosen = super().chosen(model)
        return [n for n in chosen if n not in self.normalized]

    def build(self, shapes: dict[str, torch.Size], model: nn.Module) -> None:
        like = dict(model.named_parameters())
        # bind sets both before it builds.
        steps, inner_lr = cast(int, self.inner_steps), cast(float, self.inner_lr)
        if not hasattr(self, "lr"):
            self.lr = nn.ParameterDict(
                {key(n): nn.Parameter(like[n].new_full((steps,), inner_lr)) for n in shapes}
            )
        if self.batch_norm and not hasattr(self, "bn"):
            self.bn = nn.ParameterDict(
                {
                    key(n): nn.Parameter(like[n].new_zeros(steps, *like[n].shape))
                    for n in self.normalized
                }
            )

    def _check_steps(self, steps: int) -> None:
        if steps != self.inner_steps:
            raise ValueError(
                f"{type(self).__name__} learned per-step parameters for {self.inner_steps} "
                f"inner steps and cannot adapt {steps}: evaluate with eval_inner_steps="
                f"{self.inner_steps} (or leave it unset)."
            )

    def step_sizes(self, rates: Params, steps: int) -> list[StepSizes]:
        self._check_steps(steps)
        return [{n: rates[f"lr.{key(n)}"][j] for n in self.adapted} for j in range(steps)]

    def params_at(self, rates: Params, step: int, params: Params) -> Params:
        if not self.batch_norm:
            return params
        return {
            **params,
            **{n: params[n] + rates[f"bn.{key(n)}"][step] for n in self.normalized},
        }

    def summary(self) -> dict[str, Tensor]:
        return {f"inner_lr/{n}": self.lr[key(n)].detach() for n in self.adapted}

    def hparams(self) -> dict[str, object]:
        return {**super().hparams(), "batch_norm": self.batch_norm}
