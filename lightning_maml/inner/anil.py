"""ANIL and BOIL: adapt only the head, or only the body."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_maml.inner.base import InnerUpdate
from lightning_maml.inner.parts import HEAD, head_of

__all__ = ["ANIL", "BOIL", "head_of"]


class ANIL(InnerUpdate):
    """Almost No Inner Loop: only the head adapts; the body is meta-learned but fixed per task.

    Update rule: ``h_{j+1} = h_j - alpha grad_h f_in(b, h_j)`` for the head ``h``, the body ``b``
    unchanged; the meta-gradient of both flows through the head's adaptation. The inner loop
    differentiates the head only, so it is cheaper than MAML's.

    Args:
        head: The head's parameter or module names (default: the model's last module that owns
            parameters, e.g. ``classifier`` of :class:`~lightning_maml.models.ConvNet`).

    References:
        A. Raghu, M. Raghu, S. Bengio, O. Vinyals. Rapid Learning or Feature Reuse? Towards
        Understanding the Effectiveness of MAML. ICLR 2020.
    """

    def __init__(self, head: Sequence[str] | None = None) -> None:
        super().__init__(adapt=[HEAD] if head is None else head)
        self.head = None if head is None else list(head)

    def hparams(self) -> dict[str, object]:
        return {"head": self.head}


class BOIL(InnerUpdate):
    """Body Only update in Inner Loop: the body adapts, the head stays fixed per task.

    Update rule: ``b_{j+1} = b_j - alpha grad_b f_in(b_j, h)``, ANIL's complement.

    Args:
        head: The head's parameter or module names (default: the model's last module that owns
            parameters).

    References:
        J. Oh, H. Yoo, C. Kim, S.-Y. Yun. BOIL: Towards Representation Change for Few-shot
        Learning. ICLR 2021.
    """

    def __init__(self, head: Sequence[str] | None = None) -> None:
        super().__init__(freeze=[HEAD] if head is None else head)
        self.head = None if head is None else list(head)

    def hparams(self) -> dict[str, object]:
        return {"head": self.head}
