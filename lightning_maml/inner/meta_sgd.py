"""Meta-SGD: a learned step size for every element of every adapted parameter."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from lightning_maml.inner.base import InnerUpdate, Params, StepSizes, key

__all__ = ["MetaSGD"]


class MetaSGD(InnerUpdate):
    """Meta-SGD: every element of every adapted parameter has its own learned step size.

    Update rule: ``w_{j+1} = w_j - alpha (.) grad f_in(w_j)``, with ``alpha`` a tensor shaped like
    the parameters, the same on every inner step, and meta-learned with them: the meta-gradient
    of ``alpha`` is ``-sum_j grad f_in(w_j) (.) g_{j+1}`` (``g_{j+1}`` the meta-gradient at
    ``w_{j+1}``). The step sizes start at the algorithm's ``inner_lr``.

    Args:
        adapt: The parameters that adapt (default: all that ``freeze`` leaves).
        freeze: The parameters that do not adapt.

    References:
        Z. Li, F. Zhou, F. Chen, H. Li. Meta-SGD: Learning to Learn Quickly for Few-Shot
        Learning. arXiv:1707.09835, 2017.
    """

    learns_step_sizes = True

    def build(self, shapes: dict[str, torch.Size], model: nn.Module) -> None:
        if not hasattr(self, "lr"):
            like = dict(model.named_parameters())
            self.lr = nn.ParameterDict(
                {
                    key(n): nn.Parameter(torch.full_like(like[n], cast(float, self.inner_lr)))
                    for n in shapes
                }
            )

    def step_sizes(self, rates: Params, steps: int) -> list[StepSizes]:
        sizes: StepSizes = {n: rates[f"lr.{key(n)}"] for n in self.adapted}
        return [sizes] * steps

    def summary(self) -> dict[str, Tensor]:
        return {f"inner_lr/{n}": self.lr[key(n)].detach().mean() for n in self.adapted}
