"""Linear-regression tasks whose meta-objective is known in closed form.

Task ``i`` draws curvatures ``a_i ~ U[low, high]^dim`` and its true weight
``theta_i = center + spread * (a_i - mean) / std`` (``mean``, ``std`` of ``U[low, high]``, so each
coordinate of ``theta_i`` has mean ``center`` and standard deviation ``spread``). Its examples
are ``x ~ N(0, diag(a_i))`` and ``y = x . theta_i + noise_std * N(0, 1)``.

With the squared error, each task loss is the quadratic ``f_i(w) = (w - theta_i)^T diag(a_i)
(w - theta_i) + noise_std^2``, so the MAML objective and its gradient are exact polynomial
moments of ``U[low, high]`` (``lightning_maml.theory.linear``). Tying ``theta_i`` to ``a_i`` is
what gives first-order MAML its floor: with ``theta_i`` independent of ``a_i`` its fixed point
would coincide with MAML's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lightning_maml.checks import check_int
from lightning_maml.datamodules.base import MetaDataModule, Task

__all__ = ["LinearTasks", "LinearTasksDataModule"]


class LinearTasks:
    """Draws one linear-regression task and its three data batches.

    Args:
        dim: Input dimension d.
        spread: Standard deviation s of each coordinate of the task's true weight.
        shots: Support examples per task (``D_in``).
        query_shots: Query examples per task (``D_o``).
        hessian_shots: Hessian-set examples per task (``D_h``); 0 for none.
        curvature_range: ``a_i ~ U[low, high]^dim``, the input variances; needs ``0 < low <= high``.
        center: The mean of each coordinate of the true weight.
        noise_std: Standard deviation of the label noise.
    """

    def __init__(
        self,
        dim: int = 10,
        spread: float = 1.0,
        shots: int = 50,
        query_shots: int = 50,
        hessian_shots: int = 50,
        curvature_range: tuple[float, float] = (0.2, 2.0),
        center: float = 1.0,
        noise_std: float = 0.0,
    ) -> None:
        for name, value, least in [
            ("dim", dim, 1),
            ("shots", shots, 1),
            ("query_shots", query_shots, 1),
            ("hessian_shots", hessian_shots, 0),
        ]:
            check_int(name, value, least)
        low, high = curvature_range
        if not 0 < low <= high:
            raise ValueError(
                f"curvature_range must be (low, high) with 0 < low <= high, got {curvature_range}: "
                "the curvatures are input variances."
            )
        if spread < 0 or noise_std < 0:
            raise ValueError(
                f"spread and noise_std must be >= 0, got spread={spread}, noise_std={noise_std}."
            )
        self.dim = dim
        self.spread = float(spread)
        self.shots = shots
        self.query_shots = query_shots
        self.hessian_shots = hessian_shots
        self.curvature_range = (float(low), float(high))
        self.center = float(center)
        self.noise_std = float(noise_std)

    def optimum(self, curvatures: np.ndarray) -> np.ndarray:
        """The true weight ``theta`` of a task with input variances ``curvatures``."""
        low, high = self.curvature_range
        # A zero-width range has no spread to standardise; every task then shares theta = center.
        std = (high - low) / math.sqrt(12.0) or 1.0
        return self.center + self.spread * (curvatures - (low + high) / 2) / std

    def __call__(self, rng: np.random.Generator, split: str) -> Task:
        curvatures = rng.uniform(*self.curvature_range, size=self.dim)
        theta = self.optimum(curvatures)
        counts = [self.shots, self.query_shots, self.hessian_shots]
        x = rng.standard_normal((sum(counts), self.dim)) * np.sqrt(curvatures)
        y = x @ theta + self.noise_std * rng.standard_normal(sum(counts))
        xs = torch.from_numpy(x.astype(np.float32))
        ys = torch.from_numpy(y.astype(np.float32)).unsqueeze(1)
        support_x, query_x, hessian_x = torch.split(xs, counts)
        support_y, query_y, hessian_y = torch.split(ys, counts)
        if not self.hessian_shots:
            return Task(support_x, support_y, query_x, query_y)
        return Task(support_x, support_y, query_x, query_y, hessian_x, hessian_y)


class LinearTasksDataModule(MetaDataModule):
    """Linear-regression tasks (see :class:`LinearTasks`) as a stream of :class:`TaskBatch` es.

    The model to pair it with is ``torch.nn.Linear(dim, 1, bias=False)`` and the loss ``"mse"``;
    Fallah et al. 2020's assumptions then hold with ``L = 2 * high`` and ``rho = 0``.

    Args:
        dim: Input dimension d.
        spread: Standard deviation s of each coordinate of the task's true weight.
        shots: Support examples per task (``D_in``).
        query_shots: Query examples per task (``D_o``).
        hessian_shots: Hessian-set examples per task (``D_h``); 0 for none.
        meta_batch_size: Tasks per training step (B), over all devices together.
        seed: The data seed.
        num_val_tasks: Fixed validation tasks.
        num_test_tasks: Fixed test tasks.
        eval_meta_batch_size: Tasks per evaluation batch (default: ``meta_batch_size``).
        num_workers: DataLoader workers.
        curvature_range: ``a_i ~ U[low, high]^dim``, the input variances.
        center: The mean of each coordinate of the true weight.
        noise_std: Standard deviation of the label noise.
    """

    def __init__(
        self,
        dim: int = 10,
        spread: float = 1.0,
        shots: int = 50,
        query_shots: int = 50,
        hessian_shots: int = 50,
        meta_batch_size: int = 20,
        seed: int = 0,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        num_workers: int = 0,
        curvature_range: tuple[float, float] = (0.2, 2.0),
        center: float = 1.0,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__(
            meta_batch_size, seed, num_val_tasks, num_test_tasks, eval_meta_batch_size, num_workers
        )
        self.save_hyperparameters()
        self.tasks = LinearTasks(
            dim, spread, shots, query_shots, hessian_shots, curvature_range, center, noise_std
        )

    @property
    def hessian_shots(self) -> int:
        """Examples of the Hessian set ``D_h`` per task (read by ``MetaLearner.setup``)."""
        return self.tasks.hessian_shots

    def task_sampler(self, split: str) -> LinearTasks:
        return self.tasks
