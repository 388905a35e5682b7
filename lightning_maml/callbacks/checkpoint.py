"""ModelCheckpoint: Lightning's checkpoint callback, with a ``last.ckpt`` that is always the latest."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_maml import compat

__all__ = ["ModelCheckpoint", "Stopped"]

#: The signals that stop a fit with a checkpoint: schedulers (SLURM, Kubernetes, cloud spot
#: instances) send SIGTERM; SLURM sends the signal of ``--signal`` (SIGUSR1 in its examples).
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class Stopped(SIGTERMException):
    """Ends ``fit`` after a stop signal, once ``last.ckpt`` holds the current step.

    A ``SystemExit`` (Lightning's ``SIGTERMException``) whose exit status is 128 plus the
    signal's number, as a shell reports a process that the signal ended: 143 for SIGTERM,
    138 for SIGUSR1 (on Linux).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


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

    With ``save_on_signal`` (the default), a ``fit`` sent SIGTERM or SIGUSR1 (how schedulers
    stop or preempt a job) finishes the meta-step it is in, writes ``last.ckpt`` with that step
    whether or not ``save_last`` is set, finishes that step's validation if one is due, and
    exits with status 128 + the signal's number (143 for SIGTERM), printing where the
    checkpoint is and the command that resumes from it. Lightning alone stops after the step or
    in the middle of a validation, with status 0, keeping only the steps up to the last
    validation. The handlers replace Lightning's for these signals while training runs, its
    SLURM auto-requeue one included (which saves wherever the step is): requeue from the batch
    script instead (recipes/README.md). Under DDP the ranks agree on stopping at every step
    (one all-reduce of a flag). ``validate`` and ``test`` stopped by SIGTERM exit with 143 too.

    Example::

        trainer = Trainer(callbacks=[ModelCheckpoint(monitor="val/accuracy", mode="max", save_last=True)])
    """

    def __init__(self, *args, save_on_signal: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.save_on_signal = save_on_signal
        self._last_step_in_last: int | None = None
        self._signal: int | None = None  # the stop signal received, if any
        self._launcher: Any = None
        self._stopped_at: tuple[int, str] | None = None  # (step, checkpoint) saved on a signal

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
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message="Using ModelCheckpoint with manual optimization"
                )
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_stop(trainer):
            self._save_on_signal(trainer)

    # -- stopping on a signal --------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Here, after Lightning set its handlers: its SIGTERM handler makes the loops stop at
        # the next batch, or in the middle of a validation, without a checkpoint. Lightning
        # puts back the handlers from before fit when fit ends.
        if not self.save_on_signal or threading.current_thread() is not threading.main_thread():
            return
        self._launcher = trainer.strategy.launcher
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None:
            return
        self._signal = signum
        if self._launcher is not None:
            # The processes Lightning started get the signal too, as its own handler does.
            self._launcher.kill(signum)

    def _should_stop(self, trainer: pl.Trainer) -> bool:
        if not self.save_on_signal or self._stopped_at is not None:
            return False
        if self._signal is None and trainer.received_sigterm:  # came before on_train_start
            self._signal = signal.SIGTERM
        received = self._signal is not None
        if trainer.world_size > 1:  # every rank saves at the same step, or none does
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if received and self._signal is None:
            self._signal = signal.SIGTERM  # another rank received it
        return received

    def _save_on_signal(self, trainer: pl.Trainer) -> None:
        # The point of Lightning's step checkpoints (every_n_train_steps): the meta-step's
        # update is done, and a fit resumed from here continues exactly (tests/test_faults.py).
        candidates = compat.monitor_candidates(self, trainer)
        if self.save_last:
            compat.save_last_checkpoint(self, trainer, candidates)
            path = self.last_model_path
        else:
            path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
            self._save_checkpoint(trainer, path)
        self._stopped_at = (trainer.global_step, path)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        # One step later than the save: the step's metrics are logged and its validation run.
        if self._stopped_at is not None:
            raise Stopped(self._signal or signal.SIGTERM)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        if not self.save_on_signal or not isinstance(exception, SIGTERMException):
            return
        signum = self._signal or signal.SIGTERM
        # Lightning's own stop (in the sanity check, validate or test) would exit with status 0.
        exception.code = 128 + signum
        if trainer.is_global_zero:
            print(self._stop_message(trainer, signum), file=sys.stderr, flush=True)

    def _stop_message(self, trainer: pl.Trainer, signum: int) -> str:
        name = signal.Signals(signum).name
        if trainer.state.fn != TrainerFn.FITTING:
            during = trainer.state.fn.value if trainer.state.fn is not None else "set-up"
            return f"lightning-maml: stopped by {name} during {during}: no result."
        if self._stopped_at is None:
            return (
                f"lightning-maml: stopped by {name} before training step "
                f"{trainer.global_step + 1}; nothing new to save: run the same command again."
            )
        step, path = self._stopped_at
        return (
            f"lightning-maml: stopped by {name} at step {step}; {path} holds that step. "
            f"Resume with: {resume_command(path)}"
        )

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


def resume_command(checkpoint: str) -> str:
    """The command that resumes this process's ``fit`` from ``checkpoint``.

    This process's own command line with ``--ckpt_path`` set to ``checkpoint`` when it is
    ``lightning-maml fit`` (or ``python -m lightning_maml.cli fit``); otherwise what to pass.
    """
    program, *args = sys.argv or [""]
    cli = Path(program).name == "lightning-maml" or program.endswith(
        os.path.join("lightning_maml", "cli.py")
    )
    if not cli or args[:1] != ["fit"]:
        return f"ckpt_path={checkpoint!r} (--ckpt_path {checkpoint} on the command line)"
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["lightning-maml", *kept, "--ckpt_path", str(checkpoint)])
