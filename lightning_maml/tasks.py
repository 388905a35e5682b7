"""The data every part of lightning-maml agrees on: a task, a batch of tasks, and their draws.

A task is identified by numbers, never by the state of a random generator: it is drawn from
``numpy.random.default_rng([seed, stream, ...])``, where ``stream`` says who draws it
(:data:`STREAMS`). The datamodules draw training, validation and test tasks on streams 0-2; the
callbacks that need tasks of their own draw them on other streams, so that they never repeat a
training, validation or test task and never shift the training stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["STREAMS", "Task", "TaskBatch", "TaskSampler", "draw_tasks"]

#: The stream of each user of seeded task draws (the second number of every task's key).
STREAMS: dict[str, int] = {
    "train": 0,
    "val": 1,
    "test": 2,
    "step_size": 3,  # TheoryStepSize's estimate of the local smoothness
    "stationarity": 4,  # StationarityMonitor's held-out tasks
}


class Task(NamedTuple):
    """One task's data, in :class:`TaskBatch` field order, without the task dimension."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    hessian_x: Tensor | None = None
    hessian_y: Tensor | None = None


class TaskSampler(Protocol):
    """Draws one task of a split from the generator it is given (and from nothing else)."""

    def __call__(self, rng: np.random.Generator, split: str) -> Task: ...


@dataclass
class TaskBatch:
    """A meta-batch of few-shot tasks; dimension 0 of every tensor indexes the task.

    In the notation of Fallah et al. 2020, each task ``i`` comes with three independent data
    batches: the support set ``D_in`` (used for the inner, adapting gradient), the query set
    ``D_o`` (the outer gradient at the adapted point) and an optional Hessian set ``D_h`` (the
    Hessian term of MAML, or the finite difference of HF-MAML).

    Args:
        support_x: Support inputs, shaped ``(tasks, shots, features...)``.
        support_y: Support targets, shaped ``(tasks, shots, ...)``.
        query_x: Query inputs, shaped ``(tasks, query_shots, ...)``.
        query_y: Query targets, shaped ``(tasks, query_shots, ...)``.
        hessian_x: Optional Hessian-batch inputs, shaped ``(tasks, hessian_shots, ...)``.
        hessian_y: Optional Hessian-batch targets; given exactly when ``hessian_x`` is.

    Raises:
        ValueError: If a tensor has no task dimension (or a floating-point input no feature
            dimension), the
            batch has no tasks or a set no examples, the tensors disagree in the number of
            tasks, inputs and targets disagree in the number of examples, or only one of
            ``hessian_x`` / ``hessian_y`` is given. Whether the targets suit the model and the
            loss is checked by :class:`~lightning_maml.MetaLearner` at its first batch.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    hessian_x: Tensor | None = None
    hessian_y: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.hessian_x is None) != (self.hessian_y is None):
            raise ValueError(
                "TaskBatch got only one of hessian_x / hessian_y: pass both (a D_h batch per "
                "task) or neither."
            )
        tensors = self.named_tensors()
        for name, tensor in tensors.items():
            if not isinstance(tensor, Tensor):
                raise ValueError(
                    f"TaskBatch.{name} must be a torch.Tensor, got {type(tensor).__name__}."
                )
            if tensor.dim() < 2:
                raise ValueError(
                    f"TaskBatch.{name} has shape {tuple(tensor.shape)}; every tensor needs a "
                    "task dimension and an example dimension: (tasks, examples, ...)."
                )
        for name, tensor in tensors.items():
            # Integer inputs may be indices to gather on the device (image datamodules'
            # device_tensors), one per example.
            if name.endswith("_x") and tensor.dim() < 3 and tensor.is_floating_point():
                raise ValueError(
                    f"TaskBatch.{name} has shape {tuple(tensor.shape)}, but inputs need a task, "
                    "an example and a feature dimension: (tasks, examples, features...). One "
                    "task without its task dimension? Add it with x.unsqueeze(0) (and the "
                    "same for the other tensors)."
                )
        counts = {name: tensor.shape[0] for name, tensor in tensors.items()}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{name}: {n}" for name, n in counts.items())
            raise ValueError(
                "TaskBatch tensors disagree in the task dimension (dim 0): "
                f"{listed}. Give every tensor the same number of tasks."
            )
        if self.num_tasks == 0:
            raise ValueError("TaskBatch has no tasks (dimension 0 is empty): give at least one.")
        for split in ("support", "query", "hessian"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x is not None and x.shape[1] == 0:
                raise ValueError(
                    f"TaskBatch.{split}_x has no examples (dimension 1 is empty): every task "
                    f"needs at least one {split} example."
                )
            if x is not None and x.shape[1] != y.shape[1]:
                raise ValueError(
                    f"TaskBatch.{split}_x has {x.shape[1]} examples per task but "
                    f"{split}_y has {y.shape[1]}: inputs and targets must pair up (dim 1)."
                )

    def named_tensors(self) -> dict[str, Tensor]:
        """The tensors that are present, by field name."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    @property
    def num_tasks(self) -> int:
        """The number of tasks in the batch."""
        return self.support_x.shape[0]

    @property
    def has_hessian(self) -> bool:
        """Whether the batch carries a separate Hessian set ``D_h``."""
        return self.hessian_x is not None

    def narrow(self, start: int, length: int) -> TaskBatch:
        """Tasks ``start .. start + length - 1`` as a new batch (views, no copy)."""
        return TaskBatch(
            **{name: t.narrow(0, start, length) for name, t in self.named_tensors().items()}
        )

    def chunks(self, size: int) -> list[TaskBatch]:
        """Consecutive sub-batches of at most ``size`` tasks."""
        return [
            self.narrow(s, min(size, self.num_tasks - s)) for s in range(0, self.num_tasks, size)
        ]

    def to(self, *args, **kwargs) -> TaskBatch:
        """Moves or casts every tensor, as :meth:`torch.Tensor.to`."""
        return TaskBatch(
            **{name: t.to(*args, **kwargs) for name, t in self.named_tensors().items()}
        )

    def clone(self) -> TaskBatch:
        """A copy with fresh storage (turns inference-mode tensors into ordinary ones)."""
        return TaskBatch(**{name: t.clone() for name, t in self.named_tensors().items()})

    @staticmethod
    def of(tasks: Sequence[Task]) -> TaskBatch:
        """Stacks single tasks into a batch (task dimension first)."""
        if not tasks:
            raise ValueError("TaskBatch.of needs at least one task.")
        support_x, support_y, query_x, query_y, hessian_x, hessian_y = zip(*tasks, strict=True)
        return TaskBatch(
            torch.stack(support_x),
            torch.stack(support_y),
            torch.stack(query_x),
            torch.stack(query_y),
            None if hessian_x[0] is None else torch.stack(hessian_x),
            None if hessian_y[0] is None else torch.stack(hessian_y),
        )

    @staticmethod
    def stack(tasks: list[TaskBatch]) -> TaskBatch:
        """Concatenates batches along the task dimension."""
        if not tasks:
            raise ValueError("TaskBatch.stack needs at least one batch.")
        names = tasks[0].named_tensors().keys()
        return TaskBatch(**{n: torch.cat([t.named_tensors()[n] for t in tasks]) for n in names})


def draw_tasks(sampler: TaskSampler, split: str, keys: Iterable[Sequence[int]]) -> TaskBatch:
    """One task per key, drawn from ``default_rng(key)`` by ``sampler``, stacked in key order.

    A sampler with a ``draw_batch(split, keys)`` method is handed all the keys at once: it
    must return the same tasks, and can draw them faster than one call per task.

    Args:
        sampler: Draws one task of ``split``.
        split: ``"train"``, ``"val"`` or ``"test"``: whose classes or task family to draw from.
        keys: Each task's key, ``[seed, STREAMS[user], ...]``.
    """
    draw_batch = getattr(sampler, "draw_batch", None)
    if draw_batch is not None:
        return draw_batch(split, keys)
    return TaskBatch.of([sampler(np.random.default_rng(list(key)), split) for key in keys])
