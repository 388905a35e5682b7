"""The losses a :class:`~lightning_maml.MetaLearner` takes by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from lightning_maml.functional import mse_loss

__all__ = ["LOSSES", "LossArg", "resolve_loss"]

LossArg = str | Callable[[Tensor, Tensor], Tensor]

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": mse_loss,  # written out: F.mse_loss fails under forward-mode HVPs (torch 2.13)
    "cross_entropy": nn.functional.cross_entropy,
}


def resolve_loss(loss: LossArg) -> tuple[Callable[[Tensor, Tensor], Tensor], str | None]:
    """The loss function for ``loss`` (a name of :data:`LOSSES` or a callable), and its name
    (``None`` for a callable: the target checks then cannot know what it expects).

    Raises:
        ValueError: On an unknown name or something that is neither a name nor a callable.
    """
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(
                f"Unknown loss {loss!r}: use one of {sorted(LOSSES)} or pass a callable "
                "loss(prediction, target) -> scalar."
            )
        return LOSSES[loss], loss
    if callable(loss):
        return loss, None
    raise ValueError(f"loss must be a name or a callable, got {type(loss).__name__}.")
