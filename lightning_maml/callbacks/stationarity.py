"""StationarityMonitor: ``||grad F(w)||``, the paper's measure of success, during training."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_maml.algorithms import MAML
from lightning_maml.checks import check_int
from lightning_maml.functional import axpy, tree_norm
from lightning_maml.tasks import STREAMS, TaskBatch, TaskSampler, draw_tasks

if TYPE_CHECKING:
    from lightning_maml.learner import MetaLearner

__all__ = ["StationarityMonitor"]


class StationarityMonitor(Callback):
    """Estimates ``||grad F(w)||`` every N steps on a fixed held-out set of tasks.

    ``grad F(w) = E_i[(I - alpha hess f_i(w)) grad f_i(w - alpha grad f_i(w))]`` is estimated by
    the exact MAML meta-gradient (:class:`lightning_maml.MAML`, with the learner's inner_lr and
    inner_steps) averaged over ``tasks`` held-out tasks, drawn once from
    ``default_rng([seed, 4, i])`` (a stream disjoint from the training, validation and test
    tasks). Whatever variant trains, this is the quantity Fallah et al. 2020's theorems bound, so
    it compares MAML, FO-MAML and HF-MAML on one scale. Give it a ``sampler`` with large batches:
    the estimate is only as good as each task's data. Hessian terms use the tasks' Hessian sets
    when they have them (the unbiased estimator), else their support sets.

    The estimate averages tasks, so it has a standard error; it is computed from the two halves
    of the task set (``||g_a - g_b|| / 2``) and logged, since values near it are noise.

    Logged through the Trainer's loggers at the global step, at the start and then every
    ``every_n_steps`` steps: ``theory/grad_F_norm``, its running minimum
    ``theory/grad_F_norm_min`` and ``theory/grad_F_norm_stderr``.

    With ``eps`` set, the monitor also answers the theorem's question, whether the run reached an
    eps-stationary point within the planned iterations. The first estimate at or below eps fixes
    the reached step (to the resolution of ``every_n_steps``), reported with a confidence
    statement from the standard error; with ``stop=True`` training stops there (every rank
    computes the same estimate, so all ranks stop together under DDP). Each estimate then also
    logs ``theory/planned_steps`` (``planned_steps``, default the Trainer's ``max_steps``) and,
    once reached, ``theory/reached_step``. At the end of fitting the last step is estimated too
    (when it falls between two estimates) and one line, printed on rank zero, says the verdict::

        StationarityMonitor: reached eps=0.5 at step 300 of the planned 400 ...
        StationarityMonitor: did not reach eps=0.1 in 400 steps: best ||grad F|| = 0.2 at step 400 (2 times eps) ...

    Args:
        every_n_steps: Optimizer steps between estimates.
        tasks: The number of held-out tasks (at least 2).
        sampler: ``sampler(rng, split) -> Task`` for the held-out tasks, e.g.
            ``lightning_maml.datamodules.LinearTasks(shots=1000, query_shots=1000, hessian_shots=1000)`` (default:
            the datamodule's ``task_sampler(split)``).
        split: The split passed to the sampler; ``"train"`` because F is the training objective.
        eps: The target ``||grad F|| <= eps`` (``None``: no target, no verdict).
        stop: With ``eps``, stop training at the first estimate ``<= eps``.
        planned_steps: The iterations the plan gives for eps (default: the Trainer's
            ``max_steps``), compared with the reached step.
        seed: The seed of the held-out tasks (default: the datamodule's ``seed``).

    Attributes:
        history: ``(step, estimate, standard error)`` of every estimate so far.
        best: The running minimum of the estimate.
        best_step: The step of ``best``.
        reached: ``(step, estimate, standard error)`` of the first estimate at or below eps, or
            ``None``.
        verdict: The verdict line, once fitting has ended with ``eps`` set.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        tasks: int = 100,
        sampler: Callable[[np.random.Generator, str], Any] | None = None,
        split: str = "train",
        eps: float | None = None,
        stop: bool = True,
        planned_steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        check_int("every_n_steps", every_n_steps)
        check_int("tasks", tasks, low=2)
        if sampler is not None and not callable(sampler):
            raise ValueError(
                f"sampler must be callable as sampler(rng, split) -> Task, got {type(sampler).__name__}."
            )
        if eps is not None and not eps > 0:
            raise ValueError(f"eps must be > 0 or None, got {eps!r}.")
        if planned_steps is not None:
            check_int("planned_steps", planned_steps)
        if not isinstance(stop, bool):
            raise ValueError(f"stop must be True or False, got {stop!r}.")
        self.every_n_steps = every_n_steps
        self.tasks = tasks
        self.sampler = sampler
        self.split = split
        self.eps = eps
        self.stop = stop
        self.planned_steps = planned_steps
        self.seed = seed
        self.history: list[tuple[int, float, float]] = []
        self.best = float("inf")
        self.best_step: int | None = None
        self.reached: tuple[int, float, float] | None = None
        self.verdict: str | None = None
        self._planned: int | None = planned_steps
        self._held_out: TaskBatch | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._held_out is not None:
            return
        datamodule = getattr(trainer, "datamodule", None)
        sampler = self.sampler
        if sampler is None:
            task_sampler = getattr(datamodule, "task_sampler", None)
            if not callable(task_sampler):
                raise ValueError(
                    "StationarityMonitor needs tasks: pass sampler=... or use a datamodule with "
                    "task_sampler (a lightning_maml.datamodules.MetaDataModule)."
                )
            sampler = task_sampler(self.split)
        seed = self.seed if self.seed is not None else getattr(datamodule, "seed", 0)
        keys = ([seed, STREAMS["stationarity"], j] for j in range(self.tasks))
        self._held_out = draw_tasks(cast(TaskSampler, sampler), self.split, keys)
        if self.planned_steps is None and trainer.max_steps > 0:
            self._planned = trainer.max_steps

    @property
    def held_out(self) -> TaskBatch:
        """The held-out tasks (drawn at ``setup``)."""
        if self._held_out is None:
            raise RuntimeError("The held-out tasks are drawn when the Trainer sets up fitting.")
        return self._held_out

    def measure(self, pl_module: pl.LightningModule) -> tuple[float, float]:
        """``||grad F(w)||`` at the module's weights and its standard error.

        Args:
            pl_module: A :class:`lightning_maml.MetaLearner` (its ``model``, ``loss_fn`` and
                ``algorithm`` are used).
        """
        learner = cast("MetaLearner", pl_module)
        tasks = self.held_out.to(learner.device)
        learner_algorithm = learner.algorithm
        maml = MAML(
            learner_algorithm.inner_lr,
            learner_algorithm.inner_steps,
            hessian_batch="independent" if tasks.has_hessian else "inner",
            task_chunk_size=learner_algorithm.task_chunk_size,
        )
        half = tasks.num_tasks // 2
        halves = [tasks.narrow(0, half), tasks.narrow(half, tasks.num_tasks - half)]
        with torch.no_grad():  # torch.func differentiates regardless
            g_a, g_b = (maml.meta_gradient(learner.model, learner.loss_fn, t).grads for t in halves)
        weight = half / tasks.num_tasks
        mean = {n: weight * g_a[n] + (1 - weight) * g_b[n] for n in g_a}
        return tree_norm(mean).item(), tree_norm(axpy(-1.0, g_b, g_a)).item() / 2

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            return  # already measured at this step (the start of a resumed run)
        value, stderr = self.measure(pl_module)
        if value < self.best:
            self.best, self.best_step = value, step
        self.history.append((step, value, stderr))
        metrics = {
            "theory/grad_F_norm": value,
            "theory/grad_F_norm_min": self.best,
            "theory/grad_F_norm_stderr": stderr,
        }
        if self.eps is not None:
            if self.reached is None and value <= self.eps:
                self.reached = (step, value, stderr)
                _say(
                    f"StationarityMonitor: ||grad F|| = {value:.4g} <= eps = {self.eps:g} at "
                    f"step {step}; {confidence(value, stderr, self.eps)}"
                    + ("; stopping." if self.stop else ".")
                )
            if self._planned is not None:
                metrics["theory/planned_steps"] = float(self._planned)
            if self.reached is not None:
                metrics["theory/reached_step"] = float(self.reached[0])
        # Straight to the loggers: self.log would keep only steps that are multiples of
        # log_every_n_steps, and these estimates are sparse.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.reached is not None and self.stop:
            trainer.should_stop = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.eps is None:
            return
        # The last step may fall between two estimates: measure it, so that the verdict speaks
        # of the weights the run ends with.
        if not self.history or self.history[-1][0] != trainer.global_step:
            self._record(trainer, pl_module)
        self.verdict = verdict(
            self.eps, self.reached, self.best, self.best_step, self._planned, trainer.global_step
        )
        _say(f"StationarityMonitor: {self.verdict}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "best": self.best,
            "best_step": self.best_step,
            "reached": self.reached,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state_dict["history"]]
        self.best = state_dict["best"]
        self.best_step = state_dict["best_step"]
        reached = state_dict["reached"]
        self.reached = None if reached is None else tuple(reached)


@rank_zero_only
def _say(line: str) -> None:
    # Printed, not logged: the verdict is the answer a user runs the monitor for, and Python's
    # logging hides INFO unless configured.
    print(line, flush=True)


def confidence(value: float, stderr: float, eps: float) -> str:
    """How sure an estimate ``value +- stderr`` is of lying at or below eps.

    Two standard errors is about 95% one-sided confidence for a normal estimate.
    """
    if stderr <= 0:
        return "the estimate has no spread between its halves"
    margin = (eps - value) / stderr
    if margin >= 2:
        return (
            f"{margin:.1f} standard errors ({stderr:.2g}) below eps: reached with ~95% confidence"
        )
    return (
        f"only {margin:.2g} standard errors ({stderr:.2g}) below eps: within the estimate's "
        "noise, more held-out tasks or examples would tell"
    )


def verdict(
    eps: float,
    reached: tuple[int, float, float] | None,
    best: float,
    best_step: int | None,
    planned: int | None,
    last_step: int,
) -> str:
    """The one-line verdict: whether, and when, a run reached ``||grad F|| <= eps``.

    Args:
        eps: The target.
        reached: ``(step, estimate, standard error)`` of the first estimate at or below eps.
        best: The smallest estimate.
        best_step: Its step.
        planned: The planned iterations (``None``: unknown).
        last_step: The run's last step.
    """
    plan = f" of the planned {planned}" if planned is not None else ""
    if reached is not None:
        step, value, stderr = reached
        over = "" if planned is None or step <= planned else " (past the plan)"
        return (
            f"reached eps={eps:g} at step {step}{plan}{over}: ||grad F|| = {value:.4g}, "
            f"{confidence(value, stderr, eps)}"
        )
    of_plan = "" if planned is None or planned == last_step else f" (the plan: {planned})"
    return (
        f"did not reach eps={eps:g} in {last_step} steps{of_plan}: best ||grad F|| = {best:.4g} "
        f"at step {best_step} ({best / eps:.4g} times eps)"
    )
