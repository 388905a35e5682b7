"""Sinusoid regression tasks of Finn et al. 2017."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from lightning_maml.checks import check_int
from lightning_maml.datamodules.base import MetaDataModule, Task
from lightning_maml.tasks import TaskBatch

__all__ = ["SinusoidDataModule", "SinusoidTasks"]


class SinusoidTasks:
    """Draws one sinusoid task ``y = A sin(x - phase)`` and its three data batches.

    Args:
        shots: Support points per task (``D_in``).
        query_shots: Query points per task (``D_o``).
        hessian_shots: Hessian-set points per task (``D_h``); 0 for none.
        amplitude_range: ``A ~ U[low, high]``.
        phase_range: ``phase ~ U[low, high]``.
        input_range: ``x ~ U[low, high]``.
    """

    def __init__(
        self,
        shots: int,
        query_shots: int,
        hessian_shots: int = 0,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        input_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        self.shots = shots
        self.query_shots = query_shots
        self.hessian_shots = hessian_shots
        self.amplitude_range = amplitude_range
        self.phase_range = phase_range
        self.input_range = input_range

    def __call__(self, rng: np.random.Generator, split: str) -> Task:
        x, y = self._points(rng.random((1, self._draws)))
        support_x, query_x, hessian_x = torch.split(x[0], self._counts)
        support_y, query_y, hessian_y = torch.split(y[0], self._counts)
        if not self.hessian_shots:
            return Task(support_x, support_y, query_x, query_y)
        return Task(support_x, support_y, query_x, query_y, hessian_x, hessian_y)

    def draw_batch(self, split: str, keys: Iterable[Sequence[int]]) -> TaskBatch:
        """One task per key, the tasks :meth:`__call__` draws from ``default_rng(key)``, batched.

        Each task's numbers still come from its own generator, so the tasks are the same, bit
        for bit; the arithmetic and the stacking are done once for the whole meta-batch.
        """
        draws = np.stack([np.random.default_rng(list(key)).random(self._draws) for key in keys])
        x, y = self._points(draws)
        support_x, query_x, hessian_x = torch.split(x, self._counts, dim=1)
        support_y, query_y, hessian_y = torch.split(y, self._counts, dim=1)
        if not self.hessian_shots:
            return TaskBatch(support_x, support_y, query_x, query_y)
        return TaskBatch(support_x, support_y, query_x, query_y, hessian_x, hessian_y)

    @property
    def _counts(self) -> list[int]:
        return [self.shots, self.query_shots, self.hessian_shots]

    @property
    def _draws(self) -> int:
        # Amplitude, phase, then the inputs: the order in which Generator.uniform drew them
        # before tasks were batched (uniform(low, high) is low + (high - low) * random()), so
        # every seed keeps its tasks.
        return 2 + sum(self._counts)

    def _points(self, draws: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``(tasks, points, 1)`` from one row of uniform draws per task."""

        def scale(u: np.ndarray, bounds: tuple[float, float]) -> torch.Tensor:
            low, high = bounds
            return torch.from_numpy((low + (high - low) * u).astype(np.float32))

        amplitude = scale(draws[:, 0], self.amplitude_range)[:, None, None]
        phase = scale(draws[:, 1], self.phase_range)[:, None, None]
        x = scale(draws[:, 2:], self.input_range).unsqueeze(-1)
        return x, amplitude * torch.sin(x - phase)


class SinusoidDataModule(MetaDataModule):
    """Finn et al.'s sinusoid regression benchmark as a stream of :class:`TaskBatch` es.

    Amplitude ``U[0.1, 5]``, phase ``U[0, pi]``, inputs ``U[-5, 5]``; tasks are drawn on the fly
    from seeded generators (see :mod:`lightning_maml.datamodules.base`), validation and test tasks are fixed.

    Args:
        shots: Support points per task (``D_in``; K in Finn et al.).
        query_shots: Query points per task (``D_o``).
        hessian_shots: Points of the independent Hessian batch ``D_h``; 0 for none.
        meta_batch_size: Tasks per training step, over all devices together.
        seed: The data seed.
        num_val_tasks: Fixed validation tasks.
        num_test_tasks: Fixed test tasks.
        eval_meta_batch_size: Tasks per evaluation batch (default: ``meta_batch_size``).
        num_workers: DataLoader workers.
        amplitude_range: Range of the amplitude.
        phase_range: Range of the phase.
        input_range: Range of the inputs.
    """

    def __init__(
        self,
        shots: int = 10,
        query_shots: int = 10,
        hessian_shots: int = 0,
        meta_batch_size: int = 25,
        seed: int = 0,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        num_workers: int = 0,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        input_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        super().__init__(
            meta_batch_size, seed, num_val_tasks, num_test_tasks, eval_meta_batch_size, num_workers
        )
        check_int("shots", shots)
        check_int("query_shots", query_shots)
        check_int("hessian_shots", hessian_shots, low=0)
        for name, (low, high) in [
            ("amplitude_range", amplitude_range),
            ("phase_range", phase_range),
            ("input_range", input_range),
        ]:
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}.")
        self.save_hyperparameters()
        self.tasks = SinusoidTasks(
            shots, query_shots, hessian_shots, amplitude_range, phase_range, input_range
        )

    def task_sampler(self, split: str) -> SinusoidTasks:
        return self.tasks
