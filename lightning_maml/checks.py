"""The argument checks every part of lightning-maml shares (ground floor, like tasks.py)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch

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


def check_checkpoint_file(path: str | Path) -> None:
    """Raises a clear error for a checkpoint file that is missing, empty, truncated or foreign.

    Remote paths (``s3://...``, any URL) are left to Lightning's file system layer.

    Args:
        path: The checkpoint given as ``ckpt_path`` (``--ckpt_path`` on the command line).

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file cannot be read as a checkpoint.
    """
    if "://" in str(path):
        return
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path {path}: no such file; runs keep theirs under "
            "<save_dir>/<project or lightning_logs>/<run>/checkpoints/ (last.ckpt is the newest)."
        )
    fix = (
        "it is empty, truncated (a run killed while writing it, or a full disk) or not a "
        f"checkpoint; resume or test from another one (the other .ckpt files in {path.parent})."
    )
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read checkpoint {path}: {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot read checkpoint {path} ({err}): {fix}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"cannot read checkpoint {path} (it holds no state_dict): {fix}")
