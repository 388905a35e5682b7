"""The ``lightning-maml`` command: Lightning's CLI for recipes, plus the project's own tools.

``lightning-maml fit|validate|test --config RECIPE.yaml`` runs a recipe through
:class:`lightning.pytorch.cli.LightningCLI` (every Trainer, model and data argument can be
overridden on the command line). The other sub-commands are the project's tools; each lives in
its own module and is loaded only when asked for.
"""

from __future__ import annotations

import importlib
import netrc
import os
import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_maml.learner import MetaLearner

__all__ = ["MetaCLI", "main"]

#: Sub-commands that are not Trainer methods: name -> "module:function(argv) -> int".
TOOLS: dict[str, str] = {
    "plot": "lightning_maml.plot:main",
    "estimate": "lightning_maml.theory.commands:estimate_main",
    "plan": "lightning_maml.theory.commands:plan_main",
}


class MetaCLI(LightningCLI):
    """LightningCLI for :class:`MetaLearner` and any task datamodule (``data.class_path``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(MetaLearner, LightningDataModule, *args, **kwargs)

    def after_fit(self) -> None:
        finish_wandb_runs(self.trainer)

    def after_test(self) -> None:
        finish_wandb_runs(self.trainer)

    def after_validate(self) -> None:
        finish_wandb_runs(self.trainer)


def wandb_credentials_present() -> bool:
    """Whether W&B could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return host is not None


def default_wandb_offline() -> bool:
    """Sets ``WANDB_MODE=offline`` when no mode is chosen and no credentials exist.

    W&B would otherwise prompt for a key (or wait on the network); offline it writes a local run
    that ``wandb sync`` uploads later. Returns whether offline mode was chosen here.
    """
    if os.environ.get("WANDB_MODE") or wandb_credentials_present():
        return False
    os.environ["WANDB_MODE"] = "offline"
    return True


def finish_wandb_runs(trainer) -> None:
    """Closes the W&B runs of ``trainer``, printing ``wandb sync`` for offline ones.

    A command is one run: closing it keeps a later command in the same process (a test after
    a fit, say) from appending to it.
    """
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger) or trainer.global_rank != 0:
            continue
        run = logger.experiment
        if run.settings.mode == "offline":
            run_dir = Path(run.dir).parent
            rank_zero_info(f"W&B run saved offline; upload it with:\n  wandb sync {run_dir}")
        run.finish()


def main(argv: list[str] | None = None) -> int | None:
    """Entry point of the ``lightning-maml`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        module, function = TOOLS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    default_wandb_offline()
    MetaCLI(args=argv)
    return None


if __name__ == "__main__":
    sys.exit(main())
