"""Checks that the data suits the model, the loss and the algorithm, before a stage's first step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_maml.tasks import TaskBatch

__all__ = ["check_batch", "check_hessian_shots", "check_targets"]


def check_batch(model: nn.Module, loss: str | None, batch: TaskBatch) -> None:
    """Raises ``ValueError`` if ``batch`` does not suit the model and the loss.

    One forward pass of the model on the first task's support set, then, for a loss given
    by name, the targets of every set against its predictions: ``"mse"`` needs floating
    targets shaped exactly like the predictions (no silent broadcasting), and
    ``"cross_entropy"`` integer labels, one per example, within the model's classes.
    MetaLearner calls it on the first batch of each stage.
    """
    if not isinstance(batch, TaskBatch):
        raise ValueError(
            f"MetaLearner takes batches of tasks (lightning_maml.TaskBatch), got "
            f"{type(batch).__name__}: use a datamodule of lightning_maml.datamodules or yield TaskBatch."
        )
    try:
        with torch.no_grad():
            prediction = model(batch.support_x[0])
    except RuntimeError as err:
        raise ValueError(
            f"The model cannot take this batch's inputs (one task's support_x is shaped "
            f"{tuple(batch.support_x.shape[1:])}): {err}"
        ) from err
    for split in ("support", "query", "hessian"):
        targets = getattr(batch, f"{split}_y")
        if targets is not None:
            check_targets(loss, prediction, targets, split)


def check_targets(loss: str | None, prediction: Tensor, targets: Tensor, split: str) -> None:
    """Raises ``ValueError`` if ``targets`` (all tasks) do not suit ``prediction`` (one task).

    Shapes are compared per example: the sets of a task differ in their number of examples.
    """
    predicted, given = tuple(prediction.shape[1:]), tuple(targets.shape[2:])
    if loss == "mse":
        if not targets.is_floating_point():
            raise ValueError(
                f"loss='mse' needs floating-point targets, but the {split} targets are "
                f"{targets.dtype}: for class labels use loss='cross_entropy'."
            )
        if given != predicted:
            raise ValueError(
                f"loss='mse' compares predictions with targets element by element, but the model "
                f"predicts {predicted} per example and the {split} targets are {given} per "
                f"example (tasks, examples, *{given}). Shape the targets like the predictions, "
                f"(tasks, examples, *{predicted}) (e.g. y.unsqueeze(-1)), rather than let them "
                "broadcast."
            )
    elif loss == "cross_entropy":
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(
                f"loss='cross_entropy' needs integer class labels, but the {split} targets are "
                f"{targets.dtype}: convert labels with .long(), or use loss='mse' for regression."
            )
        if len(predicted) != 1 or given != ():
            raise ValueError(
                f"loss='cross_entropy' needs one label per example, (tasks, examples), and one "
                f"score per class from the model: it predicts {predicted} per example and the "
                f"{split} labels are {given} per example."
            )
        classes = predicted[0]
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            raise ValueError(
                f"The {split} labels go from {low} to {high}, but the model has {classes} "
                f"outputs: the tasks have more ways than the model. Give the model one output "
                f"per way (e.g. --model.model.init_args.ways {high + 1}), or the data as many "
                f"ways as the model (--data.init_args.ways {classes})."
            )


def check_hessian_shots(algorithm: Any, datamodule: Any) -> None:
    """Raises ``ValueError`` when ``algorithm`` needs a Hessian set ``D_h`` per task and the
    datamodule's ``hessian_shots`` is 0 (found in its ``hparams``; others are not checked)."""
    hessian_shots = getattr(datamodule, "hparams", {}).get("hessian_shots")
    if getattr(algorithm, "needs_hessian_batch", False) and hessian_shots == 0:
        raise ValueError(
            f"{type(algorithm).__name__}(hessian_batch='independent') needs a Hessian "
            "set D_h per task, but the datamodule has hessian_shots=0: set hessian_shots > 0 "
            "(e.g. data.init_args.hessian_shots=10) or use hessian_batch='inner'."
        )
