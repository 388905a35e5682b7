"""The argument checks every part of lightning-maml shares (ground floor, like tasks.py)."""

from __future__ import annotations

import math

# Checkpoint files are checked where they are read, without running what they hold; the
# function stays importable from here, where the other checks are.
from lightning_maml.checkpoint_io import check_checkpoint_file

__all__ = ["check_checkpoint_file", "check_int", "check_positive"]


def check_int(name: str, value: object, low: int = 1) -> int:
    """Returns ``value`` if it is an integer ``>= low``, else raises ``ValueError`` naming it.

    ``True`` and ``False`` are refused: they are ints to Python, but never a count a user meant.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


def check_positive(name: str, value: object, hint: str = "") -> float:
    """Returns ``value`` as a float if it is a finite number ``> 0``, else raises ``ValueError``.

    Args:
        name: The argument's name, for the message.
        value: The value given.
        hint: What the value means or a typical one, appended to the message.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{name} must be a positive finite number, got {value!r}"
            + (f": {hint}" if hint else ".")
        )
    return float(value)
