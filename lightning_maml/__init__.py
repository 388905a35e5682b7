"""lightning-maml: the MAML family for PyTorch Lightning, with Fallah et al. 2020's theory."""

from lightning_maml.algorithms import (
    FOMAML,
    HFMAML,
    MAML,
    Evaluation,
    MAMLPlusPlus,
    MetaAlgorithm,
    MetaStep,
    Reptile,
)
from lightning_maml.inner import ANIL, BOIL, InnerUpdate, MetaSGD, PerStepRates
from lightning_maml.learner import MetaLearner
from lightning_maml.tasks import TaskBatch

__all__ = [
    "ANIL",
    "BOIL",
    "FOMAML",
    "HFMAML",
    "MAML",
    "Evaluation",
    "InnerUpdate",
    "MAMLPlusPlus",
    "MetaAlgorithm",
    "MetaLearner",
    "MetaSGD",
    "MetaStep",
    "PerStepRates",
    "Reptile",
    "TaskBatch",
]
__version__ = "0.1.0"
