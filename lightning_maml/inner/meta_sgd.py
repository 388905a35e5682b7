"""Meta-SGD: a learned step size for every element of every adapted parameter."""

from __future__ import annotations

from lightning_maml.inner.base import InnerUpdate
from lightning_maml.inner.parts import PerElement

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

    step_rule = PerElement()
