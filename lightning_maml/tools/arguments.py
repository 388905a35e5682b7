"""Argument types for the tools' command lines: counts and finite numbers with their range.

argparse reports a type's :class:`argparse.ArgumentTypeError` as ``argument --NAME: MESSAGE``,
so each message here says the valid range and the value given, and argparse adds the name. A
plain ``type=float`` accepts ``nan`` and ``inf``, which then fail far from the command line
("cannot convert float NaN to integer").
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["count", "finite"]


def count(low: int = 1, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer ``>= low``.

    Args:
        low: The smallest value allowed.
        why: Why smaller values are refused, appended to the message.
    """
    reason = f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {low}, got {text!r}{reason}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}{reason}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite(low: float = 0.0, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number ``>= low`` (``> low`` when ``strict``).

    Args:
        low: The bound.
        strict: Whether ``low`` itself is excluded.
    """
    relation = ">" if strict else ">="
    expected = f"a finite number {relation} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {value!r}")
        return value

    parse.__name__ = expected
    return parse
