"""What every task datamodule shares: a seeded training stream and fixed evaluation task sets.

A task is identified by numbers, never by the state of a random generator
(:mod:`lightning_maml.tasks`): the ``t``-th task of training step ``s`` is drawn from
``numpy.random.default_rng([seed, STREAMS["train"], s, t])`` and the ``i``-th validation task
from ``default_rng([seed, STREAMS["val"], i])``. This makes sampling

- deterministic under a seed, whatever the number of loader workers;
- different on every rank: under DDP rank ``r`` draws tasks ``r * B / W .. (r + 1) * B / W - 1``
  of each step, so ``meta_batch_size`` is global and the union over ranks equals what a single
  process draws;
- resumable: a run restored from a checkpoint starts the stream at the restored global step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lightning_maml.checks import check_int
from lightning_maml.tasks import STREAMS, Task, TaskBatch, TaskSampler, draw_tasks

__all__ = ["EvalTaskSet", "MetaDataModule", "Task", "TaskSampler", "TrainTaskStream"]


def check_divisible(meta_batch_size: int, world_size: int) -> None:
    """Raises ``ValueError`` unless the global meta-batch splits evenly over the processes."""
    if meta_batch_size % world_size:
        raise ValueError(
            f"meta_batch_size={meta_batch_size} is the global number of tasks per step and "
            f"must divide evenly over {world_size} processes; choose a multiple of {world_size}."
        )


class TrainTaskStream(IterableDataset):
    """An endless stream of training meta-batches, keyed by the global step.

    Args:
        sampler: Draws one task.
        meta_batch_size: The global number of tasks per step (all ranks together).
        seed: The data seed.
        start_step: The first global step to produce (the restored step on resume).
        rank: This process's rank.
        world_size: The number of processes sharing each meta-batch.
    """

    def __init__(
        self,
        sampler: TaskSampler,
        meta_batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_divisible(meta_batch_size, world_size)
        check_int("seed", seed, 0)
        self.sampler = sampler
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def batch(self, step: int) -> TaskBatch:
        """This rank's share of the meta-batch of global step ``step``."""
        local = self.meta_batch_size // self.world_size
        first = self.rank * local
        keys = ([self.seed, STREAMS["train"], step, t] for t in range(first, first + local))
        return draw_tasks(self.sampler, "train", keys)

    def __iter__(self) -> Iterator[TaskBatch]:
        # Workers take steps round-robin, which is the order the DataLoader reads them back in.
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += workers


class EvalTaskSet(IterableDataset):
    """A fixed, seeded set of evaluation tasks, served in meta-batches.

    Under DDP, rank ``r`` of ``W`` takes tasks ``r, r + W, r + 2W, ...`` and batches them, so
    every task is evaluated exactly once, without the duplicates that a padded
    ``DistributedSampler`` would add to the mean and its confidence interval. Iteration splits
    this rank's batches further over loader workers; ``task_set[j]`` is this rank's batch ``j``.

    Args:
        sampler: Draws one task.
        split: ``"val"`` or ``"test"``.
        num_tasks: The number of tasks in the whole set.
        meta_batch_size: Tasks per batch (the last batch may be smaller).
        seed: The data seed.
        rank: This process's rank.
        world_size: The number of processes sharing the set.
    """

    def __init__(
        self,
        sampler: TaskSampler,
        split: str,
        num_tasks: int,
        meta_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_tasks < world_size:
            raise ValueError(
                f"The {split} set has {num_tasks} tasks, fewer than the {world_size} processes "
                f"that share it: set num_{split}_tasks >= {world_size}."
            )
        self.sampler = sampler
        self.split = split
        self.tasks = range(rank, num_tasks, world_size)
        self.meta_batch_size = meta_batch_size
        self.seed = seed

    def __len__(self) -> int:
        return math.ceil(len(self.tasks) / self.meta_batch_size)

    def __getitem__(self, index: int) -> TaskBatch:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of an evaluation set of {len(self)} batches")
        first = index * self.meta_batch_size
        tasks = self.tasks[first : first + self.meta_batch_size]
        keys = ([self.seed, STREAMS[self.split], i] for i in tasks)
        return draw_tasks(self.sampler, self.split, keys)

    def __iter__(self) -> Iterator[TaskBatch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(worker, len(self), workers):
            yield self[index]


class MetaDataModule(LightningDataModule):
    """Base class of the task datamodules: subclasses provide :meth:`task_sampler`.

    Args:
        meta_batch_size: Tasks per training step, over all devices together.
        seed: The data seed; the same seed gives the same tasks.
        num_val_tasks: The size of the fixed validation task set.
        num_test_tasks: The size of the fixed test task set (600 in Finn et al. 2017).
        eval_meta_batch_size: Tasks per validation/test batch (default: ``meta_batch_size``).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        meta_batch_size: int,
        seed: int = 0,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in [
            ("meta_batch_size", meta_batch_size),
            ("num_val_tasks", num_val_tasks),
            ("num_test_tasks", num_test_tasks),
        ]:
            check_int(name, value)
        # NumPy seeds tasks with [seed, stream, ...]: a negative seed would fail only when the
        # first task is drawn, with a message that names neither the argument nor the fix.
        check_int("seed", seed, 0)
        if eval_meta_batch_size is not None:
            check_int("eval_meta_batch_size", eval_meta_batch_size)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.num_val_tasks = num_val_tasks
        self.num_test_tasks = num_test_tasks
        self.eval_meta_batch_size = eval_meta_batch_size or meta_batch_size
        self.num_workers = num_workers

    def task_sampler(self, split: str) -> TaskSampler:
        """The sampler of one task of ``split``; subclasses override this."""
        raise NotImplementedError

    def loader_sampler(self, split: str) -> TaskSampler:
        """The sampler behind this datamodule's loaders (default: :meth:`task_sampler`).

        A datamodule whose loaders yield something to be finished on the device (image indices,
        say) overrides this and leaves :meth:`task_sampler` giving ready tasks to other users.
        """
        return self.task_sampler(split)

    def _placement(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 1
        return trainer.global_step, trainer.global_rank, trainer.world_size

    def setup(self, stage: str) -> None:
        _, _, world_size = self._placement()
        if stage == "fit":
            check_divisible(self.meta_batch_size, world_size)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning restores the loops before it asks for the loader, so global_step is the
        # step a resumed run continues from.
        start, rank, world_size = self._placement()
        stream = TrainTaskStream(
            self.loader_sampler("train"), self.meta_batch_size, self.seed, start, rank, world_size
        )
        return self._loader(stream)

    def eval_set(self, split: str) -> EvalTaskSet:
        """The fixed task set of ``split`` (``"val"`` or ``"test"``), this rank's share when iterated."""
        num = self.num_val_tasks if split == "val" else self.num_test_tasks
        _, rank, world_size = self._placement()
        return EvalTaskSet(
            self.loader_sampler(split),
            split,
            num,
            self.eval_meta_batch_size,
            self.seed,
            rank,
            world_size,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader(self.eval_set("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set("test"))
