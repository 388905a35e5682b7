"""The one data structure every part of lightning-maml agrees on: a batch of tasks."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["TaskBatch"]


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
        ValueError: If a tensor has no task dimension (or an input no feature dimension), the
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
            if name.endswith("_x") and tensor.dim() < 3:
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
    def stack(tasks: list[TaskBatch]) -> TaskBatch:
        """Concatenates batches along the task dimension."""
        if not tasks:
            raise ValueError("TaskBatch.stack needs at least one batch.")
        names = tasks[0].named_tensors().keys()
        return TaskBatch(**{n: torch.cat([t.named_tensors()[n] for t in tasks]) for n in names})
