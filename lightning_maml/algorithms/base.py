"""What every meta-learning variant shares: input checks, chunked task mapping, the results."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_maml.checks import check_int, check_positive
from lightning_maml.functional import (
    HvpRule,
    LossFn,
    Params,
    TaskModel,
    Trajectory,
    backward_recursion,
    gradient_and_value,
    map_tasks,
)
from lightning_maml.inner import InnerUpdate
from lightning_maml.tasks import TaskBatch

__all__ = ["Evaluation", "MetaAlgorithm", "MetaStep", "Supports"]

HessianBatch = Literal["inner", "independent"]
#: ``query(w, step)``: the query loss and predictions of ``w`` as inner step ``step`` computes.
Query = Callable[..., tuple[Tensor, Tensor]]
ChunkSize = int | Literal["auto"] | None
# Not the CUDA-graph modes ("reduce-overhead", "max-autotune"): a CUDA graph reuses its output
# buffers on the next call, and _run keeps each chunk's outputs while the next chunk runs.
CompileMode = Literal["default", "max-autotune-no-cudagraphs"]


@dataclass
class Evaluation:
    """The outcome of adapting to each task and scoring its query set.

    Attributes:
        loss: The mean query loss after adaptation.
        task_losses: Each task's query loss after adaptation, shaped ``(tasks,)``.
        predictions: The adapted model's query predictions, shaped ``(tasks, query_shots, ...)``.
        loss_before: The mean query loss before adaptation; in training only with
            ``track_loss_before=True`` (it costs a forward pass on every query set), else ``None``.
        stats: The step's statistics by log key, averaged over tasks: a scalar, or one value per
            inner step (logged as ``<key>_step_<j>``). Every variant reports ``loss/support``
            (the support loss at each inner step) and ``grad_norm/inner`` (the inner gradient's
            norm); a variant adds its own (HF-MAML ``hfmaml/delta``, learned step sizes
            ``inner_lr/<parameter>``). Loggers take them as they are, whatever the variant.
    """

    loss: Tensor
    task_losses: Tensor
    predictions: Tensor
    loss_before: Tensor | None
    stats: dict[str, Tensor]


@dataclass
class MetaStep(Evaluation):
    """One meta-gradient, with the statistics of the step that produced it.

    Attributes:
        grads: Model parameter name to the mean over tasks of each task's meta-gradient
            (detached).
        update_grads: The same for the inner update's learned tensors (its step sizes), by
            their name in the update; empty when it learns none.
    """

    grads: dict[str, Tensor] = field(default_factory=dict)
    update_grads: dict[str, Tensor] = field(default_factory=dict)

    def surrogate(self, model: nn.Module, update: nn.Module) -> Tensor:
        """A scalar whose gradient with respect to the parameters of ``model`` and ``update`` is
        this meta-gradient: ``sum(g.detach() * w)``.

        Its backward is an ordinary one, so DDP's all-reduce, precision plugins and Lightning's
        hooks all see the meta-gradient. A non-finite loss makes it NaN, so that a check after
        the all-reduce sees the failure on every rank and all ranks stop together.
        """
        pairs = [(p, self.grads[n]) for n, p in model.named_parameters() if n in self.grads]
        pairs += [
            (p, self.update_grads[n])
            for n, p in update.named_parameters()
            if n in self.update_grads
        ]
        poison = torch.where(torch.isfinite(self.loss), 1.0, float("nan"))
        # One dot product of flattened vectors rather than a sum of per-tensor products: fewer
        # operator calls, each a kernel launch on a GPU.
        return torch.dot(
            torch.cat([p.flatten() for p, _ in pairs]),
            torch.cat([g.flatten().to(p.dtype) for p, g in pairs]) * poison.to(pairs[0][0].dtype),
        )


@dataclass(frozen=True)
class Supports:
    """What a meta-gradient differentiates besides the model's parameters.

    Attributes:
        rates: The inner update's learned tensors (its step sizes) get their meta-gradient.
        per_step_view: It differentiates through a per-step view of the parameters (per-step
            BatchNorm weights), which only differentiating through the inner loop does.
        note: Why not, added to a refusal.
    """

    rates: bool = True
    per_step_view: bool = False
    note: str = ""


class MetaAlgorithm:
    """The shared part of MAML, FO-MAML and HF-MAML.

    A variant implements one piece, :meth:`task_meta_gradient` (one task's meta-gradient as a
    pure function of the parameters), from the pieces here (:meth:`adapt`,
    :meth:`outer_gradient`, :meth:`backward_pass`), and states in :meth:`supports` which parts
    of an inner update it differentiates; this class validates the inputs, splits the
    meta-batch into chunks of ``task_chunk_size`` tasks, ``vmap`` s each chunk and averages the
    results.

    Args:
        inner_lr: The inner (adaptation) step size alpha; must be > 0.
        inner_steps: The number of inner gradient steps k; must be >= 1.
        hessian_batch: Where the Hessian terms are evaluated: ``"inner"`` on the support set
            ``D_in`` (Finn et al.'s MAML), ``"independent"`` on the task's separate Hessian set
            ``D_h`` (the unbiased estimator of Fallah et al. 2020).
        task_chunk_size: Tasks per vectorised call. ``None`` maps the whole meta-batch at once
            (fastest on a GPU), ``1`` is a plain per-task loop (lowest memory; often fastest on
            a CPU for conv nets), ``k`` bounds peak memory to ``k`` tasks' worth. ``"auto"``
            (default) picks ``None`` on accelerators; on a CPU, ``1`` for models with
            convolutions (vmap turns them into grouped convolutions, which CPUs run about 3x
            slower than a loop: see ``benchmarks/speed.py``) and ``None`` otherwise (an MLP
            runs about 10x faster vectorised).
        track_loss_before: Also compute each task's query loss before adaptation in training
            (``MetaStep.loss_before``). It costs one more forward pass on every query set (measured
            on a CPU conv net: a third of the step), so it is off by default; evaluation always
            reports it.
        compile: Run each chunk's meta-gradient (and each evaluation chunk) through
            ``torch.compile``: ``True`` for its default mode, or a mode name. The first step
            of each new shape pays the compilation (seconds to minutes), later steps reuse it;
            ``benchmarks/speed.py --compile`` measures whether it pays off for a model.
            Measured on a CPU: sinusoid MLP steps ran 5x to 9x faster, Omniglot conv net
            steps 1.1x to 1.4x. The modes that use CUDA graphs (``"reduce-overhead"``,
            ``"max-autotune"``) are refused: a graph reuses its output buffers on its next
            call, and the chunks' outputs are kept until all chunks have run.
    """

    def __init__(
        self,
        inner_lr: float,
        inner_steps: int = 1,
        hessian_batch: HessianBatch = "inner",
        task_chunk_size: ChunkSize = "auto",
        track_loss_before: bool = False,
        compile: bool | CompileMode = False,
        inner_update: InnerUpdate | None = None,
    ) -> None:
        check_positive(
            "inner_lr",
            inner_lr,
            "it is the inner step size alpha, e.g. 0.01 for sinusoids or 0.4 for Omniglot 5-way.",
        )
        check_int("inner_steps", inner_steps)
        if hessian_batch not in ("inner", "independent"):
            raise ValueError(
                f"hessian_batch must be 'inner' or 'independent', got {hessian_batch!r}."
            )
        if task_chunk_size not in ("auto", None):
            check_int("task_chunk_size", task_chunk_size)
        if not isinstance(compile, bool) and compile not in get_args(CompileMode):
            raise ValueError(
                f"compile must be true, false or one of the torch.compile modes "
                f"{get_args(CompileMode)}, got {compile!r} (the CUDA-graph modes are not "
                "supported: their outputs are overwritten by the next chunk's call)."
            )
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.hessian_batch = hessian_batch
        self.task_chunk_size = task_chunk_size
        self.track_loss_before = track_loss_before
        self.compile = compile
        if inner_update is not None and not isinstance(inner_update, InnerUpdate):
            raise ValueError(
                "inner_update must be an InnerUpdate (lightning_maml.inner: InnerUpdate, ANIL, "
                f"BOIL, MetaSGD, PerStepRates), got {type(inner_update).__name__}."
            )
        self.inner_update = inner_update if inner_update is not None else InnerUpdate()

    # -- what a variant provides -----------------------------------------------------------

    def task_meta_gradient(
        self, task: TaskModel, params: Params, rates: Params, data: dict[str, Tensor]
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        """One task's meta-gradient (of the model's parameters, and of the inner update's learned
        ``rates``) and statistics; ``data`` holds one task's tensors."""
        raise NotImplementedError

    def supports(self) -> Supports:
        """What this meta-gradient differentiates: the one place a variant states it."""
        return Supports()

    def check_update(self, update: InnerUpdate) -> None:
        """Raises ``ValueError`` if this variant cannot use ``update``, saying why."""
        supports, name = self.supports(), type(self).__name__
        if update.has_rates and not supports.rates:
            raise ValueError(
                f"{name} cannot learn step sizes ({type(update).__name__}){supports.note}. Use "
                f"MAML, FOMAML or HFMAML with learned step sizes, or a fixed InnerUpdate with "
                f"{name}."
            )
        if update.per_step_view is not None and not supports.per_step_view:
            raise ValueError(
                f"{name} cannot use {type(update).__name__} with "
                f"{update.per_step_view.description}: only a meta-gradient that differentiates "
                "through the inner loop does (MAML(backward='graph'), MAMLPlusPlus)."
            )

    def chunk_meta_gradient(
        self, task: TaskModel, params: Params, rates: Params, data: dict[str, Tensor], *args
    ) -> tuple[tuple[Params, Params], dict[str, Tensor]]:
        """The sums over a chunk of tasks of their meta-gradients, and per-task statistics.

        ``args`` (from :meth:`step_args`) go to every task's :meth:`task_meta_gradient`.
        """
        grads, rate_grads, stats = map_tasks(
            lambda p, d: self.task_meta_gradient(task, p, rates, d, *args), params, data
        )
        summed = (
            {n: g.sum(0) for n, g in grads.items()},
            {n: g.sum(0) for n, g in rate_grads.items()},
        )
        return summed, stats

    # -- pieces the variants share ---------------------------------------------------------

    def step_sizes(self, rates: Params, steps: int | None = None) -> list:
        """The inner update's step sizes for each of ``steps`` (default: ``inner_steps``) steps."""
        return self.inner_update.step_sizes(rates, self.inner_steps if steps is None else steps)

    def adapt(
        self,
        task: TaskModel,
        params: Params,
        rates: Params,
        data: dict[str, Tensor],
        steps: int | None = None,
        **options: Any,
    ) -> tuple[Params, Trajectory, Query]:
        """One task's inner loop on its support set, with the update's step sizes and view.

        Args:
            task: The model and loss.
            params: The starting point ``w_0``.
            rates: The inner update's learned tensors.
            data: One task's tensors.
            steps: The number of inner steps (default: ``inner_steps``).
            **options: For :meth:`~lightning_maml.functional.TaskModel.adapt`.

        Returns:
            The adapted parameters, the trajectory, and ``query(w, step=k - 1)``: the query
            loss and predictions of ``w`` as inner step ``step`` computes with it (through the
            update's per-step view), so that the adapted parameters are scored as the last step
            computes.
        """
        steps = self.inner_steps if steps is None else steps
        params_at = functools.partial(self.inner_update.params_at, rates)
        adapted, trajectory = task.adapt(
            params,
            data["support_x"],
            data["support_y"],
            self.step_sizes(rates, steps),
            params_at=params_at,
            **options,
        )

        def query(w: Params, step: int = steps - 1) -> tuple[Tensor, Tensor]:
            return task.loss_and_prediction(params_at(step, w), data["query_x"], data["query_y"])

        return adapted, trajectory, query

    def outer_gradient(
        self,
        task: TaskModel,
        params: Params,
        rates: Params,
        data: dict[str, Tensor],
        keep_points: bool,
    ) -> tuple[Params, Trajectory, dict[str, Tensor]]:
        """One task's inner loop without a second-order graph, and the outer gradient after it.

        Returns ``v = grad f_o(w_k, D_o)`` at the adapted point, the inner trajectory (with the
        points ``w_0 .. w_{k-1}`` when ``keep_points``, and the inner gradients when the update
        has learned step sizes) and the task's statistics.
        """
        adapted, trajectory, query = self.adapt(
            task,
            params,
            rates,
            data,
            keep_points=keep_points,
            keep_grads=self.inner_update.has_rates,
        )
        outer, (loss, prediction) = gradient_and_value(query, adapted, has_aux=True)
        stats = query_stats(
            task, params, trajectory, loss, prediction, data, self.track_loss_before
        )
        return outer, trajectory, stats

    def backward_pass(
        self, task: TaskModel, params: Params, rates: Params, data: dict[str, Tensor], hvp: HvpRule
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        """One task's meta-gradient by the backward recursion along its stored inner trajectory.

        ``g_k = v`` (the outer gradient), ``g_j = g_{j+1} - hvp(w_j, alpha_j (.) g_{j+1})``
        (:func:`~lightning_maml.functional.backward_recursion`); with an exact ``hvp`` this is
        MAML's meta-gradient, with a finite difference HF-MAML's.
        """
        outer, trajectory, stats = self.outer_gradient(task, params, rates, data, keep_points=True)
        grads, cotangents = backward_recursion(
            outer, trajectory.points, self.step_sizes(rates), hvp, trajectory.grads
        )
        return grads, self.inner_update.rate_gradient(rates, self.inner_steps, cotangents), stats

    def hessian_set(self, data: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The data the Hessian terms are taken on: ``D_h`` (independent) or ``D_in`` (inner)."""
        split = "hessian" if self.hessian_batch == "independent" else "support"
        return data[f"{split}_x"], data[f"{split}_y"]

    # -- the shared machinery --------------------------------------------------------------

    def hparams(self) -> dict[str, object]:
        """The variant's name and constructor arguments, for loggers and run configs."""
        arguments = inspect.signature(type(self)).parameters
        hparams = {k: v for k, v in vars(self).items() if k in arguments}
        update = type(self.inner_update)
        hparams["inner_update"] = {
            "class_path": f"{update.__module__}.{update.__qualname__}",
            "init_args": self.inner_update.hparams(),
        }
        return {"variant": type(self).__name__, **hparams}

    def __repr__(self) -> str:
        skip = ("variant", "inner_update")
        args = [f"{k}={v!r}" for k, v in self.hparams().items() if k not in skip]
        update = self.inner_update
        if type(update) is not InnerUpdate or update.hparams() != InnerUpdate().hparams():
            # The update's own settings, not the class_path form that configs take.
            args.append(f"inner_update={type(update).__name__}({update.extra_repr()})")
        return f"{type(self).__name__}({', '.join(args)})"

    def chunk_size(self, model: nn.Module, device: torch.device, num_tasks: int) -> int:
        """The number of tasks per vectorised call for ``model`` on ``device``."""
        size = self.task_chunk_size
        if size == "auto":
            has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
            size = 1 if device.type == "cpu" and has_conv else None
        return num_tasks if size is None else min(size, num_tasks)

    @property
    def needs_hessian_batch(self) -> bool:
        """Whether every task must carry a Hessian set ``D_h``."""
        return self.hessian_batch == "independent"

    def check_model(self, model: nn.Module) -> None:
        """Raises ``ValueError`` for a model whose forward is not a pure function of its inputs."""
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                raise ValueError(
                    f"Module '{name}' ({type(module).__name__}) tracks running statistics, which "
                    "would mix the tasks' data and change the model outside the meta-gradient: "
                    "build it with track_running_stats=False (per-batch statistics, as in "
                    "Finn et al.)."
                )

    def check(self, model: nn.Module, tasks: TaskBatch, needs_hessian: bool = True) -> None:
        """Raises ``ValueError`` for inputs this variant cannot use, saying what to change."""
        if not isinstance(tasks, TaskBatch):
            raise ValueError(f"Expected a TaskBatch, got {type(tasks).__name__}.")
        if needs_hessian and self.needs_hessian_batch and not tasks.has_hessian:
            raise ValueError(
                f"{type(self).__name__}(hessian_batch='independent') needs a Hessian set D_h in "
                "every task: give the TaskBatch hessian_x/hessian_y (datamodules: "
                "hessian_shots > 0), or use hessian_batch='inner'."
            )
        self.check_model(model)

    def _chunk_function(self, name: str) -> Callable:
        """The method ``name``, through ``torch.compile`` when asked for (built once)."""
        method = getattr(self, name)
        if not self.compile:
            return method
        mode = "default" if self.compile is True else self.compile
        compiled = self.__dict__.setdefault("_compiled", {})
        if (name, mode) not in compiled:
            compiled[name, mode] = torch.compile(method, mode=mode)
        return compiled[name, mode]

    def __getstate__(self) -> dict:
        # Compiled functions do not pickle (ddp_spawn pickles the LightningModule); each
        # process compiles its own.
        return {k: v for k, v in vars(self).items() if k != "_compiled"}

    def bind(self, model: nn.Module) -> None:
        """Binds the inner update to ``model`` (creating learned step sizes).

        Raises:
            ValueError: If this variant cannot use the inner update, or it cannot serve the model.
        """
        self.inner_update.bind(model, self.inner_lr, self.inner_steps)
        # After binding: a subclass's own learned tensors are known once they exist.
        self.check_update(self.inner_update)

    def _run(
        self, model: nn.Module, loss_fn: LossFn, tasks: TaskBatch, name: str, *args: object
    ) -> dict:
        task = TaskModel(model, loss_fn)
        params = task.params()
        if not params:
            raise ValueError("The model has no trainable parameters to meta-learn.")
        if not self.inner_update.adapted:
            self.bind(model)
        rates = self.inner_update.rates()
        size = self.chunk_size(model, tasks.support_x.device, tasks.num_tasks)
        per_chunk = self._chunk_function(name)
        sums, stats = None, []
        for chunk in tasks.chunks(size):
            chunk_sums, chunk_stats = per_chunk(task, params, rates, chunk.named_tensors(), *args)
            if chunk_sums is not None:
                sums = chunk_sums if sums is None else tree_map(torch.add, sums, chunk_sums)
            stats.append(chunk_stats)
        merged = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
        if sums is not None:
            merged["grads"], merged["update_grads"] = tree_map(lambda g: g / tasks.num_tasks, sums)
        return merged

    def _summary(self, stats: dict) -> dict:
        """Averages the per-task statistics over tasks and adds the inner update's."""
        series = {
            k: v.mean(0)
            for k, v in stats.items()
            if k not in ("task_losses", "predictions", "losses_before", "grads", "update_grads")
        }
        return {
            "loss": stats["task_losses"].mean(),
            "task_losses": stats["task_losses"],
            "predictions": stats["predictions"],
            "loss_before": stats["losses_before"].mean() if "losses_before" in stats else None,
            "stats": {**series, **self.inner_update.summary()},
        }

    def meta_gradient(
        self, model: nn.Module, loss_fn: LossFn, tasks: TaskBatch, step: int | None = None
    ) -> MetaStep:
        """The meta-gradient of the mean post-adaptation query loss over ``tasks``.

        Args:
            model: The model; its parameters are the meta-parameters w. It is not modified.
            loss_fn: ``loss_fn(prediction, target) -> scalar``, applied per task.
            tasks: The meta-batch (support = D_in, query = D_o, hessian = D_h).
            step: The global meta-step, for variants whose rule changes during training
                (:class:`~lightning_maml.algorithms.MAMLPlusPlus`); the others ignore it.

        Returns:
            The detached meta-gradient (mean over tasks) and the step's statistics.
        """
        self.check(model, tasks)
        stats = self._run(model, loss_fn, tasks, "chunk_meta_gradient", *self.step_args(step))
        return MetaStep(
            grads=stats["grads"], update_grads=stats["update_grads"], **self._summary(stats)
        )

    def step_args(self, step: int | None) -> tuple:
        """Extra arguments of :meth:`chunk_meta_gradient` at meta-step ``step`` (none here)."""
        return ()

    def evaluate(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        tasks: TaskBatch,
        inner_steps: int | None = None,
    ) -> Evaluation:
        """Adapts to each task's support set (no meta-gradient) and scores its query set.

        Args:
            model: The model (not modified).
            loss_fn: The task loss.
            tasks: The tasks to adapt to.
            inner_steps: Inner steps for this evaluation (default: the training value; Finn et
                al. adapt longer at test time).
        """
        steps = self.inner_steps if inner_steps is None else inner_steps
        check_int("inner_steps", steps)
        self.check(model, tasks, needs_hessian=False)

        with torch.no_grad():  # torch.func.grad still differentiates the inner loop
            stats = self._run(model, loss_fn, tasks, "chunk_evaluation", steps)
        return Evaluation(**self._summary(stats))

    def chunk_evaluation(
        self,
        task: TaskModel,
        params: Params,
        rates: Params,
        data: dict[str, Tensor],
        inner_steps: int,
    ) -> tuple[None, dict[str, Tensor]]:
        """Per-task statistics of adapting to a chunk of tasks (no meta-gradient)."""

        def per_task(p: Params, d: dict[str, Tensor]) -> dict[str, Tensor]:
            adapted, trajectory, query = self.adapt(task, p, rates, d, inner_steps)
            loss, prediction = query(adapted)
            return query_stats(task, p, trajectory, loss, prediction, d, loss_before=True)

        return None, map_tasks(per_task, params, data)


def query_stats(
    task: TaskModel,
    params: Params,
    trajectory: Trajectory,
    loss: Tensor,
    prediction: Tensor,
    data: dict[str, Tensor],
    loss_before: bool,
) -> dict[str, Tensor]:
    """The statistics every variant reports for one task, given its adapted query loss."""
    stats = {
        "task_losses": loss.detach(),
        "predictions": prediction.detach(),
        "loss/support": torch.stack(trajectory.losses),
        "grad_norm/inner": torch.stack(trajectory.grad_norms),
    }
    if loss_before:
        stats["losses_before"] = task.loss(params, data["query_x"], data["query_y"]).detach()
    return stats
