"""The MAML family, one variant per file over :mod:`lightning_maml.functional`."""

from lightning_maml.algorithms.base import Evaluation, MetaAlgorithm, MetaStep
from lightning_maml.algorithms.fomaml import FOMAML
from lightning_maml.algorithms.hfmaml import HFMAML
from lightning_maml.algorithms.maml import MAML

__all__ = ["FOMAML", "HFMAML", "MAML", "Evaluation", "MetaAlgorithm", "MetaStep"]
