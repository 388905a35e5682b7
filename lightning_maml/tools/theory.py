"""``lightning-maml estimate`` and ``lightning-maml plan``: the theory from the command line.

    lightning-maml estimate --config RECIPE.yaml [--ckpt_path CKPT] [--tasks 100] [--output estimate.json]
    lightning-maml plan --from estimate.json --eps 0.1
    lightning-maml plan --L 4 --rho 0 --sigma 6.3 --sigma_tilde 20 --sigma_H 9 --inner_lr 0.025 --eps 0.5
    lightning-maml plan --from estimate.json --eps 0.5 --variants maml --constant_from constant.json --write_config plan.yaml
    lightning-maml fit --config plan.yaml

``estimate`` builds the recipe's model and datamodule through the same CLI as ``fit`` (so any
``--model...`` / ``--data...`` override works, e.g. more ``--data.init_args.query_shots`` for
tighter per-task estimates), draws tasks from its loader and prints the constants of the
assumptions at the model's weights, with the meta-loss F(w) and the resolved recipe. ``plan``
turns constants into batch sizes, step size and iteration bound for each variant, and with
``--write_config`` into a runnable recipe on the estimated recipe's model and task family (the
linear family or the sinusoids; the linear family when the constants come without a recipe):
the plan's batch sizes, ``TheoryStepSize`` with its c, its iterations as ``trainer.max_steps``
and ``StationarityMonitor`` with its eps, whose verdict at the end of ``fit`` says whether the
run reached eps within the planned iterations. ``Delta`` defaults to the estimate's meta-loss.

The iteration bound carries the theorem's unspecified O(1) factor. ``--iteration_constant X``
gives it; ``--constant_from FILE`` reads the one ``lightning-maml experiment --constant`` measured
(per variant where the file has one); without either it is 1, and the plan says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import yaml

from lightning_maml import datamodules, variants
from lightning_maml.checkpoint_io import load_checkpoint
from lightning_maml.tasks import TaskBatch
from lightning_maml.theory.estimate import ConstantEstimates, estimate_constants
from lightning_maml.theory.plan import (
    Unreachable,
    VariantPlan,
    compute_plan,
    explain_refusal,
    format_plan,
)
from lightning_maml.tools.arguments import count, finite

__all__ = [
    "estimate_main",
    "format_estimates",
    "plan_config",
    "plan_main",
    "read_constant",
    "write_plan_configs",
]

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
    # F(w) on the same tasks: for a non-negative loss it bounds Delta = F(w) - min F, which
    # `plan` takes from here instead of its default 1.
    meta_loss = float(learner.algorithm.evaluate(learner.model, learner.loss_fn, tasks).loss)
    print(format_estimates(estimates))
    print(f"{'meta_loss':<12} {meta_loss:<12.5g} F(w): mean query loss after adaptation")
    resolved = cli.config.as_dict()
    record = {
        **estimates.as_dict(),
        "meta_loss": meta_loss,
        "inner_lr": learner.algorithm.inner_lr,
        "variant": type(learner.algorithm).__name__,
        "config": args.config,
        "ckpt_path": args.ckpt_path,
        "split": args.split,
        # The recipe as resolved, overrides included: what `plan --write_config` trains.
        "recipe": {
            "seed_everything": resolved.get("seed_everything"),
            "model": {key: resolved["model"].get(key) for key in RECIPE_MODEL_KEYS},
            "data": resolved["data"],
        },
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


def _read_estimate(path: str) -> tuple[dict[str, float], dict]:
    """The planner's constants in the JSON of ``lightning-maml estimate``, each checked, and
    the whole record (its ``meta_loss`` and ``recipe``, when it has them).

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
            values[name] = finite(low, strict)(str(value))
        except argparse.ArgumentTypeError as err:
            raise ValueError(
                f"--from {path}: {name} {err}; estimate again, or give --{name} to override it."
            ) from None
    return values, record


def read_constant(path: str, variant: str) -> tuple[float, str]:
    """The measured O(1) factor of the iteration bound for ``variant``, and where it came from.

    The file is the JSON of ``lightning-maml experiment --constant``: ``iteration_constant``
    (over all variants measured) and ``per_variant`` (name -> constant). A variant of its own is
    used when the file has it, else the overall constant.

    Raises:
        ValueError: Naming the file, for one that cannot be read or holds no positive constant.
    """
    fix = "give the file `lightning-maml experiment --constant` wrote, or --iteration_constant X"
    try:
        record = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(
            f"--constant_from {path}: cannot read it ({err.strerror}); {fix}."
        ) from err
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--constant_from {path}: not valid JSON at line {err.lineno} ({err.msg}); {fix}."
        ) from err
    per_variant = record.get("per_variant", {}) if isinstance(record, dict) else {}
    key, value = (
        (f"per_variant.{variant}", per_variant[variant])
        if isinstance(per_variant, dict) and variant in per_variant
        else (
            "iteration_constant",
            record.get("iteration_constant") if isinstance(record, dict) else None,
        )
    )
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(
            f"--constant_from {path}: {key} must be a number > 0, got {value!r}; {fix}."
        )
    where = record.get("measured_on", "")
    return float(value), f"measured: {path}, {key}" + (f", {where}" if where else "")


#: Examples per held-out task of the StationarityMonitor in a written plan.
MONITOR_SHOTS = 100
#: The fewest and most held-out tasks the written plan gives the monitor by default.
MONITOR_TASKS = (200, 20000)


def monitor_tasks_for(sigma: float, eps: float) -> int:
    """Held-out tasks for which the monitor's estimate can resolve eps.

    The estimate averages per-task meta-gradients whose spread is of order sigma, so with n
    tasks it reads about ``sqrt(||grad F||^2 + sigma^2 / n)``: n = ``(2 sigma / eps)^2`` keeps
    that noise at eps / 2 (clipped to :data:`MONITOR_TASKS`).
    """
    low, high = MONITOR_TASKS
    return int(min(high, max(low, math.ceil((2 * sigma / eps) ** 2))))


def _class_path(cls: type) -> str:
    """``lightning_maml.MAML`` for the package's own exports, else the full module path."""
    import lightning_maml

    if getattr(lightning_maml, cls.__name__, None) is cls:
        return f"lightning_maml.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


#: What an estimate keeps of the recipe's ``model`` section: the algorithm, the meta-optimizer
#: and any LR scheduler are the plan's to set.
RECIPE_MODEL_KEYS = ("model", "loss", "eval_inner_steps")

#: The task families a written plan can run on: the datamodule's class path, the sampler of
#: its held-out tasks for the StationarityMonitor, and the init args the two share.
TASK_FAMILIES = {
    "lightning_maml.datamodules.LinearTasksDataModule": (
        "lightning_maml.datamodules.LinearTasks",
        ("dim", "spread", "curvature_range", "center", "noise_std"),
    ),
    "lightning_maml.datamodules.SinusoidDataModule": (
        "lightning_maml.datamodules.SinusoidTasks",
        ("amplitude_range", "phase_range", "input_range"),
    ),
}


def linear_recipe(dim: int = 10, spread: float = 1.0, seed: int = 0) -> dict:
    """The linear task family as a recipe (``seed_everything``, ``model`` and ``data``
    sections): what a plan runs on when its constants did not come from a recipe's estimate."""
    return {
        "seed_everything": seed,
        "model": {
            "model": {
                "class_path": "torch.nn.Linear",
                "init_args": {"in_features": dim, "out_features": 1, "bias": False},
            },
            "loss": "mse",
        },
        "data": {
            "class_path": "lightning_maml.datamodules.LinearTasksDataModule",
            "init_args": {"dim": dim, "spread": spread, "seed": seed},
        },
    }


def _data_class(data: Any) -> str:
    """The recipe's datamodule class path; a task family's other spellings (the short
    ``datamodules.X``, the defining module's ``lightning_maml.datamodules.sinusoid.X``) become
    its key in :data:`TASK_FAMILIES`. Nothing is imported: the path comes from a file."""
    path = data.get("class_path", "") if isinstance(data, dict) else ""
    name = path.rsplit(".", 1)[-1]
    for family in TASK_FAMILIES:
        cls = getattr(datamodules, family.rsplit(".", 1)[1])
        if name == cls.__name__ and path in (
            family,
            f"datamodules.{name}",
            f"{cls.__module__}.{name}",
        ):
            return family
    return path


def check_recipe(recipe: Any, source: str) -> dict:
    """The recipe an estimate recorded, checked for what a written plan needs.

    Raises:
        ValueError: Naming ``source``, for a recipe without a model or a datamodule, or whose
            datamodule is not a task family in :data:`TASK_FAMILIES` (the StationarityMonitor
            of a written plan draws its held-out tasks, with 100 examples each, from the family).
    """
    if (
        not isinstance(recipe, dict)
        or not isinstance(recipe.get("model"), dict)
        or not isinstance(recipe.get("data"), dict)
    ):
        raise ValueError(
            f"--from {source}: its `recipe` has no model and data sections; estimate again "
            "with this version of `lightning-maml estimate`."
        )
    family = _data_class(recipe["data"])
    if family not in TASK_FAMILIES:
        names = ", ".join(path.rsplit(".", 1)[1] for path in TASK_FAMILIES)
        raise ValueError(
            f"--write_config: the recipe of {source} trains on {family or 'no datamodule'}; a "
            f"written plan runs on a task family whose held-out tasks its StationarityMonitor "
            f"can draw ({names}). Plan without --write_config, or estimate on a recipe with one "
            "of those."
        )
    return recipe


def plan_config(
    plan: VariantPlan,
    variant: str,
    *,
    recipe: dict | None = None,
    monitor_every: int | None = None,
    monitor_tasks: int | None = None,
) -> dict:
    """A LightningCLI config that runs ``plan`` on a recipe's model and task family.

    The recipe's model, loss and datamodule are kept; the plan sets the algorithm (the
    variant at the plan's inner_lr and inner_steps), the data batch sizes, plain SGD with
    ``TheoryStepSize``, ``trainer.max_steps`` and a ``StationarityMonitor`` with the plan's eps.
    The recipe's own callbacks, logger and LR scheduler are left out: validation is off, and
    the theory's step size replaces any schedule.

    Args:
        plan: The variant's plan.
        variant: The variant's registered name.
        recipe: ``seed_everything``, ``model`` and ``data`` sections, as ``lightning-maml
            estimate`` records them (default: :func:`linear_recipe`); its datamodule must be
            one of :data:`TASK_FAMILIES`.
        monitor_every: Steps between the monitor's estimates (default: the plan's iterations
            over 100, at least 1): the resolution of the reached step.
        monitor_tasks: The monitor's held-out tasks (default: :func:`monitor_tasks_for`).
    """
    recipe = check_recipe(recipe if recipe is not None else linear_recipe(), "the recipe")
    entry = variants.get(variant)
    steps = plan.iterations
    every = monitor_every or max(1, math.ceil(steps / 100))
    algorithm_args: dict = {"inner_lr": plan.inner_lr, "inner_steps": plan.inner_steps}
    if entry.constants.hessian_batch is not None:
        algorithm_args["hessian_batch"] = "independent"  # the paper's estimator
    if entry.constants.finite_difference and plan.rho > 0:
        # The theorem's delta_i = 1 / (6 rho alpha ||v_i||), which the plan prints; with
        # rho = 0 the difference is exact for any delta and the variant's default stays.
        algorithm_args.update(delta="theory", rho=plan.rho)
    step_size_args: dict = {"L": plan.L, "rho": plan.rho, "c": plan.step_size_constant}
    if plan.rho > 0:
        step_size_args.update(tasks=plan.step_tasks, shots=plan.step_shots)
    data_class = _data_class(recipe["data"])
    data_args = dict(recipe["data"].get("init_args") or {})
    sampler_class, shared = TASK_FAMILIES[data_class]
    # Copies: one object in two places would be written as a YAML anchor and alias.
    sampler_args = {name: copy.deepcopy(data_args[name]) for name in shared if name in data_args}
    sampler_args.update(shots=MONITOR_SHOTS, query_shots=MONITOR_SHOTS, hessian_shots=MONITOR_SHOTS)
    data_args.update(
        shots=plan.inner_shots,
        query_shots=plan.query_shots,
        hessian_shots=plan.hessian_shots or 0,
        meta_batch_size=plan.task_batch,
    )
    model = {key: value for key, value in recipe["model"].items() if value is not None}
    return {
        "seed_everything": recipe.get("seed_everything") or 0,
        # The task families' small models run fastest on one thread, and side by side.
        "threads": 1,
        "trainer": {
            "max_steps": steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "log_every_n_steps": every,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": f"plan-{variant}"},
            },
            "callbacks": [
                {
                    "class_path": "lightning_maml.callbacks.TheoryStepSize",
                    "init_args": step_size_args,
                },
                {
                    "class_path": "lightning_maml.callbacks.StationarityMonitor",
                    "init_args": {
                        "every_n_steps": every,
                        "tasks": monitor_tasks or monitor_tasks_for(plan.sigma, plan.eps),
                        "eps": plan.eps,
                        "stop": True,
                        "planned_steps": steps,
                        "sampler": {"class_path": sampler_class, "init_args": sampler_args},
                    },
                },
            ],
        },
        "model": {
            **model,
            "algorithm": {"class_path": _class_path(entry.algorithm), "init_args": algorithm_args},
            "meta_optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": plan.max_step}},
        },
        "data": {"class_path": data_class, "init_args": data_args},
    }


def config_paths(path: str, names: list[str]) -> dict[str, Path]:
    """Where ``--write_config PATH`` writes each variant's config: PATH itself for one variant,
    ``STEM-VARIANT.SUFFIX`` beside it for several (one variant per file)."""
    target = Path(path)
    if len(names) == 1:
        return {names[0]: target}
    return {n: target.with_name(f"{target.stem}-{n}{target.suffix or '.yaml'}") for n in names}


def model_name(config: dict) -> str:
    """The class name of a config's model, for the written file's first line."""
    model = config["model"].get("model")
    path = model.get("class_path", "") if isinstance(model, dict) else ""
    return path.rsplit(".", 1)[-1] or "the recipe's model"


def write_plan_configs(
    plans: dict[str, VariantPlan], path: str, header: dict[str, list[str]], **options
) -> list[Path]:
    """Writes each variant's :func:`plan_config` (see :func:`config_paths`) under its ``header``
    lines; returns the files."""
    written = []
    for name, target in config_paths(path, list(plans)).items():
        plan = plans[name]
        config = plan_config(plan, name, **options)
        family = config["data"]["class_path"].rsplit(".", 1)[1]
        lines = [
            f"# {variants.get(name).title} on {family} with {model_name(config)}, as "
            "`lightning-maml plan` planned it",
            *[f"# {line}" for line in header[name]],
            f"# iterations {plan.iterations} = trainer.max_steps; the StationarityMonitor stops at "
            f"the first estimate <= eps = {plan.eps:g} and prints its verdict.",
            f"# Run:  lightning-maml fit --config {target}",
            "# Override: --trainer.max_steps N (more or fewer iterations than planned)",
        ]
        body = yaml.safe_dump(config, sort_keys=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(lines) + "\n" + body)
        written.append(target)
    return written


def _delta(given: float | None, meta_loss: Any, source: str | None) -> tuple[float, str]:
    """``Delta = F(w_0) - min F`` for the bound, and where it came from: ``--Delta``, else the
    meta-loss the estimate recorded (an upper bound when the loss is non-negative, as ``mse``
    and ``cross_entropy`` are), else 1."""
    if given is not None:
        return given, "given: --Delta"
    if (
        isinstance(meta_loss, (int, float))
        and not isinstance(meta_loss, bool)
        and math.isfinite(meta_loss)
        and meta_loss > 0
    ):
        return float(meta_loss), (
            f"the meta-loss F(w_0) recorded in {source}, an upper bound of F(w_0) - min F for a "
            "non-negative loss; --Delta gives a tighter one"
        )
    return 1.0, "NOT KNOWN: taken as 1, the bound per unit of Delta; --Delta gives it"


def plan_main(argv: list[str]) -> int:
    """``lightning-maml plan``: batch sizes, step size and iteration bound per variant.

    Args:
        argv: The command line after ``plan``.

    Returns:
        0 when every requested variant has a plan, 2 when one was refused (FO-MAML below its
        floor; the reason is printed, and no config is written for it).
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
        help="F(w_0) - min F for the iteration bound, > 0 (default: the meta-loss F(w_0) "
        "that --from recorded, which bounds it for a non-negative loss; else 1)",
    )
    constant = parser.add_mutually_exclusive_group()
    constant.add_argument(
        "--iteration_constant",
        "--iteration-constant",
        type=finite(0.0, strict=True),
        help="the O(1) factor of the iteration bound, > 0 (default 1: not measured)",
    )
    constant.add_argument(
        "--constant_from",
        "--constant-from",
        help="JSON of `lightning-maml experiment --constant`: the measured O(1) factor",
    )
    parser.add_argument(
        "--inner_steps",
        type=count(1),
        default=1,
        help="inner steps N per task (N > 1: Ji, Yang, Liang 2022's multi-step conditions)",
    )
    covered = variants.names(theory=True)
    parser.add_argument(
        "--variants", nargs="+", choices=covered, default=covered, help="variants to plan"
    )
    parser.add_argument(
        "--write_config",
        "--write-config",
        metavar="PLAN.yaml",
        help="write a runnable `lightning-maml fit` config (one variant: this file; several: "
        "PLAN-VARIANT.yaml each) on the model and tasks of the recipe --from was estimated "
        "on, or without one on the linear task family",
    )
    parser.add_argument(
        "--dim", type=count(1), help="linear family without a recipe: input dimension (10)"
    )
    parser.add_argument(
        "--spread", type=finite(0.0), help="linear family without a recipe: task spread s (1)"
    )
    parser.add_argument(
        "--monitor_every",
        type=count(1),
        help="steps between StationarityMonitor estimates (default: iterations / 100)",
    )
    parser.add_argument(
        "--monitor_tasks",
        type=count(2),
        help="StationarityMonitor's held-out tasks (default: (2 sigma / eps)^2, 200 to 20000, "
        "so that its estimate resolves eps)",
    )
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    record: dict = {}
    if args.source:
        try:
            values, record = _read_estimate(args.source)
        except ValueError as err:
            parser.error(str(err))
    recipe = record.get("recipe")
    if recipe is not None and (args.dim is not None or args.spread is not None):
        parser.error(
            f"--dim and --spread set the linear family of a plan without a recipe; --from "
            f"{args.source} names its recipe (its data: {_data_class(recipe.get('data'))}). "
            "Leave them out, or give the constants without --from."
        )
    if args.write_config:
        try:
            recipe = (
                check_recipe(recipe, args.source)
                if recipe is not None
                else linear_recipe(args.dim or 10, 1.0 if args.spread is None else args.spread)
            )
        except ValueError as err:
            parser.error(str(err))
    Delta, Delta_source = _delta(args.Delta, record.get("meta_loss"), args.source)
    values.update(
        {name: getattr(args, name) for name in PLAN_INPUTS if getattr(args, name) is not None}
    )
    missing = [name for name in PLAN_INPUTS if name not in values]
    if missing:
        parser.error(
            f"missing {', '.join('--' + m for m in missing)} (give them or --from a JSON)."
        )
    constants: dict[str, tuple[float, str]] = {}
    for name in args.variants:
        if args.constant_from:
            try:
                constants[name] = read_constant(args.constant_from, name)
            except ValueError as err:
                parser.error(str(err))
        elif args.iteration_constant is not None:
            constants[name] = (args.iteration_constant, "given: --iteration_constant")
        else:
            constants[name] = (
                1.0,
                "NOT MEASURED: the theorem's O(1) taken as 1; --constant_from FILE gives a "
                "measured one",
            )

    inputs = (
        ", ".join(f"{name} = {values[name]:.4g}" for name in PLAN_INPUTS)
        + f", eps = {args.eps:.4g}, Delta = {Delta:.4g}, inner_steps = {args.inner_steps}"
    )
    print("inputs: " + inputs)
    # What a refused variant can turn to: the covered variants whose bounds have no floor.
    floorless = [v.title for v in variants.variants(theory=True) if not v.constants.bias]
    status = 0
    plans = {}
    for name in args.variants:
        variant = variants.get(name)
        factor, source = constants[name]
        print()
        try:
            plan = compute_plan(
                variant.constants,
                eps=args.eps,
                Delta=Delta,
                iteration_constant=factor,
                inner_steps=args.inner_steps,
                **values,
            )
            print(format_plan(plan, variant.title))
            print(f"O(1) of the iterations: {factor:.4g} ({source})")
            print(f"Delta of the iterations: {Delta:.4g} ({Delta_source})")
            plans[name] = plan
        except Unreachable as refusal:
            print(f"{variant.title}\nREFUSED: {explain_refusal(refusal, variant.title, floorless)}")
            status = 2
    if args.write_config and plans:
        header = {
            n: [
                f"inputs: {inputs}",
                f"Delta of the iterations: {Delta:.4g} ({Delta_source})",
                f"O(1) of the iterations: {constants[n][0]:.4g} ({constants[n][1]})",
                *(
                    [
                        f"the constants are at the weights of {record['ckpt_path']}; this "
                        "config trains from the recipe's initial weights"
                    ]
                    if record.get("ckpt_path")
                    else []
                ),
            ]
            for n in plans
        }
        written = write_plan_configs(
            plans,
            args.write_config,
            header,
            recipe=recipe,
            monitor_every=args.monitor_every,
            monitor_tasks=args.monitor_tasks,
        )
        print()
        for path in written:
            print(f"wrote {path}: lightning-maml fit --config {path}")
    return status
