"""The ``lightning-maml`` command: Lightning's CLI for recipes, plus the project's own tools.

``lightning-maml fit|validate|test --config RECIPE.yaml`` runs a recipe through
:class:`lightning.pytorch.cli.LightningCLI` (every Trainer, model and data argument can be
overridden on the command line). The other sub-commands are the project's tools; each lives in
its own module and is loaded only when asked for.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import traceback
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from lightning_maml import compat
from lightning_maml.callbacks.run_lock import RunDirectoryLock
from lightning_maml.checkpoint_io import cli_ckpt_path
from lightning_maml.learner import MetaLearner
from lightning_maml.subcommands import (
    add_tools_to_help,
    command_line_problem,
    label_untrained,
    warn_if_untrained,
)
from lightning_maml.threads import set_threads
from lightning_maml.wandb_connection import default_wandb_offline, finish_wandb_runs

__all__ = ["MetaCLI", "main"]

#: Sub-commands that are not Trainer methods: name -> "module:function(argv) -> int".
TOOLS: dict[str, str] = {
    "plot": "lightning_maml.tools.plot:main",
    "estimate": "lightning_maml.tools.theory:estimate_main",
    "plan": "lightning_maml.tools.theory:plan_main",
    "experiment": "lightning_maml.tools.experiment:main",
    "download": "lightning_maml.datamodules.download:main",
}


class RunConfigToWandb(SaveConfigCallback):
    """Saves the config as LightningCLI does, and gives every W&B run what compares runs.

    The module's hyper-parameters reach W&B on their own (``model``, ``algorithm`` with its
    ``class_path`` and ``init_args``, ``loss``, ...). This adds ``variant`` (the algorithm's class
    name, the same whether it was given as ``lightning_maml.MAML`` or by its full path),
    ``seed_everything`` and the ``trainer`` settings to the run config, the variant (lower case)
    to the run's tags, and the run's own copy of the config file to its files: with
    ``save_dir`` shared by many runs, the copy in ``save_dir`` is the last run's.
    """

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        algorithm = getattr(pl_module, "algorithm", None)
        variant = type(algorithm).__name__ if algorithm is not None else None
        config = self.config.as_dict()
        settings = {
            k: v for k, v in config.get("trainer", {}).items() if k not in ("logger", "callbacks")
        }
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            run = logger.experiment
            run.config.update(
                {
                    "variant": variant,
                    "seed_everything": config.get("seed_everything"),
                    "trainer": settings,
                },
                allow_val_change=True,
            )
            if variant is not None and variant.lower() not in run.tags:
                run.tags = (*run.tags, variant.lower())
            path = Path(run.dir) / self.config_filename
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
            run.save(str(path), base_path=run.dir, policy="now")


class MetaCLI(LightningCLI):
    """LightningCLI for :class:`MetaLearner` and any task datamodule (``data.class_path``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RunConfigToWandb)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(MetaLearner, LightningDataModule, *args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser) -> None:
        # Top level, beside seed_everything: it must take effect before the model is built.
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help=(
                "Intra-op threads torch computes with (default: torch's, one per core). Runs "
                "that share a CPU should each take fewer than its cores; small models such as "
                "the sinusoid MLP run fastest on 1."
            ),
        )

    @override
    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        threads = config.get("threads")
        if threads is None:
            return
        try:
            set_threads(threads)
        except ValueError as error:
            raise ValueError(
                f"{error} It is torch's intra-op threads: set `threads: 1` in the config or "
                "pass --threads 1, or leave it out for torch's default of one per core."
            ) from None
        # Processes this run starts (ddp_spawn ranks, spawned workers) read their threads from
        # the environment when torch starts in them, not from this process's setting.
        os.environ["OMP_NUM_THREADS"] = str(threads)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        # predict is refused in main(): Lightning's loop has no support sets to adapt to.
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    @override
    @compat.overrides_private(LightningCLI)
    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        add_tools_to_help(parser, TOOLS)

    @override
    @compat.overrides_private(LightningCLI)
    def _run_subcommand(self, subcommand: str) -> None:
        # Locked before the Trainer starts: Lightning's CSVLogger empties its directory's
        # metrics.csv during set-up, before any callback could refuse the run.
        lock = RunDirectoryLock()
        self.trainer.callbacks.append(lock)  # type: ignore[attr-defined]  # set by Trainer.__init__
        lock.acquire(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        finally:  # ddp_spawn's ranks run the hooks in their own processes, not in this one
            lock.release()

    @override
    @compat.overrides_private(LightningCLI)
    def _parse_ckpt_path(self) -> None:
        # LightningCLI would load the checkpoint's hyper-parameters over the config and the
        # command line, so that `test --ckpt_path C --model.eval_inner_steps 1` silently ran
        # with the checkpoint's 10 steps. Here the config and command line take effect;
        # MetaLearner.on_load_checkpoint names every setting that differs from the checkpoint's
        # and refuses a different model. Only the file itself is checked now, before any work;
        # Lightning gets the checked file (a remote one's checked local copy).
        subcommand = self.config.get("subcommand")
        if subcommand:
            path = self.config[subcommand].get("ckpt_path")
            self.config[subcommand]["ckpt_path"] = cli_ckpt_path(path, subcommand)

    def after_fit(self) -> None:
        finish_wandb_runs(self.trainer)

    def before_test(self) -> None:
        warn_if_untrained("test", self.config["test"].get("ckpt_path"))

    def before_validate(self) -> None:
        warn_if_untrained("validate", self.config["validate"].get("ckpt_path"))

    def after_test(self) -> None:
        line = test_summary(self.trainer)
        if line is not None and self.trainer.is_global_zero:
            print(label_untrained(line, self.config["test"].get("ckpt_path")))
        finish_wandb_runs(self.trainer)

    def after_validate(self) -> None:
        finish_wandb_runs(self.trainer)


def root_cause(error: BaseException) -> BaseException:
    """The exception behind jsonargparse's wrappers (a model or datamodule's own error).

    jsonargparse re-raises what a constructor raised inside "Does not validate against any of
    the Union subtypes" errors; the chain is followed through those only, so that a project
    error raised from a lower-level one (a checkpoint that cannot be read, say) keeps its message.
    """
    seen = {id(error)}
    while (
        error.__cause__ is not None
        and id(error.__cause__) not in seen
        and _raised_in_jsonargparse(error)
    ):
        error = error.__cause__
        seen.add(id(error))
    return error


def _raised_in_jsonargparse(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename


def tested_tasks(trainer: Trainer) -> int | None:
    """How many test tasks the last ``trainer.test`` evaluated, over all processes (None: unknown).

    All of the datamodule's ``num_test_tasks``, unless ``limit_test_batches`` cut the batches.
    """
    datamodule = getattr(trainer, "datamodule", None)  # set by Lightning, undeclared
    total = getattr(datamodule, "num_test_tasks", None)
    if not isinstance(total, int):
        return None
    batch = getattr(datamodule, "eval_meta_batch_size", None)
    ran = sum(trainer.num_test_batches)
    if isinstance(batch, int) and ran != float("inf") and ran * batch * trainer.world_size < total:
        return int(ran * batch * trainer.world_size)
    return total


def test_summary(trainer: Trainer) -> str | None:
    """The test result as papers report it, from the logged ``test/…`` metrics.

    ``test accuracy: 97.98 +/- 0.26 % over 600 tasks`` for classification (mean over tasks and
    its 95% confidence half-width), ``test loss: 0.0123 +/- 0.0011 over 600 tasks`` otherwise (the interval to two
    significant figures);
    None when no test metric was logged.
    """
    metrics = trainer.callback_metrics
    tasks = tested_tasks(trainer)
    over = f" over {tasks} tasks" if tasks is not None else ""
    if "test/accuracy" in metrics:
        mean = 100 * float(metrics["test/accuracy"])
        ci95 = 100 * float(metrics.get("test/accuracy_ci95", float("nan")))
        return f"test accuracy: {mean:.2f} +/- {ci95:.2f} %{over}"
    if "test/loss" in metrics:
        mean = float(metrics["test/loss"])
        ci95 = float(metrics.get("test/loss_ci95", float("nan")))
        # The interval to two significant figures and the mean to as many decimals.
        places = 1 - math.floor(math.log10(ci95)) if math.isfinite(ci95) and ci95 > 0 else None
        if places is None:
            return f"test loss: {mean:.4g} +/- {ci95:.2g}{over}"
        places = max(places, 0)
        return f"test loss: {mean:.{places}f} +/- {ci95:.{places}f}{over}"
    return None


def main(argv: list[str] | None = None) -> int | None:
    """Entry point of the ``lightning-maml`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in TOOLS:
        module, function = TOOLS[args[0]].split(":")
        return getattr(importlib.import_module(module), function)(args[1:])
    problem = command_line_problem(args)
    if problem is not None:
        print(f"lightning-maml: error: {problem}", file=sys.stderr)
        return 2
    default_wandb_offline()
    try:
        # None lets LightningCLI read sys.argv itself (given both, it warns).
        MetaCLI(args=argv)
    except Exception as error:
        # The traceback stays for debugging, but its last line (what a user reads) is the root
        # cause, not jsonargparse's dump of every Union subtype and the whole given Namespace.
        traceback.print_exc()
        cause = root_cause(error)
        print(f"lightning-maml: error: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
