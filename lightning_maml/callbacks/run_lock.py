"""RunDirectoryLock: one run at a time in a logger's run directory.

Two runs given the same CSVLogger version (``--trainer.logger.init_args.version 3`` twice, or
two starts that pick the same next free version) write one ``metrics.csv``: Lightning empties it
when the second starts and both then append their rows to it, interleaved. A lock beside the run
directory (on the file ``.version_3.lock`` next to ``version_3/``, through :mod:`filelock`; the
operating system releases it when the process ends, however it ends, and the empty file stays)
makes the second run stop with the name of the directory and the option to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

__all__ = ["RunDirectoryInUse", "RunDirectoryLock"]


class RunDirectoryInUse(RuntimeError):
    """Another run holds the lock of a run directory this run would log into."""


class RunDirectoryLock(Callback):
    """Refuses to start a run in a run directory that a running one logs into.

    The run directories are those of the Trainer's ``CSVLogger`` and ``TensorBoardLogger``
    (``<save_dir>/<name>/version_<n>``); W&B keeps each run apart by its own id. Rank 0 holds the
    locks from :meth:`setup` (or an earlier :meth:`acquire`) to :meth:`teardown`, or to the
    exception that ends the run.

    Lightning's ``CSVLogger`` empties the ``metrics.csv`` of its directory as the Trainer sets it
    up, before any callback runs; ``lightning-maml`` therefore calls :meth:`acquire` before it
    starts the Trainer, so that a second run stops before it touches the first one's files.

    Example::

        trainer = Trainer(logger=CSVLogger("runs"), callbacks=[RunDirectoryLock()])

    Raises:
        RunDirectoryInUse: When a run starts in a directory whose lock another process holds.
    """

    def __init__(self) -> None:
        self._locks: dict[Path, FileLock] = {}
        # Directories a parent process locked for this run (under ddp_spawn the ranks are new
        # processes that receive a copy of this callback).
        self._inherited: set[Path] = set()

    @staticmethod
    def run_directories(trainer: pl.Trainer) -> list[Path]:
        """The local run directories of the Trainer's file-based loggers."""
        found = []
        for logger in trainer.loggers:
            if not isinstance(logger, (CSVLogger, TensorBoardLogger)) or not logger.log_dir:
                continue
            if "://" not in str(logger.log_dir):
                found.append(Path(logger.log_dir).resolve())
        return found

    def acquire(self, trainer: pl.Trainer) -> None:
        """Takes the lock of each run directory on rank 0, or raises :class:`RunDirectoryInUse`."""
        refusal = self._try_acquire(trainer) if trainer.is_global_zero else None
        if refusal is not None:
            raise RunDirectoryInUse(refusal)

    def release(self) -> None:
        """Releases every lock this process holds."""
        while self._locks:
            _, lock = self._locks.popitem()
            lock.release()

    def _try_acquire(self, trainer: pl.Trainer) -> str | None:
        for directory in self.run_directories(trainer):
            if directory in self._locks or directory in self._inherited:
                continue
            directory.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(directory.with_name(f".{directory.name}.lock"), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                self.release()
                return (
                    f"the run directory {directory} is in use by another run (it holds "
                    f"{lock.lock_file}): two runs logging into one directory interleave their "
                    "metrics. Give this run another directory: another version "
                    "(--trainer.logger.init_args.version, or leave it unset for the next free "
                    "one), name (--trainer.logger.init_args.name) or save_dir "
                    "(--trainer.logger.init_args.save_dir); or wait until the other run ends."
                )
            self._locks[directory] = lock
            # The directory exists from now on: a run that starts next and picks the next free
            # version skips it. Empty, it draws no "directory not empty" warning from Lightning.
            directory.mkdir(exist_ok=True)
        return None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refusal = self._try_acquire(trainer) if trainer.is_global_zero else None
        # Every rank stops, not only the one that found the lock taken.
        refusal = trainer.strategy.broadcast(refusal)
        if refusal is not None:
            raise RunDirectoryInUse(refusal)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.release()

    def __getstate__(self) -> dict[str, Any]:
        # A lock belongs to the process that took it; a copy (ddp_spawn's ranks) only knows it
        # is held for this run.
        return {"_locks": {}, "_inherited": self._inherited | set(self._locks)}
