"""Inner updates: which parameters adapt to a task, and with which (fixed or learned) step sizes.

One of them goes into any algorithm, ``MAML(inner_lr=0.4, inner_update=ANIL())``, and decides
the inner loop; the algorithm decides how the meta-gradient is formed through it.
"""

from lightning_maml.inner.anil import ANIL, BOIL
from lightning_maml.inner.base import InnerUpdate, StepSizes
from lightning_maml.inner.meta_sgd import MetaSGD
from lightning_maml.inner.per_step import PerStepRates

__all__ = ["ANIL", "BOIL", "InnerUpdate", "MetaSGD", "PerStepRates", "StepSizes"]
