"""Lightning's private APIs that lightning-maml relies on, each behind one function of this module.

Lightning offers no public way to do these few things; each function says what it needs and why.
Kept here, a Lightning release that changes one of them fails ``tests/test_compat.py``, which
names the function, rather than a training run. Every function was checked against the sources
of Lightning 2.5.5, 2.6.0 and 2.6.6 (the test suite ran on 2.6.6), the versions pyproject.toml
allows. Before 2.5.5, ``LightningCLI`` has no ``_parse_ckpt_path``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from torch import Tensor

__all__ = [
    "CHECKED",
    "OVERRIDES",
    "attached_trainer",
    "checkpoint_filesystem",
    "every_n_train_steps",
    "monitor_candidates",
    "overrides_private",
    "record_saved_checkpoint",
    "save_last_checkpoint",
    "should_update_logs",
]

#: The Lightning versions whose sources every function here was checked against.
CHECKED = "2.5.5, 2.6.0 and 2.6.6"

_Method = TypeVar("_Method", bound=Callable[..., Any])


class Override(NamedTuple):
    """A method of lightning-maml that overrides a private method of a Lightning class."""

    base: type
    method: Callable[..., Any]

    @property
    def name(self) -> str:
        return self.method.__name__


#: Every method marked with :func:`overrides_private`, in the order the modules were imported.
OVERRIDES: list[Override] = []


def overrides_private(base: type) -> Callable[[_Method], _Method]:
    """Marks a method that overrides the private method of the same name of Lightning's ``base``.

    Lightning calls these by name, so a subclass can change what they do only by overriding them:
    ``LightningCLI._parse_ckpt_path`` (it would load a checkpoint's hyper-parameters over the
    config), ``LightningCLI._add_subcommands`` (the help that lists the project's tools),
    ``LightningCLI._run_subcommand`` (the run-directory lock taken before the Trainer starts),
    ``ModelCheckpoint._save_checkpoint`` (how a checkpoint is written) and
    ``ModelCheckpoint._save_last_checkpoint`` (when ``last.ckpt`` is written). Each marked
    method is listed in :data:`OVERRIDES`, which the tests check against the installed Lightning:
    the method is still there and takes the same parameters. Checked against Lightning 2.5.5,
    2.6.0 and 2.6.6.
    """

    def mark(method: _Method) -> _Method:
        OVERRIDES.append(Override(base, method))
        return method

    return mark


def should_update_logs(trainer: pl.Trainer) -> bool:
    """Whether the loggers write the metrics of this training step (every ``log_every_n_steps``).

    Lightning's own ``LearningRateMonitor`` and ``DeviceStatsMonitor`` ask the same private
    ``trainer._logger_connector.should_update_logs``; no public API tells. Checked against
    Lightning 2.5.5, 2.6.0 and 2.6.6.
    """
    return bool(trainer._logger_connector.should_update_logs)


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer that ``module`` is attached to, or None where there is none.

    The public ``module.trainer`` raises when no Trainer is attached; the private
    ``LightningModule._trainer`` is None then. Checked against Lightning 2.5.5, 2.6.0 and 2.6.6.
    """
    return module._trainer


def every_n_train_steps(callback: ModelCheckpoint) -> int:
    """The ``every_n_train_steps`` that ``callback`` saves on (0: it saves on no step count).

    ``ModelCheckpoint`` keeps the value it resolved only in the private ``_every_n_train_steps``.
    Checked against Lightning 2.5.5, 2.6.0 and 2.6.6.
    """
    return int(callback._every_n_train_steps)


def checkpoint_filesystem(callback: ModelCheckpoint) -> AbstractFileSystem:
    """The fsspec file system of ``callback``'s ``dirpath`` (local or remote).

    ``ModelCheckpoint``'s private ``_fs``, which it writes, moves and removes its files with.
    Checked against Lightning 2.5.5, 2.6.0 and 2.6.6.
    """
    return callback._fs


def monitor_candidates(callback: ModelCheckpoint, trainer: pl.Trainer) -> dict[str, Tensor]:
    """The metrics a checkpoint's file name and ``monitor`` may use now (``epoch``, ``step`` too).

    ``ModelCheckpoint``'s private ``_monitor_candidates``. Checked against Lightning 2.5.5, 2.6.0
    and 2.6.6.
    """
    return callback._monitor_candidates(trainer)


def save_last_checkpoint(
    callback: ModelCheckpoint, trainer: pl.Trainer, candidates: dict[str, Tensor]
) -> None:
    """Writes ``last.ckpt`` as ``callback`` does after a save (its own override, if it has one).

    ``ModelCheckpoint``'s private ``_save_last_checkpoint``. Checked against Lightning 2.5.5,
    2.6.0 and 2.6.6.
    """
    callback._save_last_checkpoint(trainer, candidates)


def record_saved_checkpoint(callback: ModelCheckpoint, trainer: pl.Trainer, filepath: str) -> None:
    """Records in ``callback`` that it saved ``filepath`` at the trainer's current global step.

    What Lightning's ``ModelCheckpoint._save_checkpoint`` records after writing, in the private
    ``_last_global_step_saved`` (no second save at the same step) and ``_last_checkpoint_saved``
    (what ``save_last="link"`` links to); an override that writes the file itself records it
    here. Checked against Lightning 2.5.5, 2.6.0 and 2.6.6.
    """
    callback._last_global_step_saved = trainer.global_step
    callback._last_checkpoint_saved = filepath
