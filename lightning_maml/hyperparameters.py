"""Hyper-parameters as plain values: what checkpoints and loggers keep of a learner's arguments."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from lightning_maml.algorithms.base import MetaAlgorithm
from lightning_maml.inner import InnerUpdate

__all__ = ["describe", "qualified_name"]


def describe(value: Any) -> Any:
    """A plain (loggable, picklable) description of a hyper-parameter value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, functools.partial):
        return {"callable": describe(value.func), "kwargs": describe(value.keywords)}
    if isinstance(value, (MetaAlgorithm, InnerUpdate)):
        init_args = {k: describe(v) for k, v in value.hparams().items() if k != "variant"}
        return {"class_path": qualified_name(type(value)), "init_args": init_args}
    if isinstance(value, nn.Module):
        return {"class_path": qualified_name(type(value))}
    if callable(value) and hasattr(value, "__qualname__"):
        return qualified_name(value)
    return repr(value)


def qualified_name(obj: Any) -> str:
    """``module.QualifiedName`` of a class or function, as a ``class_path`` names it."""
    return f"{obj.__module__}.{obj.__qualname__}"
