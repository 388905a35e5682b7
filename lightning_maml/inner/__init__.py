"""Inner updates: which parameters adapt to a task, and with which (fixed or learned) step sizes.

One of them goes into any algorithm, ``MAML(inner_lr=0.4, inner_update=ANIL())``, and decides
the inner loop; the algorithm decides how the meta-gradient is formed through it. Each update is
made of parts (:mod:`lightning_maml.inner.parts`): a selection of parameters, a step-size rule
and an optional per-step view.
"""

from lightning_maml.inner.anil import ANIL, BOIL
from lightning_maml.inner.base import InnerUpdate, StepSizes
from lightning_maml.inner.meta_sgd import MetaSGD
from lightning_maml.inner.parts import (
    HEAD,
    Fixed,
    Names,
    PerElement,
    PerStepBatchNorm,
    PerTensorPerStep,
)
from lightning_maml.inner.per_step import PerStepRates

__all__ = [
    "ANIL",
    "BOIL",
    "HEAD",
    "Fixed",
    "InnerUpdate",
    "MetaSGD",
    "Names",
    "PerElement",
    "PerStepBatchNorm",
    "PerStepRates",
    "PerTensorPerStep",
    "StepSizes",
]
