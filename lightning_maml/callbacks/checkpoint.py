"""ModelCheckpoint: Lightning's checkpoint callback, with a ``last.ckpt`` that is always the latest."""

from __future__ import annotations

import warnings
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_maml import compat

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` holds the newest state of the run.

    With a monitored metric, Lightning's callback rewrites ``last.ckpt`` only when it also saves a
    top-k checkpoint, that is when the metric improved, and at the end of ``fit`` only if it never
    wrote one before (lightning 2.6). A run whose validation metric stopped improving keeps an old
    ``last.ckpt``, and resuming or testing from it silently goes back in time. This subclass takes
    the same arguments and, with ``save_last``, also writes ``last.ckpt`` after every validation and
    when ``fit`` ends, unless it already holds that global step. Every checkpoint is written
    beside its final name and renamed once complete, so that a run killed while saving, or a
    full disk, leaves the previous file intact rather than a truncated one.

    Example::

        trainer = Trainer(callbacks=[ModelCheckpoint(monitor="val/accuracy", mode="max", save_last=True)])
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_step_in_last: int | None = None

    @override
    @compat.overrides_private(LightningModelCheckpoint)
    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_in_last = trainer.global_step

    @override
    @compat.overrides_private(LightningModelCheckpoint)
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Lightning writes a checkpoint to a temporary folder and moves it into place: a copy,
        # which a kill or a full disk can cut short over the previous file, whenever that
        # folder is on another file system (a local /tmp and runs on a network drive). Written
        # beside its name and renamed once complete, a checkpoint is whole or absent.
        partial = f"{filepath}.partial"
        filesystem = compat.checkpoint_filesystem(self)
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)
        except OSError as err:
            if trainer.is_global_zero and filesystem.exists(partial):
                filesystem.rm(partial)
            raise OSError(
                err.errno,
                f"could not write the checkpoint {filepath} ({err.strerror or err}); the "
                "checkpoints written before it are intact: free space, or resume from the "
                "newest of them.",
            ) from err
        if trainer.is_global_zero:
            filesystem.mv(partial, filepath)
        trainer.strategy.barrier("ModelCheckpoint._save_checkpoint")
        compat.record_saved_checkpoint(self, trainer, filepath)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # With manual optimization and every_n_train_steps, Lightning warns at every save that
        # the checkpoint holds the weights after the optimizer step. For a meta-learner those are
        # the weights to save: global_step counts the meta-updates they include, and a fit
        # resumed from them continues exactly as the uninterrupted one (tests/test_faults.py).
        # Only on the steps Lightning saves at (where it warns): leaving catch_warnings resets
        # the warning registries, so every other warning's "once" would repeat at each step.
        n = compat.every_n_train_steps(self)
        if n < 1 or trainer.global_step % n != 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Using ModelCheckpoint with manual optimization"
            )
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if (
            not self.save_last
            or trainer.fast_dev_run  # type: ignore[attr-defined]  # set by Lightning outside __init__, undeclared
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self._last_step_in_last == trainer.global_step
        ):
            return
        compat.save_last_checkpoint(self, trainer, compat.monitor_candidates(self, trainer))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)
