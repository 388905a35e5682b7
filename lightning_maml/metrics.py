"""Few-shot evaluation metrics: a mean over tasks with its 95% confidence interval."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MeanWithCI", "classification_accuracy", "mean_with_ci", "task_accuracy"]

#: The two-sided 95% quantile of the standard normal, as papers use for 600 test tasks.
Z_95 = 1.959963984540054


def _from_moments(total: Tensor, total_sq: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    mean = total / count
    # Sample variance (n - 1) from the running moments; clamp guards against rounding below 0.
    variance = ((total_sq - count * mean**2) / (count - 1)).clamp_min(0.0)
    return mean, Z_95 * torch.sqrt(variance / count)


def mean_with_ci(values: Tensor) -> tuple[Tensor, Tensor]:
    """The mean of per-task values and the half-width of its 95% confidence interval.

    ``mean +/- 1.96 * s / sqrt(n)`` with ``s`` the sample standard deviation over the ``n`` tasks,
    the way few-shot papers report accuracy over 600 test tasks.
    """
    values = values.detach().double().flatten()
    if values.numel() < 2:
        raise ValueError("A confidence interval needs at least two tasks.")
    return _from_moments(values.sum(), (values**2).sum(), torch.tensor(float(values.numel())))


def task_accuracy(predictions: Tensor, targets: Tensor) -> Tensor:
    """Each task's query accuracy from logits ``(tasks, query, classes)`` and labels ``(tasks, query)``."""
    return (predictions.argmax(-1) == targets).float().flatten(1).mean(1)


class MeanWithCI(Metric):
    """Accumulates per-task values; ``compute()`` gives ``(mean, ci95 half-width)``.

    The state is three sums reduced by addition, so the result is the same on one process and
    over DDP ranks that each saw part of the tasks, in equal shares or not. With fewer than two
    values the half-width is NaN (and with none, the mean too).
    """

    full_state_update = False
    total: Tensor
    total_sq: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        values = values.detach().double().flatten()
        # Out of place: under ddp_spawn the module reaches every rank pickled, its initial states
        # in one shared-memory block, so an in-place add would also add to the other ranks' sums.
        self.total = self.total + values.sum()
        self.total_sq = self.total_sq + (values**2).sum()
        self.count = self.count + values.numel()

    def compute(self) -> tuple[Tensor, Tensor]:
        if self.count < 2:
            nan = torch.tensor(math.nan, dtype=torch.float64, device=self.total.device)
            return (self.total / self.count if self.count else nan), nan
        return _from_moments(self.total, self.total_sq, self.count)


def classification_accuracy(predictions: Tensor, targets: Tensor) -> Tensor | None:
    """Per-task accuracy where the tasks are classification (integer targets, predictions with a
    class dimension), else ``None``."""
    if targets.is_floating_point() or predictions.dim() != targets.dim() + 1:
        return None
    return task_accuracy(predictions, targets)
