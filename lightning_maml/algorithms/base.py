"""What every meta-learning variant shares: input checks, chunked task mapping, the results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from lightning_maml.functional import (
    LossFn,
    Params,
    TaskModel,
    Trajectory,
    gradient_and_value,
    map_tasks,
)
from lightning_maml.tasks import TaskBatch

__all__ = ["Evaluation", "MetaAlgorithm", "MetaStep"]

HessianBatch = Literal["inner", "independent"]
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
        inner_losses: The mean support loss at each inner step, shaped ``(inner_steps,)``.
        inner_grad_norms: The mean inner-gradient norm at each inner step.
    """

    loss: Tensor
    task_losses: Tensor
    predictions: Tensor
    loss_before: Tensor | None
    inner_losses: Tensor
    inner_grad_norms: Tensor


@dataclass
class MetaStep(Evaluation):
    """One meta-gradient, with the statistics of the step that produced it.

    Attributes:
        grads: Parameter name to the mean over tasks of each task's meta-gradient (detached).
        delta: HF-MAML only: the mean finite-difference step at each inner step.
        hvp_norms: HF-MAML only: the mean norm of the Hessian-vector estimate at each inner step.
    """

    grads: dict[str, Tensor] | None = None
    delta: Tensor | None = None
    hvp_norms: Tensor | None = None


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


class MetaAlgorithm:
    """The shared part of MAML, FO-MAML and HF-MAML.

    A variant implements one piece, :meth:`task_meta_gradient` (one task's meta-gradient as a
    pure function of the parameters); this class validates the inputs, splits the meta-batch
    into chunks of ``task_chunk_size`` tasks, ``vmap`` s each chunk and averages the results.

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

    #: Whether the variant uses ``hessian_batch`` (FO-MAML has no Hessian term).
    uses_hessian: bool = True

    def __init__(
        self,
        inner_lr: float,
        inner_steps: int = 1,
        hessian_batch: HessianBatch = "inner",
        task_chunk_size: ChunkSize = "auto",
        track_loss_before: bool = False,
        compile: bool | CompileMode = False,
    ) -> None:
        if (
            isinstance(inner_lr, bool)
            or not isinstance(inner_lr, (int, float))
            or not 0 < inner_lr < float("inf")
        ):
            raise ValueError(
                f"inner_lr must be a positive finite number, got {inner_lr!r}: it is the inner step "
                "size alpha, e.g. 0.01 for sinusoids or 0.4 for Omniglot 5-way."
            )
        _check_positive_int("inner_steps", inner_steps)
        if hessian_batch not in ("inner", "independent"):
            raise ValueError(
                f"hessian_batch must be 'inner' or 'independent', got {hessian_batch!r}."
            )
        if task_chunk_size not in ("auto", None):
            _check_positive_int("task_chunk_size", task_chunk_size)
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

    # -- what a variant provides -----------------------------------------------------------

    def task_meta_gradient(
        self, task: TaskModel, params: Params, data: dict[str, Tensor]
    ) -> tuple[Params, dict[str, Tensor]]:
        """One task's meta-gradient and statistics; ``data`` holds one task's tensors."""
        raise NotImplementedError

    def chunk_meta_gradient(
        self, task: TaskModel, params: Params, data: dict[str, Tensor]
    ) -> tuple[Params, dict[str, Tensor]]:
        """The sum over a chunk of tasks of their meta-gradients, and per-task statistics."""
        grads, stats = map_tasks(lambda p, d: self.task_meta_gradient(task, p, d), params, data)
        return {n: g.sum(0) for n, g in grads.items()}, stats

    # -- pieces the variants share ---------------------------------------------------------

    def outer_gradient(
        self, task: TaskModel, params: Params, data: dict[str, Tensor], keep_points: bool
    ) -> tuple[Params, Trajectory, dict[str, Tensor]]:
        """One task's inner loop without a second-order graph, and the outer gradient after it.

        Returns ``v = grad f_o(w_k, D_o)`` at the adapted point, the inner trajectory (with the
        points ``w_0 .. w_{k-1}`` when ``keep_points``) and the task's statistics.
        """
        adapted, trajectory = task.adapt(
            params,
            data["support_x"],
            data["support_y"],
            self.inner_lr,
            self.inner_steps,
            keep_points=keep_points,
        )
        outer, (loss, prediction) = gradient_and_value(
            task.loss_and_prediction, adapted, data["query_x"], data["query_y"], has_aux=True
        )
        stats = query_stats(
            task, params, trajectory, loss, prediction, data, self.track_loss_before
        )
        return outer, trajectory, stats

    def hessian_set(self, data: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The data the Hessian terms are taken on: ``D_h`` (independent) or ``D_in`` (inner)."""
        split = "hessian" if self.hessian_batch == "independent" else "support"
        return data[f"{split}_x"], data[f"{split}_y"]

    # -- the shared machinery --------------------------------------------------------------

    def hparams(self) -> dict[str, object]:
        """The variant's name and hyper-parameters, for loggers and run configs."""
        hparams = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        if not self.uses_hessian:
            del hparams["hessian_batch"]
        return {"variant": type(self).__name__, **hparams}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items() if k != "variant")
        return f"{type(self).__name__}({args})"

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
        return self.uses_hessian and self.hessian_batch == "independent"

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

    def _run(
        self, model: nn.Module, loss_fn: LossFn, tasks: TaskBatch, name: str, *args: int
    ) -> dict:
        task = TaskModel(model, loss_fn)
        params = task.params()
        if not params:
            raise ValueError("The model has no trainable parameters to meta-learn.")
        size = self.chunk_size(model, tasks.support_x.device, tasks.num_tasks)
        per_chunk = self._chunk_function(name)
        grad_sums, stats = None, []
        for chunk in tasks.chunks(size):
            grads, chunk_stats = per_chunk(task, params, chunk.named_tensors(), *args)
            if grads is not None:
                grad_sums = (
                    grads if grad_sums is None else {n: grad_sums[n] + g for n, g in grads.items()}
                )
            stats.append(chunk_stats)
        merged = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
        if grad_sums is not None:
            merged["grads"] = {n: g / tasks.num_tasks for n, g in grad_sums.items()}
        return merged

    @staticmethod
    def _summary(stats: dict) -> dict:
        """Averages the per-task statistics over tasks."""
        return {
            "loss": stats["task_losses"].mean(),
            "task_losses": stats["task_losses"],
            "predictions": stats["predictions"],
            "loss_before": stats["losses_before"].mean() if "losses_before" in stats else None,
            "inner_losses": stats["inner_losses"].mean(0),
            "inner_grad_norms": stats["inner_grad_norms"].mean(0),
        }

    def meta_gradient(self, model: nn.Module, loss_fn: LossFn, tasks: TaskBatch) -> MetaStep:
        """The meta-gradient of the mean post-adaptation query loss over ``tasks``.

        Args:
            model: The model; its parameters are the meta-parameters w. It is not modified.
            loss_fn: ``loss_fn(prediction, target) -> scalar``, applied per task.
            tasks: The meta-batch (support = D_in, query = D_o, hessian = D_h).

        Returns:
            The detached meta-gradient (mean over tasks) and the step's statistics.
        """
        self.check(model, tasks)
        stats = self._run(model, loss_fn, tasks, "chunk_meta_gradient")
        extra = {k: stats[k].mean(0) for k in ("delta", "hvp_norms") if k in stats}
        return MetaStep(grads=stats["grads"], **self._summary(stats), **extra)

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
        _check_positive_int("inner_steps", steps)
        self.check(model, tasks, needs_hessian=False)

        with torch.no_grad():  # torch.func.grad still differentiates the inner loop
            stats = self._run(model, loss_fn, tasks, "chunk_evaluation", steps)
        return Evaluation(**self._summary(stats))

    def chunk_evaluation(
        self, task: TaskModel, params: Params, data: dict[str, Tensor], inner_steps: int
    ) -> tuple[None, dict[str, Tensor]]:
        """Per-task statistics of adapting to a chunk of tasks (no meta-gradient)."""

        def per_task(p: Params, d: dict[str, Tensor]) -> dict[str, Tensor]:
            adapted, trajectory = task.adapt(
                p, d["support_x"], d["support_y"], self.inner_lr, inner_steps
            )
            loss, prediction = task.loss_and_prediction(adapted, d["query_x"], d["query_y"])
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
        "inner_losses": torch.stack(trajectory.losses),
        "inner_grad_norms": torch.stack(trajectory.grad_norms),
    }
    if loss_before:
        stats["losses_before"] = task.loss(params, data["query_x"], data["query_y"]).detach()
    return stats
