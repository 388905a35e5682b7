"""Any learn2learn-style task source as a stream of :class:`~lightning_maml.tasks.TaskBatch` es.

A task source is any object with a ``sample()`` method that returns one task as
``(data, labels)``: ``data`` ``(n, ...)`` and integer ``labels`` ``(n,)``, with at least
``shots + query_shots + hessian_shots`` examples of each of ``ways`` classes. learn2learn's
``TaskDataset`` is one (``learn2learn.data.TaskDataset(dataset, task_transforms=[NWays(...),
KShots(...), LoadData(...)])``, with ``k = shots + query_shots + hessian_shots``); learn2learn
is not needed otherwise and is never imported here.

Such sources draw from Python's, NumPy's and torch's global generators. To keep the guarantees of
:mod:`lightning_maml.datamodules.base` (the same seed gives the same tasks, every rank and worker draws its own),
each call seeds the three global generators from the task's own generator and restores their
state afterwards, so the rest of the program sees its random streams untouched.
"""

from __future__ import annotations

import random
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_maml.datamodules.base import MetaDataModule, Task, TaskSampler
from lightning_maml.datamodules.episodes import _check_sizes

__all__ = ["TaskSetDataModule", "TaskSetSampler", "TaskSource"]


@runtime_checkable
class TaskSource(Protocol):
    """Anything that draws one task as ``(data, labels)``."""

    def sample(self) -> tuple[Any, Any]: ...


class TaskSetSampler:
    """Splits each task of a source into support / query / Hessian sets per class.

    The first ``shots`` examples of each class (in the source's order) form the support set, the
    next ``query_shots`` the query set and the next ``hessian_shots`` the Hessian set; any further
    examples are left out. The classes get the labels ``0 .. ways - 1`` in a random order drawn
    from the task's generator. Examples are class-major, as in
    :class:`~lightning_maml.datamodules.episodes.EpisodeSampler`.

    Args:
        source: The task source.
        ways: Classes per task.
        shots: Support examples per class (``D_in``).
        query_shots: Query examples per class (``D_o``).
        hessian_shots: Hessian-set examples per class (``D_h``); 0 for none.
    """

    def __init__(
        self, source: TaskSource, ways: int, shots: int, query_shots: int, hessian_shots: int = 0
    ) -> None:
        _check_sizes(ways, shots, query_shots, hessian_shots)
        if not callable(getattr(source, "sample", None)):
            raise ValueError(
                f"a task source needs a sample() method returning (data, labels); "
                f"{type(source).__name__} has none."
            )
        self.source = source
        self.ways = ways
        self.counts = (shots, query_shots, hessian_shots)

    def draw(self, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """One ``(data, labels)`` from the source, its global randomness seeded from ``rng``."""
        seed = int(rng.integers(2**32))
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            try:
                data, labels = self.source.sample()
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)
        return torch.as_tensor(data), torch.as_tensor(labels)

    def split(self, data: Tensor, labels: Tensor, rng: np.random.Generator) -> Task:
        """Splits one task into the sets of a :class:`~lightning_maml.datamodules.base.Task`."""
        if labels.dim() != 1 or len(labels) != len(data):
            raise ValueError(
                f"a task must be (data, labels) with labels of shape (n,) and data (n, ...); got "
                f"data {tuple(data.shape)} and labels {tuple(labels.shape)}."
            )
        classes = torch.unique(labels)
        if len(classes) != self.ways:
            raise ValueError(
                f"the task source gave a task of {len(classes)} classes, but ways={self.ways}; "
                "make the source draw ways classes per task."
            )
        needed = sum(self.counts)
        members = []
        for c in classes:
            found = torch.nonzero(labels == c).squeeze(1)
            if len(found) < needed:
                raise ValueError(
                    f"the task source gave {len(found)} examples of a class, but shots + "
                    f"query_shots + hessian_shots = {needed}; make it draw at least {needed} "
                    "per class."
                )
            members.append(found[:needed])
        # Row i holds the class labelled i: a random order, so labels carry no class identity.
        index = torch.stack(members)[torch.from_numpy(rng.permutation(self.ways))]
        parts: list[Tensor | None] = []
        start = 0
        for count in self.counts:
            if count == 0:
                parts += [None, None]
                continue
            rows = index[:, start : start + count].reshape(-1)
            parts += [data[rows], torch.arange(self.ways).repeat_interleave(count)]
            start += count
        return Task._make(parts)

    def __call__(self, rng: np.random.Generator, split: str) -> Task:
        data, labels = self.draw(rng)
        return self.split(data, labels, rng)


class TaskSetDataModule(MetaDataModule):
    """Serves tasks from learn2learn-style task sources, one source per split.

    Training draws fresh tasks; validation and test are fixed sets of ``num_val_tasks`` /
    ``num_test_tasks`` tasks drawn once from their sources with seeds of their own. Without a
    ``val`` source there is no validation (an empty loader); without a ``test`` source,
    ``Trainer.test`` raises.

    Args:
        train: The training task source.
        val: The validation task source, or ``None``.
        test: The test task source, or ``None``.
        ways: Classes per task.
        shots: Support examples per class (``D_in``).
        query_shots: Query examples per class (``D_o``).
        hessian_shots: Hessian-set examples per class (``D_h``); 0 for none.
        meta_batch_size: Tasks per training step, over all devices together.
        seed: The data seed; the same seed gives the same tasks.
        num_val_tasks: The size of the fixed validation task set.
        num_test_tasks: The size of the fixed test task set.
        eval_meta_batch_size: Tasks per validation/test batch (default: ``meta_batch_size``).
        num_workers: DataLoader workers.

    Raises:
        ValueError: If a source has no ``sample()`` method or a size is bad (at construction),
            or, at ``setup``, if a source's first task does not fit ``ways`` and the shots.
    """

    def __init__(
        self,
        train: TaskSource,
        val: TaskSource | None = None,
        test: TaskSource | None = None,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        hessian_shots: int = 0,
        meta_batch_size: int = 32,
        seed: int = 0,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            meta_batch_size, seed, num_val_tasks, num_test_tasks, eval_meta_batch_size, num_workers
        )
        self.save_hyperparameters(ignore=["train", "val", "test"])
        self.ways = ways
        self.shots = shots
        self.query_shots = query_shots
        self.hessian_shots = hessian_shots
        self.samplers = {
            split: TaskSetSampler(source, ways, shots, query_shots, hessian_shots)
            for split, source in (("train", train), ("val", val), ("test", test))
            if source is not None
        }

    def task_sampler(self, split: str) -> TaskSampler:
        if split not in self.samplers:
            raise ValueError(f"TaskSetDataModule was given no {split} task source.")
        return self.samplers[split]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for split in splits:
            if split == "val" and split not in self.samplers:
                continue  # no validation, by choice
            # One probe task per split, so that a source that does not fit the task sizes
            # stops the run here rather than at its first step.
            self.task_sampler(split)(np.random.default_rng([self.seed, 99]), split)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if "val" not in self.samplers:
            return []
        return super().val_dataloader()
