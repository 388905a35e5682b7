"""The validation and test metrics of :class:`~lightning_maml.MetaLearner`, exact under DDP."""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, SumMetric

from lightning_maml.algorithms.base import Evaluation, MetaAlgorithm
from lightning_maml.metrics import MeanWithCI

__all__ = ["REDUCED_METRICS_ADVICE", "EvaluationMetrics", "warn_diverged"]

STAGES = ("val", "test")

#: Lightning's advice to log with ``sync_dist=True``, for the evaluation metrics: they are logged
#: from torchmetrics states already reduced over the ranks (the same value on every rank), so a
#: second reduction would add a collective per metric and change nothing.
REDUCED_METRICS_ADVICE = (
    r"It is recommended to use `self\.log\('(val|test)/(loss|accuracy|loss_ci95|accuracy_ci95|"
    r"loss_before)', \.\.\., sync_dist=True\)`"
)


class EvaluationMetrics(nn.ModuleDict):
    """Per stage (``val``, ``test``): the query loss and accuracy over tasks with their 95%
    intervals, the mean pre-adaptation loss, and the counts of tasks and of diverged tasks.

    Every value is a torchmetrics state reduced over the ranks, so the logged result is the one a
    single process would give. The mean pre-adaptation loss is a ``MeanMetric`` weighted by tasks,
    not ``self.log(sync_dist=True)``: that averages the ranks' task counts in integer arithmetic,
    wrong whenever their total is not a multiple of the number of ranks.
    """

    def __init__(self) -> None:
        metrics: dict[str, nn.Module] = {}
        for stage in STAGES:
            metrics[f"{stage}_loss"] = MeanWithCI()
            metrics[f"{stage}_accuracy"] = MeanWithCI()
            metrics[f"{stage}_loss_before"] = MeanMetric()
            # Tasks evaluated, and those whose adapted query loss is not finite, over all ranks.
            metrics[f"{stage}_tasks"] = SumMetric()
            metrics[f"{stage}_diverged"] = SumMetric()
        super().__init__(metrics)

    def metric(self, key: str) -> Metric:
        return cast(Metric, self[key])

    def reset(self) -> None:
        # Under ddp_spawn the states reach every rank in one shared-memory block, which in-place
        # updates would write for all ranks; reset gives each rank its own.
        for key in self:
            self.metric(key).reset()

    def add_batch(
        self, stage: str, result: Evaluation, tasks: int, accuracy: Tensor | None
    ) -> None:
        """Adds one evaluation batch of ``tasks`` tasks (``accuracy`` per task, or None)."""
        self.metric(f"{stage}_tasks").update(float(tasks))
        self.metric(f"{stage}_diverged").update(
            (~torch.isfinite(result.task_losses)).sum().double()
        )
        self.metric(f"{stage}_loss").update(result.task_losses)
        if accuracy is not None:
            self.metric(f"{stage}_accuracy").update(accuracy)
        self.metric(f"{stage}_loss_before").update(result.loss_before, tasks)

    def compute(self, stage: str) -> tuple[dict[str, Tensor], dict[str, Tensor], int, int]:
        """Computes and resets the stage's metrics.

        Every rank computes (a collective under DDP), also one that had no batch to evaluate;
        the reduced result, the same on every rank, decides what is logged.

        Returns:
            The values to log with the progress bar (``{stage}/loss``, ``{stage}/accuracy``),
            the others (their ``_ci95`` and ``{stage}/loss_before``), the number of tasks
            evaluated and the number whose adapted query loss is not finite.
        """
        tasks = int(self._compute(f"{stage}_tasks"))
        diverged = int(self._compute(f"{stage}_diverged"))
        shown, other = {}, {}
        for name in ("loss", "accuracy"):
            mean, ci95 = self._compute(f"{stage}_{name}")
            # The loss of evaluated tasks is logged even when it is not finite: a monitored key
            # must not vanish. Accuracy exists only for classification.
            if (name == "loss" and tasks) or torch.isfinite(mean):
                shown[f"{stage}/{name}"] = mean.float()
                other[f"{stage}/{name}_ci95"] = ci95.float()
        before = self._compute(f"{stage}_loss_before")
        if tasks:
            other[f"{stage}/loss_before"] = before.float()
        return shown, other, tasks, diverged

    def _compute(self, key: str) -> Any:
        metric = self.metric(key)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update``")
            value = metric.compute()
        metric.reset()
        return value


def warn_diverged(
    stage: str,
    tasks: int,
    diverged: int,
    algorithm: MetaAlgorithm,
    eval_inner_steps: int | None,
    global_step: int,
) -> None:
    """Warns that ``diverged`` of ``tasks`` evaluated tasks have a non-finite adapted loss, with
    the likely cause (the inner step size for that many steps) and what to change."""
    steps = eval_inner_steps or algorithm.inner_steps
    longer = f" (training adapts {algorithm.inner_steps})" if steps != algorithm.inner_steps else ""
    where = f"at global step {global_step}" if stage == "val" else "in testing"
    rank_zero_warn(
        f"{stage}/loss is not finite {where}: the adapted query loss diverged on {diverged} "
        f"of {tasks} {stage} tasks, adapting {steps} steps with inner_lr "
        f"{algorithm.inner_lr:g}{longer}. The likely cause is an inner step size too "
        "large for that many steps. Lower model.algorithm.init_args.inner_lr or "
        "model.eval_inner_steps to evaluate; training itself goes on"
        + (" and its checkpoints are kept." if stage == "val" else "."),
        category=UserWarning,
    )
