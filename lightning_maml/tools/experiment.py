"""The experiment of ``recipes/theory``: Fallah et al. 2020's claims, measured.

Part 1, linear-regression tasks (``lightning_maml.datamodules.LinearTasks``), where F and grad F are exact
(:class:`lightning_maml.theory.LinearTaskFamily`): MAML, FO-MAML and HF-MAML (Hessian terms on
an independent batch D_h) from ``w_0 = 0`` with the theory's step size ``beta_k = c / L~`` (here
``L~ = 4 L`` since ``rho = 0``), the exact ``||grad F(w_k)||`` recorded at every step. All runs
of one (spread, batch sizes) group see the same task stream, so they differ only in the
algorithm and inner_lr. It sweeps inner_lr, the batch sizes (B and every data batch times 4) and
the task spread, and sets FO-MAML's final level against ``inner_lr * sigma``.

Part 2, Finn et al.'s sinusoid MLP: the constants estimated at ``w_0``
(:func:`lightning_maml.theory.estimate_constants`), B' and D_beta from the planner, then each
variant trained by a Lightning ``Trainer`` with :class:`TheoryStepSize` and watched by
:class:`StationarityMonitor`; HF-MAML uses the theorem's ``delta = 1 / (6 rho alpha ||v||)``,
and the error of its finite-difference meta-gradient against MAML's is measured.

    lightning-maml experiment --output runs/theory

writes ``linear.png``, ``sinusoid.png``, ``results.json`` and a W&B run (offline without a key).

Part 3 (``--constant``, run on its own): the O(1) factor of the iteration bound, measured. MAML
and HF-MAML run on the linear family from ``w_0 = 0`` until the exact ``||grad F||`` first reaches
each eps; the factor is the iterations needed over the bound with factor 1,
``Delta (L + rho alpha (sigma + eps)) / eps^2`` (exact ``Delta = F(w_0) - min F``; ``rho = 0``
here). Each variant's constant is the largest ratio over the eps values, so that a plan with it
would have been long enough at every one; ``constant.json`` holds them for
``lightning-maml plan --constant_from``. FO-MAML runs all the steps at an inner_lr whose exact
floor lies above the smallest eps, to show where it settles (from ``w_0 = 0`` its path crosses
MAML's optimum, so ``||grad F||`` dips below eps on the way: the first crossing is recorded too),
and MAML with N inner steps (inner_lr scaled as 1/N, Ji et al. 2022) shows the effect of N.

    lightning-maml experiment --constant --output runs/constant
This module sits on top of the package (it uses the ``datamodules`` package); nothing imports it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_maml import variants
from lightning_maml.algorithms import MetaAlgorithm
from lightning_maml.callbacks import StationarityMonitor, TheoryStepSize
from lightning_maml.datamodules.base import TrainTaskStream
from lightning_maml.datamodules.linear_tasks import LinearTasks
from lightning_maml.datamodules.sinusoid import SinusoidDataModule, SinusoidTasks
from lightning_maml.functional import axpy, tree_norm
from lightning_maml.learner import MetaLearner
from lightning_maml.models import MLP
from lightning_maml.tasks import TaskBatch
from lightning_maml.theory.estimate import estimate_constants
from lightning_maml.theory.linear import LinearTaskFamily
from lightning_maml.theory.multistep import curvature_factor
from lightning_maml.theory.plan import step_size_batches
from lightning_maml.theory.step_size import theory_step_size
from lightning_maml.tools.arguments import count

__all__ = ["constant_part", "final_level", "linear_curves", "main", "steps_to_eps"]

#: Inner step sizes of the linear sweep. The loss "mse" has no 1/2, so these equal inner_lr
#: 0.025 / 0.05 / 0.1 on the loss 0.5 * mse (the same iterates, with every gradient doubled).
INNER_LRS = (0.0125, 0.025, 0.05)
#: B and the size of each data batch (D_in = D_o = D_h) of the smaller setting; "4x" multiplies both.
TASKS, SHOTS, SCALE = 20, 50, 4
#: Task spreads of the sweep, at the middle inner_lr.
SPREADS = (0.5, 1.0, 2.0)
#: The variant whose meta-gradient is exact: the others are compared with it.
REFERENCE = "maml"


def theory_variants() -> list[str]:
    """The registered variants that the theory covers (MAML, FO-MAML, HF-MAML): the runs."""
    return variants.names(theory=True)


def floored(names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose bound has a floor that no batch size removes (FO-MAML)."""
    return [name for name in names if variants.get(name).constants.bias]


def title(variant: str) -> str:
    return variants.get(variant).title


def color(variant: str) -> str:
    return variants.get(variant).color


def make_algorithm(variant: str, inner_lr: float, inner_steps: int = 1, **kwargs) -> MetaAlgorithm:
    """The paper's form of a variant: its Hessian terms, if it has any, on the independent
    batch D_h."""
    entry = variants.get(variant)
    if entry.constants.hessian_batch is None:
        return entry.build(inner_lr, inner_steps=inner_steps)
    return entry.build(inner_lr, inner_steps=inner_steps, hessian_batch="independent", **kwargs)


def linear_curves(
    runs: Sequence[tuple[str, float]],
    spread: float = 1.0,
    tasks: int = TASKS,
    shots: int = SHOTS,
    steps: int = 2000,
    seed: int = 0,
    dim: int = 10,
) -> dict[tuple[str, float], np.ndarray]:
    """The exact ``||grad F(w_k)||``, ``k = 0 .. steps``, of each ``(variant, inner_lr)`` run.

    Every run starts at ``w_0 = 0`` and takes the theory's step ``c / L~(w_k)``; all runs share
    one task stream (``lightning_maml.datamodules.LinearTasks`` with ``tasks`` tasks per step and ``shots``
    examples in each of D_in, D_o, D_h).

    Args:
        runs: ``(variant, inner_lr)`` pairs.
        spread: The task spread s.
        tasks: B.
        shots: D_in = D_o = D_h.
        steps: Meta-steps.
        seed: The data seed.
        dim: The input dimension.

    Returns:
        Each run's curve of ``steps + 1`` values.
    """
    family = LinearTaskFamily(dim=dim, spread=spread)
    stream = TrainTaskStream(LinearTasks(dim, spread, shots, shots, shots), tasks, seed)
    loss_fn = nn.functional.mse_loss
    state = []
    for variant, inner_lr in runs:
        model = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(model.weight)
        c = variants.get(variant).constants.step_size
        beta, _ = theory_step_size(family.L, family.rho, inner_lr, c, None)
        state.append(
            (
                model,
                make_algorithm(variant, inner_lr),
                beta,
                [family.grad_F_norm(model.weight.detach(), inner_lr)],
            )
        )
    for step in range(steps):
        batch = stream.batch(step)
        for model, algorithm, beta, curve in state:
            grads = algorithm.meta_gradient(model, loss_fn, batch).grads
            with torch.no_grad():
                model.weight.sub_(beta * grads["weight"])
            curve.append(family.grad_F_norm(model.weight.detach(), algorithm.inner_lr))
    return {run: np.asarray(s[3]) for run, s in zip(runs, state, strict=True)}


def final_level(curve: np.ndarray, tail: int) -> float:
    """The mean of the last ``tail`` values: where the iterates hover once converged."""
    return float(np.mean(curve[-tail:]))


def linear_part(steps: int, tail: int, seed: int) -> dict:
    """The sweeps of part 1; returns the curves and a record per run."""
    curves, records = {}, []

    def group(runs, spread, scale):
        started = time.perf_counter()
        result = linear_curves(runs, spread, TASKS * scale, SHOTS * scale, steps, seed)
        print(
            f"  spread {spread}, B = {TASKS * scale}, D = {SHOTS * scale}: {len(runs)} runs in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        family = LinearTaskFamily(spread=spread)
        for (variant, inner_lr), curve in result.items():
            curves[(variant, inner_lr, spread, scale)] = curve
            sigma = family.sigma(family.maml_optimum(inner_lr))
            records.append(
                {
                    "variant": variant,
                    "inner_lr": inner_lr,
                    "spread": spread,
                    "tasks": TASKS * scale,
                    "shots": SHOTS * scale,
                    "final": final_level(curve, tail),
                    "start": float(curve[0]),
                    "sigma": sigma,
                    "inner_lr_sigma": inner_lr * sigma,
                    "exact_fomaml_floor": family.fomaml_floor(inner_lr),
                    "beta": variants.get(variant).constants.step_size / (4 * family.L),
                }
            )

    names = theory_variants()
    all_runs = [(v, a) for a in INNER_LRS for v in names]
    for scale in (1, SCALE):
        group(all_runs, 1.0, scale)
    for spread in SPREADS:
        if spread != 1.0:
            group([(v, INNER_LRS[1]) for v in [*floored(names), REFERENCE]], spread, 1)
    return {"curves": curves, "records": records}


def _pick(records: list[dict], **match) -> dict:
    return next(r for r in records if all(r[k] == v for k, v in match.items()))


def plot_linear(result: dict, path: Path) -> None:
    """Three panels: curves at the largest inner_lr, final levels, FO-MAML's floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, records = result["curves"], result["records"]
    names = theory_variants()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))

    ax = axes[0]
    alpha = INNER_LRS[-1]
    for variant in names:
        for scale, style in ((1, "-"), (SCALE, "--")):
            curve = curves[(variant, alpha, 1.0, scale)]
            ax.plot(
                curve,
                style,
                color=color(variant),
                lw=0.8,
                label=f"{title(variant)}, B={TASKS * scale}, D={SHOTS * scale}",
            )
    floor = LinearTaskFamily().fomaml_floor(alpha)
    ax.axhline(floor, color="black", ls=":", lw=1, label=f"FO-MAML floor (exact) {floor:.3f}")
    ax.set(
        yscale="log",
        xlabel="step k",
        ylabel="exact ||grad F(w_k)||",
        title=f"linear tasks, inner_lr = {alpha}, spread 1",
    )
    ax.legend(fontsize=7)

    ax = axes[1]
    for variant in names:
        for scale, marker in ((1, "o"), (SCALE, "s")):
            finals = [
                _pick(records, variant=variant, inner_lr=a, spread=1.0, tasks=TASKS * scale)[
                    "final"
                ]
                for a in INNER_LRS
            ]
            ax.plot(
                INNER_LRS,
                finals,
                marker=marker,
                ls="-" if scale == 1 else "--",
                color=color(variant),
                label=f"{title(variant)}, {scale}x batches",
            )
    grid = np.linspace(INNER_LRS[0] * 0.8, INNER_LRS[-1] * 1.1, 50)
    ax.plot(
        grid,
        [LinearTaskFamily().fomaml_floor(a) for a in grid],
        "k:",
        label="FO-MAML floor (exact)",
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="inner_lr",
        ylabel="final ||grad F|| (mean of last iterates)",
        title="final level against inner_lr and batch size",
    )
    ax.legend(fontsize=7)

    ax = axes[2]
    fo = _floored_records(records)
    for variant in floored(names):
        for scale, marker in ((1, "o"), (SCALE, "s")):
            pts = [r for r in fo if r["variant"] == variant and r["tasks"] == TASKS * scale]
            ax.scatter(
                [r["inner_lr_sigma"] for r in pts],
                [r["final"] for r in pts],
                marker=marker,
                color=color(variant),
                label=f"{title(variant)} measured, {scale}x batches",
                zorder=3,
            )
    exact = sorted((r["inner_lr_sigma"], r["exact_fomaml_floor"]) for r in fo)
    ax.plot(*zip(*exact, strict=True), "k:", marker="x", label="FO-MAML floor (exact)")
    slope = _floor_slope(records)
    xs = np.linspace(0, max(x for x, _ in exact) * 1.05, 10)
    ax.plot(
        xs,
        slope * LinearTaskFamily().L * xs,
        color="gray",
        lw=0.8,
        label=f"{slope:.2f} * inner_lr * L * sigma",
    )
    ax.set(
        xlabel="inner_lr * sigma  (sigma: task-gradient spread at the MAML optimum)",
        ylabel="final ||grad F||",
        title="FO-MAML's floor grows linearly in inner_lr * sigma",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floored_records(records: list[dict]) -> list[dict]:
    """The records of the runs whose variant's bound has a floor (FO-MAML's)."""
    names = set(floored(sorted({r["variant"] for r in records})))
    return [r for r in records if r["variant"] in names]


def _floor_slope(records: list[dict]) -> float:
    """k of ``floor = k * inner_lr * L * sigma``, least squares through 0 over the exact floors."""
    fo = _floored_records(records)
    x = np.array([r["inner_lr_sigma"] * LinearTaskFamily().L for r in fo])
    y = np.array([r["exact_fomaml_floor"] for r in fo])
    return float(x @ y / (x @ x))


# -- part 2: sinusoids -------------------------------------------------------------------------


def sinusoid_part(
    steps: int,
    every: int,
    seed: int,
    inner_lr: float = 0.01,
    probe_tasks: int = 50,
    probe_shots: int = 100,
    monitor_tasks: int = 400,
    monitor_shots: int = 100,
) -> dict:
    """Part 2: estimate, plan and train the three variants on sinusoids with the callbacks.

    Args:
        steps: Meta-steps per variant.
        every: Steps between the monitor's estimates.
        seed: Seed of the initial weights and of the tasks.
        inner_lr: The inner step size (Finn et al.'s 0.01).
        probe_tasks: Validation tasks on which the constants are estimated at ``w_0``.
        probe_shots: Query examples of each of those tasks (plus 10 support examples).
        monitor_tasks: The monitor's held-out tasks.
        monitor_shots: Examples in each data batch of those tasks.
    """
    torch.manual_seed(seed)
    model = MLP()
    probe = SinusoidDataModule(
        shots=10,
        query_shots=probe_shots,
        num_val_tasks=probe_tasks,
        eval_meta_batch_size=probe_tasks,
        seed=seed,
    )
    estimates = estimate_constants(
        model, nn.functional.mse_loss, TaskBatch.stack(list(probe.eval_set("val")))
    )
    print(
        "  constants at w_0: "
        + ", ".join(
            f"{k} = {getattr(estimates, k):.4g}"
            for k in ("L", "rho", "sigma", "sigma_tilde", "sigma_H", "grad_norm")
        )
    )
    (_, step_tasks), (_, step_shots) = step_size_batches(
        estimates.L, estimates.rho, estimates.sigma, estimates.sigma_tilde, inner_lr
    )
    held_out = SinusoidTasks(monitor_shots, monitor_shots, monitor_shots)
    histories, betas, fd_errors = {}, {}, {}
    for variant in theory_variants():
        # A finite-difference variant takes the theorem's delta = 1 / (6 rho alpha ||v||).
        finite_difference = variants.get(variant).constants.finite_difference
        extra: dict[str, Any] = (
            {"delta": "theory", "rho": estimates.rho} if finite_difference else {}
        )
        learner = MetaLearner(
            copy.deepcopy(model),
            make_algorithm(variant, inner_lr, **extra),
            loss="mse",
            meta_optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        )
        step_size = TheoryStepSize(estimates.L, estimates.rho, tasks=step_tasks, shots=step_shots)
        monitor = StationarityMonitor(every_n_steps=every, tasks=monitor_tasks, sampler=held_out)
        trainer = Trainer(
            max_steps=steps,
            callbacks=[step_size, monitor],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accelerator="cpu",
            devices=1,
        )
        started = time.perf_counter()
        trainer.fit(
            learner,
            datamodule=SinusoidDataModule(
                shots=10, query_shots=10, hessian_shots=10, meta_batch_size=25, seed=seed
            ),
        )
        print(
            f"  {title(variant)}: {steps} steps in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        histories[variant] = monitor.history
        betas[variant] = step_size.beta
        if finite_difference:
            fd_errors[variant] = _finite_difference_errors(
                variant, learner, monitor, estimates.rho, inner_lr
            )
    return {
        "estimates": estimates.as_dict(),
        "inner_lr": inner_lr,
        "monitor_tasks": monitor_tasks,
        "step_tasks": step_tasks,
        "step_shots": step_shots,
        "histories": histories,
        "last_beta": betas,
        **{f"{variant}_relative_error": errors for variant, errors in fd_errors.items()},
    }


def _finite_difference_errors(
    variant: str, learner: MetaLearner, monitor: StationarityMonitor, rho: float, inner_lr: float
) -> dict[str, float]:
    """``||g_HF - g_MAML|| / ||g_MAML||`` on the monitor's held-out tasks, per delta rule of the
    finite-difference ``variant`` (HF-MAML), and for the other variants without Hessian terms.

    The ReLU network is not twice differentiable (A2 fails at the kinks): a perturbation that
    moves a unit across its kink changes the gradient by a jump, which the finite difference
    divides by delta. So the error is not monotone in delta, unlike on smooth losses.
    """
    tasks = monitor.held_out
    exact = (
        make_algorithm(REFERENCE, inner_lr)
        .meta_gradient(learner.model, learner.loss_fn, tasks)
        .grads
    )
    rules: dict[str, dict[str, Any]] = {"theory": {"delta": "theory", "rho": rho}}
    rules.update({f"delta_scale={c:g}": {"delta_scale": c} for c in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)})
    errors = {}
    for name, kwargs in rules.items():
        approx = (
            make_algorithm(variant, inner_lr, **kwargs)
            .meta_gradient(learner.model, learner.loss_fn, tasks)
            .grads
        )
        errors[name] = (tree_norm(axpy(-1.0, exact, approx)) / tree_norm(exact)).item()
    for other in theory_variants():
        if (
            other not in (variant, REFERENCE)
            and variants.get(other).constants.hessian_batch is None
        ):
            grads = make_algorithm(other, inner_lr).meta_gradient(
                learner.model, learner.loss_fn, tasks
            )
            errors[title(other)] = (
                tree_norm(axpy(-1.0, exact, grads.grads)) / tree_norm(exact)
            ).item()
    return errors


def plot_sinusoid(result: dict, path: Path) -> None:
    """The monitor's ||grad F|| estimate against the step, with its standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, history in result["histories"].items():
        steps, values, stderr = (np.array(c) for c in zip(*history, strict=True))
        ax.plot(
            steps,
            values,
            color=color(variant),
            marker=".",
            label=f"{title(variant)} (last beta {result['last_beta'][variant]:.2e})",
        )
        ax.fill_between(steps, values - stderr, values + stderr, color=color(variant), alpha=0.15)
    ax.set(
        xlabel="step k",
        ylabel=f"||grad F(w_k)|| (StationarityMonitor, {result['monitor_tasks']} tasks)",
        title=f"sinusoid MLP, inner_lr = {result['inner_lr']}, theory step size",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- reporting ---------------------------------------------------------------------------------


def log_wandb(output: Path, linear: dict, sinusoid: dict | None, figures: list[Path]) -> None:
    """One W&B run: the headline curves step by step, the table of final levels, the figures."""
    import wandb

    from lightning_maml.cli import default_wandb_offline

    default_wandb_offline()
    run = wandb.init(
        project="lightning-maml",
        group="theory",
        job_type="experiment",
        dir=str(output),
        config={"inner_lrs": INNER_LRS, "tasks": TASKS, "shots": SHOTS, "scale": SCALE},
    )
    run.define_metric("linear/step")
    run.define_metric("linear/*", step_metric="linear/step")
    headline = {
        f"linear/{v}/{s}x/grad_F_norm": linear["curves"][(v, INNER_LRS[-1], 1.0, s)]
        for v in theory_variants()
        for s in (1, SCALE)
    }
    length = len(next(iter(headline.values())))
    for k in range(length):
        run.log({"linear/step": k, **{name: float(c[k]) for name, c in headline.items()}})
    columns = list(linear["records"][0])
    run.log(
        {
            "linear/finals": wandb.Table(
                columns=columns, data=[[r[c] for c in columns] for r in linear["records"]]
            )
        }
    )
    if sinusoid is not None:
        run.define_metric("sinusoid/step")
        run.define_metric("sinusoid/*", step_metric="sinusoid/step")
        for variant, history in sinusoid["histories"].items():
            for step, value, stderr in history:
                run.log(
                    {
                        "sinusoid/step": step,
                        f"sinusoid/{variant}/grad_F_norm": value,
                        f"sinusoid/{variant}/grad_F_norm_stderr": stderr,
                    }
                )
    run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
    offline = run.settings.mode == "offline"
    run_dir = Path(run.dir).parent
    run.finish()
    if offline:
        print(f"W&B run saved offline; upload it with:\n  wandb sync {run_dir}")


def summary(linear: dict, sinusoid: dict | None) -> str:
    """The measured figures as text: final levels per setting, ratios, floors."""
    records = linear["records"]
    lines = ["linear tasks (exact ||grad F||, mean of the last iterates):"]
    lines.append(
        f"{'variant':<8} {'inner_lr':>8} {'spread':>6} {'B':>4} {'D':>4} {'final':>8} {'FO floor':>9}"
    )
    for r in records:
        lines.append(
            f"{r['variant']:<8} {r['inner_lr']:>8g} {r['spread']:>6g} {r['tasks']:>4} {r['shots']:>4} {r['final']:>8.4f} {r['exact_fomaml_floor']:>9.4f}"
        )
    lines.append(
        f"exact FO-MAML floor = {_floor_slope(records):.3f} * inner_lr * L * sigma (least squares)"
    )
    if sinusoid is not None:
        lines.append(
            f"sinusoid MLP (StationarityMonitor, {sinusoid['monitor_tasks']} held-out tasks):"
        )
        for variant, history in sinusoid["histories"].items():
            (s0, v0, _), (s1, v1, e1) = history[0], history[-1]
            lines.append(
                f"  {title(variant):<8} ||grad F|| {v0:.3f} at step {s0} -> {v1:.3f} +- {e1:.3f} at step {s1}"
            )
        for variant in theory_variants():
            errors = sinusoid.get(f"{variant}_relative_error")
            if errors is not None:
                lines.append(
                    f"  meta-gradient vs {title(REFERENCE)}'s on the held-out tasks at "
                    f"{title(variant)}'s last iterate, relative error: "
                    + ", ".join(f"{k}: {v:.3g}" for k, v in errors.items())
                )
    return "\n".join(lines)


def steps_to_eps(
    variant: str,
    inner_lr: float,
    eps: Sequence[float],
    *,
    inner_steps: int = 1,
    tasks: int = TASKS * SCALE,
    shots: int = SHOTS * SCALE,
    max_steps: int = 5000,
    seed: int = 0,
    spread: float = 1.0,
    dim: int = 10,
    run_on: bool = False,
) -> dict:
    """Runs one variant on the linear family until the exact ``||grad F||`` reaches every eps.

    From ``w_0 = 0`` with the theory's step ``c / L~`` (N inner steps: the N-step ``L~`` of
    :mod:`lightning_maml.theory.multistep`), B = ``tasks`` and D_in = D_o = D_h = ``shots``.
    With ``run_on`` it runs all ``max_steps`` regardless, for the level it settles at.

    Returns:
        ``reached`` (eps -> the first step where ``||grad F|| <= eps``, or ``None``), ``best``
        and ``best_step``, ``beta``, ``Delta`` (exact ``F(w_0) - min F``), ``steps`` run,
        ``seconds`` of wall time, ``start`` (``||grad F(w_0)||``) and ``final`` (the mean over
        the last quarter of the steps).
    """
    family = LinearTaskFamily(dim=dim, spread=spread)
    stream = TrainTaskStream(LinearTasks(dim, spread, shots, shots, shots), tasks, seed)
    model = nn.Linear(dim, 1, bias=False)
    nn.init.zeros_(model.weight)
    algorithm = make_algorithm(variant, inner_lr, inner_steps)
    c = variants.get(variant).constants.step_size
    beta, _ = theory_step_size(family.L, family.rho, inner_lr, c, None, inner_steps)
    w0 = np.zeros(dim)
    optimum = family.maml_optimum(inner_lr, inner_steps)
    Delta = family.F(w0, inner_lr, inner_steps) - family.F(optimum, inner_lr, inner_steps)
    targets = sorted(eps, reverse=True)
    reached: dict[float, int | None] = dict.fromkeys(targets)
    value = family.grad_F_norm(w0, inner_lr, inner_steps)
    start, best, best_step, step = value, value, 0, 0
    curve = [value]
    started = time.perf_counter()
    while True:
        for e in targets:
            if reached[e] is None and value <= e:
                reached[e] = step
        if (reached[targets[-1]] is not None and not run_on) or step == max_steps:
            break
        grads = algorithm.meta_gradient(model, nn.functional.mse_loss, stream.batch(step)).grads
        with torch.no_grad():
            model.weight.sub_(beta * grads["weight"])
        step += 1
        value = family.grad_F_norm(model.weight.detach(), inner_lr, inner_steps)
        curve.append(value)
        if value < best:
            best, best_step = value, step
    return {
        "variant": variant,
        "inner_lr": inner_lr,
        "inner_steps": inner_steps,
        "reached": reached,
        "best": best,
        "best_step": best_step,
        "beta": beta,
        "Delta": Delta,
        "L": family.L,
        "start": start,
        "steps": step,
        "final": final_level(np.asarray(curve), max(1, len(curve) // 4)),
        "seconds": time.perf_counter() - started,
        "exact_fomaml_floor": family.fomaml_floor(inner_lr, inner_steps),
    }


def bound_with_unit_constant(Delta: float, L: float, eps: float, inner_steps: int = 1) -> float:
    """The iteration bound with O(1) = 1 on the linear family (``rho = 0``):
    ``Delta L_N / eps^2`` with ``L_N = (1 + 1/N)^(2N) L / 4`` (L at N = 1)."""
    return Delta * curvature_factor(inner_steps) / 4 * L / eps**2


#: The eps values of the constant measurement, and its inner_lr.
CONSTANT_EPS = (1.0, 0.5, 0.25, 0.1)
CONSTANT_INNER_LR = INNER_LRS[1]
#: FO-MAML forced below its floor: the inner_lr whose exact floor (0.25) lies above eps 0.1.
FORCED_INNER_LR = INNER_LRS[2]
#: FO-MAML's forced run: enough steps to settle at its floor.
FORCED_STEPS = 2000
#: N of the multi-step rows, and N * inner_lr, held fixed (inner_lr of order 1/N).
INNER_STEPS = (1, 2, 5, 10)
MULTISTEP_TOTAL_LR = 0.1


def constant_part(eps: Sequence[float], max_steps: int, seed: int) -> dict:
    """Part 3: the measured O(1) factor, FO-MAML forced below its floor, the effect of N."""
    rows, constants = [], {}
    for variant in [n for n in theory_variants() if n not in floored(theory_variants())]:
        run = steps_to_eps(variant, CONSTANT_INNER_LR, eps, max_steps=max_steps, seed=seed)
        ratios = []
        for e in sorted(eps, reverse=True):
            bound = bound_with_unit_constant(run["Delta"], run["L"], e)
            needed = run["reached"][e]
            ratio = None if needed is None else needed / bound
            if ratio is not None:
                ratios.append(ratio)
            rows.append(
                {"variant": variant, "eps": e, "bound_1": bound, "reached": needed, "ratio": ratio}
            )
        constants[variant] = max(ratios) if ratios else None
        print(
            f"  {title(variant)}: reached {run['reached']} in {run['seconds']:.1f} s "
            f"(beta {run['beta']:.4g}, Delta {run['Delta']:.4g})",
            flush=True,
        )
    forced = {}
    for variant in floored(theory_variants()):
        run = steps_to_eps(
            variant,
            FORCED_INNER_LR,
            [min(eps)],
            max_steps=min(max_steps, FORCED_STEPS),
            seed=seed,
            run_on=True,
        )
        keys = ("inner_lr", "best", "best_step", "steps", "final", "seconds", "exact_fomaml_floor")
        forced[variant] = {k: run[k] for k in keys}
        forced[variant]["eps"] = min(eps)
        forced[variant]["reached"] = run["reached"][min(eps)]
        print(
            f"  {title(variant)} forced at inner_lr {FORCED_INNER_LR}: {forced[variant]}",
            flush=True,
        )
    multistep = []
    target = sorted(eps)[len(eps) // 2]
    overall = max(c for c in constants.values() if c is not None)
    for n in INNER_STEPS:
        inner_lr = MULTISTEP_TOTAL_LR / n
        run = steps_to_eps(
            REFERENCE, inner_lr, [target], inner_steps=n, max_steps=max_steps, seed=seed
        )
        bound = bound_with_unit_constant(run["Delta"], run["L"], target, n)
        multistep.append(
            {
                "inner_steps": n,
                "inner_lr": inner_lr,
                "eps": target,
                "beta": run["beta"],
                "Delta": run["Delta"],
                "planned": int(np.ceil(overall * bound)),
                "reached": run["reached"][target],
                "seconds": run["seconds"],
                "seconds_per_step": run["seconds"] / max(run["steps"], 1),
            }
        )
        print(f"  MAML, N = {n}: {multistep[-1]}", flush=True)
    return {
        "iteration_constant": overall,
        "per_variant": {k: v for k, v in constants.items() if v is not None},
        "measured_on": (
            f"linear family dim 10 spread 1, inner_lr {CONSTANT_INNER_LR}, B {TASKS * SCALE}, "
            f"D {SHOTS * SCALE}, seed {seed}, eps {', '.join(f'{e:g}' for e in eps)}"
        ),
        "rows": rows,
        "forced": forced,
        "multistep": multistep,
    }


def plot_constant(result: dict, path: Path) -> None:
    """Part 3: iterations reached against eps, beside the bound with O(1) = 1 and the measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, constant in result["per_variant"].items():
        rows = [r for r in result["rows"] if r["variant"] == variant and r["reached"] is not None]
        eps = np.array([r["eps"] for r in rows])
        bound = np.array([r["bound_1"] for r in rows])
        ax.plot(eps, [r["reached"] for r in rows], "o-", color=color(variant),
                label=f"{title(variant)}: reached")  # fmt: skip
        ax.plot(eps, constant * bound, "--", color=color(variant),
                label=f"{title(variant)}: planned, O(1) = {constant:.3g}")  # fmt: skip
    ax.plot(eps, bound, ":", color="black", label="bound with O(1) = 1 (Delta L / eps^2)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="eps",
        ylabel="iterations to ||grad F|| <= eps",
    )
    ax.set_title(result["measured_on"].split(", eps")[0], fontsize=9)
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def constant_table(result: dict) -> str:
    """Part 3 as markdown tables."""
    lines = [
        "| variant | eps | bound with O(1) = 1 | iterations reached | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3g}"
        lines.append(
            f"| {title(row['variant'])} | {row['eps']:g} | {row['bound_1']:.0f} | {row['reached']} | {ratio} |"
        )
    for variant, row in result["forced"].items():
        lines.append("")
        lines.append(
            f"{title(variant)} forced at inner_lr {row['inner_lr']:g}, eps {row['eps']:g}: first "
            f"at or below eps at step {row['reached']} (best {row['best']:.3g} at step "
            f"{row['best_step']}), then settles at {row['final']:.3g} (mean of the last quarter of "
            f"{row['steps']} steps; exact floor {row['exact_fomaml_floor']:.3g}, "
            f"{row['final'] / row['eps']:.2g} times eps)"
        )
    lines.append("")
    lines.append("| N | inner_lr | beta | Delta | planned | reached | s / step |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for row in result["multistep"]:
        lines.append(
            f"| {row['inner_steps']} | {row['inner_lr']:g} | {row['beta']:.4g} | {row['Delta']:.4g} | "
            f"{row['planned']} | {row['reached']} | {row['seconds_per_step']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``lightning-maml experiment``."""
    parser = argparse.ArgumentParser(
        prog="lightning-maml experiment", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--output", required=True, help="directory for the figures, JSON and W&B run"
    )
    parser.add_argument(
        "--steps",
        type=count(1, why="with no step the final level is the starting point's"),
        default=2000,
        help="meta-steps per linear run, >= 1",
    )
    parser.add_argument(
        "--tail",
        type=count(1),
        default=500,
        help="iterates averaged for the final level, 1 to --steps",
    )
    parser.add_argument(
        "--sinusoid_steps",
        type=count(0),
        default=1500,
        help="meta-steps per sinusoid run (0: skip)",
    )
    parser.add_argument(
        "--every", type=count(1), default=50, help="steps between StationarityMonitor estimates"
    )
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument(
        "--constant",
        action="store_true",
        help="run only part 3: the measured O(1) factor of the iteration bound (constant.json)",
    )
    parser.add_argument(
        "--eps",
        type=float,
        nargs="+",
        default=list(CONSTANT_EPS),
        help="with --constant: the eps values, at least three",
    )
    parser.add_argument(
        "--max_steps", type=count(1), default=5000, help="with --constant: the longest run"
    )
    parser.add_argument("--no_wandb", action="store_true", help="skip the W&B run")
    parser.add_argument(
        "--threads",
        type=count(1),
        default=1,
        help="torch threads (default 1: the tensors are tiny, and on a shared 2-core machine 2 "
        "threads measured 6-15x slower per step)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.tail > args.steps:
        # The final level would average in the starting point w_0 itself.
        parser.error(
            f"--tail {args.tail} is more than --steps {args.steps}: the final level averages the "
            f"last --tail iterates after the start; use --tail <= {args.steps} or more --steps."
        )
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.constant:
        if len(set(args.eps)) < 3 or min(args.eps) <= 0:
            parser.error(f"--eps {args.eps}: give at least three distinct values > 0.")
        print("part 3: the O(1) factor of the iteration bound", flush=True)
        result = constant_part(args.eps, args.max_steps, args.seed)
        print(constant_table(result))
        path = output / "constant.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        plot_constant(result, output / "constant.png")
        print(
            f"wrote {output / 'constant.png'} and {path}: lightning-maml plan --constant_from {path}"
        )
        return 0

    print("part 1: linear tasks", flush=True)
    linear = linear_part(args.steps, args.tail, args.seed)
    figures = [output / "linear.png"]
    plot_linear(linear, figures[0])
    sinusoid = None
    if args.sinusoid_steps:
        print("part 2: sinusoid MLP", flush=True)
        sinusoid = sinusoid_part(args.sinusoid_steps, args.every, args.seed)
        figures.append(output / "sinusoid.png")
        plot_sinusoid(sinusoid, figures[1])
    text = summary(linear, sinusoid)
    print(text)
    (output / "results.json").write_text(
        json.dumps(
            {"settings": vars(args), "linear": linear["records"], "sinusoid": sinusoid}, indent=2
        )
        + "\n"
    )
    if not args.no_wandb:
        log_wandb(output, linear, sinusoid, figures)
    print(f"wrote {', '.join(str(p) for p in figures)} and {output / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
