"""What ``lightning-maml`` says about its sub-commands before and after it runs one.

The help lists every sub-command (the Trainer's and the project's tools); ``predict`` and a
config file that is not valid YAML are refused with what to do instead; a ``test`` or
``validate`` without ``--ckpt_path``, which evaluates the model's initialisation, says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "TOOL_DESCRIPTIONS",
    "TRAINER_DESCRIPTIONS",
    "add_tools_to_help",
    "command_line_problem",
    "label_untrained",
    "warn_if_untrained",
]

#: One line per Trainer sub-command, for ``lightning-maml --help`` (Lightning's are cut off
#: mid-sentence there).
TRAINER_DESCRIPTIONS = {
    "fit": "Meta-train a recipe (--config RECIPE.yaml); --ckpt_path resumes a run.",
    "validate": "Evaluate a checkpoint (--ckpt_path) on the validation tasks.",
    "test": "Evaluate a checkpoint (--ckpt_path) on the test tasks, reported as papers do.",
}
#: One line per sub-command that is not a Trainer method, for ``lightning-maml --help``.
TOOL_DESCRIPTIONS = {
    "download": "Download a data set from its official source, verified.",
    "plot": "Draw the logged curves of runs (CSVLogger or W&B files) into a PNG.",
    "estimate": "Estimate the theory's constants (L, rho, sigma, ...) on a recipe's tasks.",
    "plan": "Batch sizes, step size and iterations the theory asks for a target eps.",
    "experiment": "Run the experiment of recipes/theory: the theorems' claims, measured.",
}

PREDICT = (
    "predict is not available: a meta-learner predicts for a task only after adapting to its "
    "support set, and Lightning's predict loop has no support sets. For the loss and accuracy "
    "over test tasks run `lightning-maml test --config RECIPE.yaml --ckpt_path CKPT`; for "
    "predictions, MetaLearner.evaluate(task_batch).predictions in Python."
)

UNTRAINED = (
    "no --ckpt_path: `lightning-maml {stage}` evaluates the model's initialisation (random "
    "weights), not a trained model. To evaluate a trained one, pass its checkpoint: --ckpt_path "
    "<save_dir>/<project or name>/<run>/checkpoints/last.ckpt (for the recipes, "
    "runs/lightning-maml/RUN/checkpoints/last.ckpt)."
)


def add_tools_to_help(parser: ArgumentParser, names: Iterable[str]) -> None:
    """Lists the tools ``names`` among the sub-commands of ``parser``'s help.

    The entries are for the help only: ``lightning-maml TOOL`` runs the tool before this parser
    sees the command line.
    """
    subcommands = parser._subcommands_action
    if subcommands is None:  # LightningCLI adds the sub-commands before it calls this
        return
    for entry in subcommands._choices_actions:
        entry.help = TRAINER_DESCRIPTIONS.get(entry.dest, entry.help)
    for name in names:
        description = TOOL_DESCRIPTIONS[name]
        tool = ArgumentParser(description=f"{description} Run `lightning-maml {name} --help`.")
        subcommands.add_subcommand(name, tool, help=description)


def command_line_problem(args: Sequence[str]) -> str | None:
    """Why ``lightning-maml ARGS`` cannot run, found before Lightning starts, or None.

    ``predict``, and a ``--config`` file that is not valid YAML: jsonargparse names the line of
    the syntax error but not the file, which matters once several ``--config`` are given.
    """
    if args and args[0] == "predict":
        return PREDICT
    for path in _config_files(args):
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            return (
                f"--config {path}: not valid YAML, {_yaml_problem(err)}. Correct the file there "
                "(indentation, a missing ':' or closing bracket, quotes)."
            )
        except (OSError, UnicodeDecodeError):
            continue  # jsonargparse names a missing or unreadable file itself
    return None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what: ``line 4, column 1: expected ... (while parsing ... at line 3, ...)``."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return str(err)
    text = f"line {mark.line + 1}, column {mark.column + 1}: {getattr(err, 'problem', err)}"
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None:
        text += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    return text


def _config_files(args: Sequence[str]) -> list[Path]:
    found = []
    for index, arg in enumerate(args):
        if arg in ("--config", "-c") and index + 1 < len(args):
            found.append(Path(args[index + 1]))
        elif arg.startswith("--config="):
            found.append(Path(arg.removeprefix("--config=")))
    return [path for path in found if path.is_file()]


def warn_if_untrained(stage: str, ckpt_path: str | None) -> None:
    """Warns that ``stage`` evaluates the initialisation when no checkpoint is given."""
    if ckpt_path is None:
        rank_zero_warn(UNTRAINED.format(stage=stage), category=UserWarning)


def label_untrained(summary: str, ckpt_path: str | None) -> str:
    """The printed test result, marked when it is the initialisation's."""
    if ckpt_path is not None:
        return summary
    return f"{summary} -- UNTRAINED: the initialisation, no --ckpt_path given"
