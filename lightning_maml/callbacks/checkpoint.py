"""ModelCheckpoint: Lightning's checkpoint callback, with a ``last.ckpt`` that is always the latest."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` holds the newest state of the run.

    With a monitored metric, Lightning's callback rewrites ``last.ckpt`` only when it also saves a
    top-k checkpoint, that is when the metric improved, and at the end of ``fit`` only if it never
    wrote one before (lightning 2.6). A run whose validation metric stopped improving keeps an old
    ``last.ckpt``, and resuming or testing from it silently goes back in time. This subclass takes
    the same arguments and, with ``save_last``, also writes ``last.ckpt`` after every validation and
    when ``fit`` ends, unless it already holds that global step.

    Example::

        trainer = Trainer(callbacks=[ModelCheckpoint(monitor="val/accuracy", mode="max", save_last=True)])
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_step_in_last: int | None = None

    @override
    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_in_last = trainer.global_step

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self._last_step_in_last == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)
