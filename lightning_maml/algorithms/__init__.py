"""The MAML family, one variant per file over :mod:`lightning_maml.functional`.

Each algorithm is a way to form the meta-gradient through the inner loop (second order, first
order, Hessian-free, Reptile's difference); the inner loop itself is an
:class:`~lightning_maml.inner.InnerUpdate` (which parameters adapt, with which step sizes),
chosen with ``inner_update=``. What a variant can differentiate (learned step sizes, a per-step
view) it states in one place, :meth:`MetaAlgorithm.supports`.
"""

from lightning_maml.algorithms.base import Evaluation, MetaAlgorithm, MetaStep, Supports
from lightning_maml.algorithms.fomaml import FOMAML
from lightning_maml.algorithms.hfmaml import HFMAML
from lightning_maml.algorithms.maml import MAML
from lightning_maml.algorithms.mamlpp import MAMLPlusPlus
from lightning_maml.algorithms.reptile import Reptile

__all__ = [
    "FOMAML",
    "HFMAML",
    "MAML",
    "Evaluation",
    "MAMLPlusPlus",
    "MetaAlgorithm",
    "MetaStep",
    "Reptile",
    "Supports",
]
