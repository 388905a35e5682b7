"""Seeded task draws for the callbacks, on streams disjoint from the datamodules' own.

The datamodules key their tasks as ``default_rng([seed, split_id, ...])`` with split ids 0, 1, 2
(``datamodules.base``); the callbacks use the ids below, so their tasks never repeat a training,
validation or test task and never shift the training stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lightning_maml.tasks import TaskBatch

#: Stream of the step-size estimate's tasks (``[seed, 3, step, j]``).
STEP_SIZE_STREAM = 3
#: Stream of the stationarity monitor's held-out tasks (``[seed, 4, i]``).
STATIONARITY_STREAM = 4

#: ``sampler(rng, split) -> Task``, the ``task_sampler`` of a ``datamodules.MetaDataModule``.
Sampler = Callable[[np.random.Generator, str], Any]


def draw_tasks(sampler: Sampler, split: str, count: int, key: Sequence[int]) -> TaskBatch:
    """Tasks ``j = 0 .. count - 1`` drawn from ``default_rng([*key, j])``, stacked.

    A task is a tuple in :class:`TaskBatch` field order (support, query, optional Hessian set).
    """
    tasks = [sampler(np.random.default_rng([*key, j]), split) for j in range(count)]
    return TaskBatch(*[None if f[0] is None else torch.stack(f) for f in zip(*tasks, strict=True)])
