"""``lightning-maml estimate`` and ``lightning-maml plan``: the theory from the command line.

    lightning-maml estimate --config RECIPE.yaml [--ckpt_path CKPT] [--tasks 100] [--output estimate.json]
    lightning-maml plan --from estimate.json --eps 0.1
    lightning-maml plan --L 4 --rho 0 --sigma 6.3 --sigma_tilde 20 --sigma_H 9 --inner_lr 0.025 --eps 0.5

``estimate`` builds the recipe's model and datamodule through the same CLI as ``fit`` (so any
``--model...`` / ``--data...`` override works, e.g. more ``--data.init_args.query_shots`` for
tighter per-task estimates), draws tasks from its loader and prints the constants of the
assumptions at the model's weights. ``plan`` turns constants into batch sizes, step size and
iteration bound for each variant.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from lightning_maml import variants
from lightning_maml.checkpoint_io import load_checkpoint
from lightning_maml.tasks import TaskBatch
from lightning_maml.theory.estimate import ConstantEstimates, estimate_constants
from lightning_maml.theory.plan import Unreachable, compute_plan, explain_refusal, format_plan
from lightning_maml.tools.arguments import count, finite

__all__ = ["estimate_main", "format_estimates", "plan_main"]

#: What each estimate measures, for the printed table.
EXPLANATIONS = {
    "L": "largest |eigenvalue| of hess f_i over the tasks (power iteration, {power_iterations} steps)",
    "rho": "ESTIMATE: max ||hess f_i(w + r e) v - hess f_i(w) v|| / r, r = {rho_radius:g}, "
    "2 directions per task",
    "sigma": "spread of task gradients, within-task noise removed",
    "sigma_tilde": "spread of per-example gradients within a task (root mean over tasks)",
    "sigma_H": "spread of per-example Hessian-vector products, max over {directions} + 1 directions",
    "grad_norm": "mean task-gradient norm E_i ||grad f_i(w)||",
}


def _collect_tasks(datamodule, split: str, count: int) -> TaskBatch:
    """The first ``count`` tasks the datamodule's ``split`` loader yields."""
    datamodule.prepare_data()
    datamodule.setup("fit" if split == "train" else "validate")
    loader = {
        "train": datamodule.train_dataloader,
        "val": datamodule.val_dataloader,
        "test": datamodule.test_dataloader,
    }[split]()
    batches, total = [], 0
    for batch in loader:
        batches.append(batch)
        total += batch.num_tasks
        if total >= count:
            break
    tasks = TaskBatch.stack(batches)
    return tasks.narrow(0, min(count, tasks.num_tasks))


def format_estimates(estimates: ConstantEstimates) -> str:
    """The estimates as an aligned table: name, value, what it measures."""
    values = estimates.as_dict()
    rows = [
        f"{name:<12} {values[name]:<12.5g} {how.format(**values)}"
        for name, how in EXPLANATIONS.items()
    ]
    return "\n".join(
        [
            f"at the current weights, on {estimates.tasks} tasks x {estimates.examples} examples",
            *rows,
        ]
    )


def estimate_main(argv: list[str]) -> int:
    """``lightning-maml estimate``: the constants of the assumptions for a recipe.

    Args:
        argv: The command line after ``estimate``; arguments this command does not know go to
            the recipe's CLI (``--model...``, ``--data...``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-maml estimate",
        description="Estimate L, rho, sigma, sigma_tilde and sigma_H (Fallah et al. 2020) at a "
        "model's weights on a recipe's tasks. Other arguments (--data.init_args.query_shots "
        "200, ...) override the recipe.",
    )
    parser.add_argument("--config", required=True, action="append", help="recipe YAML")
    parser.add_argument("--ckpt_path", help="checkpoint whose weights to use (default: init)")
    parser.add_argument(
        "--tasks",
        type=count(2),
        default=100,
        help="number of tasks, at least 2: spreads need two (default 100)",
    )
    parser.add_argument(
        "--split", choices=["train", "val", "test"], default="train", help="task split"
    )
    parser.add_argument("--power_iterations", type=count(1), default=30)
    parser.add_argument("--rho_radius", type=finite(0.0, strict=True), default=1e-3)
    parser.add_argument("--directions", type=count(0), default=4)
    parser.add_argument("--task_chunk_size", type=count(1), default=8)
    parser.add_argument("--seed", type=count(0), default=0, help="seed of the random directions")
    parser.add_argument("--output", default="estimate.json", help="JSON file to write")
    args, rest = parser.parse_known_args(argv)
    checkpoint = None
    if args.ckpt_path:
        try:  # before the recipe is built: a wrong path fails at once
            checkpoint = load_checkpoint(args.ckpt_path)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))

    # Imported here: the CLI pulls in Lightning's argument machinery, which `plan` never needs.
    from lightning_maml.cli import MetaCLI

    cli_args = [arg for config in args.config for arg in ("--config", config)]
    with warnings.catch_warnings():
        # It warns whenever sys.argv is non-empty; here the arguments are passed on on purpose.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # No logger: nothing is trained, and W&B would otherwise start a run.
        cli = MetaCLI(args=[*cli_args, *rest, "--trainer.logger=false"], run=False)
    learner = cli.model
    if checkpoint is not None:
        try:  # names a checkpoint of another model, as test --ckpt_path does
            learner.on_load_checkpoint(checkpoint)
        except ValueError as err:
            parser.error(str(err))
        learner.load_state_dict(checkpoint["state_dict"])
    tasks = _collect_tasks(cli.datamodule, args.split, args.tasks)
    estimates = estimate_constants(
        learner.model,
        learner.loss_fn,
        tasks,
        power_iterations=args.power_iterations,
        rho_radius=args.rho_radius,
        directions=args.directions,
        task_chunk_size=args.task_chunk_size,
        seed=args.seed,
    )
    print(format_estimates(estimates))
    record = {
        **estimates.as_dict(),
        "inner_lr": learner.algorithm.inner_lr,
        "variant": type(learner.algorithm).__name__,
        "config": args.config,
        "ckpt_path": args.ckpt_path,
        "split": args.split,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


#: The planner's constants and the range of each: (bound, whether the bound itself is excluded).
PLAN_RANGES = {
    "L": (0.0, True),
    "rho": (0.0, False),
    "sigma": (0.0, False),
    "sigma_tilde": (0.0, False),
    "sigma_H": (0.0, False),
    "inner_lr": (0.0, True),
}
PLAN_INPUTS = tuple(PLAN_RANGES)


def _read_estimate(path: str) -> dict[str, float]:
    """The planner's constants in the JSON of ``lightning-maml estimate``, each checked.

    Raises:
        ValueError: Naming the file, and the line or the constant, for a file that cannot be
            read, is not JSON, or holds a constant out of its range.
    """
    fix = "give the file `lightning-maml estimate --output` wrote"
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"--from {path}: cannot read it ({err.strerror}); {fix}.") from err
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--from {path}: not valid JSON at line {err.lineno}, column {err.colno} "
            f"({err.msg}); {fix}, or correct that line."
        ) from err
    if not isinstance(record, dict):
        raise ValueError(f"--from {path}: expected a JSON object of constants; {fix}.")
    values = {}
    for name in PLAN_INPUTS:
        if name not in record:
            continue
        value = record[name]
        low, strict = PLAN_RANGES[name]
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise argparse.ArgumentTypeError(f"must be a number, got {value!r}")
            values[name] = finite(low, strict)(value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(
                f"--from {path}: {name} {err}; estimate again, or give --{name} to override it."
            ) from None
    return values


def plan_main(argv: list[str]) -> int:
    """``lightning-maml plan``: batch sizes, step size and iteration bound per variant.

    Args:
        argv: The command line after ``plan``.

    Returns:
        0 when every requested variant has a plan, 2 when one was refused (FO-MAML below its
        floor; the reason is printed).
    """
    parser = argparse.ArgumentParser(
        prog="lightning-maml plan",
        description="What Fallah et al. 2020's theorems ask for to reach E||grad F|| <= eps.",
    )
    parser.add_argument("--from", dest="source", help="JSON written by `lightning-maml estimate`")
    for name, (low, strict) in PLAN_RANGES.items():
        relation = ">" if strict else ">="
        parser.add_argument(
            f"--{name}",
            type=finite(low, strict),
            help=f"{name}, finite and {relation} {low:g} (overrides --from)",
        )
    parser.add_argument(
        "--eps", type=finite(0.0, strict=True), required=True, help="target E||grad F|| <= eps"
    )
    parser.add_argument(
        "--Delta",
        type=finite(0.0, strict=True),
        default=1.0,
        help="F(w_0) - min F for the iteration bound, > 0 (default 1)",
    )
    covered = variants.names(theory=True)
    parser.add_argument(
        "--variants", nargs="+", choices=covered, default=covered, help="variants to plan"
    )
    args = parser.parse_args(argv)

    values = {}
    if args.source:
        try:
            values = _read_estimate(args.source)
        except ValueError as err:
            parser.error(str(err))
    values.update(
        {name: getattr(args, name) for name in PLAN_INPUTS if getattr(args, name) is not None}
    )
    missing = [name for name in PLAN_INPUTS if name not in values]
    if missing:
        parser.error(
            f"missing {', '.join('--' + m for m in missing)} (give them or --from a JSON)."
        )

    print(
        "inputs: "
        + ", ".join(f"{name} = {values[name]:.4g}" for name in PLAN_INPUTS)
        + f", eps = {args.eps:.4g}, Delta = {args.Delta:.4g}"
    )
    # What a refused variant can turn to: the covered variants whose bounds have no floor.
    floorless = [v.title for v in variants.variants(theory=True) if not v.theory.bias]
    status = 0
    for name in args.variants:
        variant = variants.get(name)
        print()
        try:
            plan = compute_plan(variant.theory, eps=args.eps, Delta=args.Delta, **values)
            print(format_plan(plan, variant.title))
        except Unreachable as refusal:
            print(f"{variant.title}\nREFUSED: {explain_refusal(refusal, variant.title, floorless)}")
            status = 2
    return status
