"""lightning-maml: MAML, FO-MAML and HF-MAML for PyTorch Lightning (Fallah et al. 2020)."""

from lightning_maml.algorithms import FOMAML, HFMAML, MAML, Evaluation, MetaAlgorithm, MetaStep
from lightning_maml.learner import MetaLearner
from lightning_maml.tasks import TaskBatch

__all__ = [
    "FOMAML",
    "HFMAML",
    "MAML",
    "Evaluation",
    "MetaAlgorithm",
    "MetaLearner",
    "MetaStep",
    "TaskBatch",
]
__version__ = "0.1.0"
