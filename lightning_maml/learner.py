"""MetaLearner: any MAML variant as a manual-optimization step of a LightningModule."""

from __future__ import annotations

import warnings
from typing import Any, Literal, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from lightning_maml import compat
from lightning_maml.algorithms.base import Evaluation, MetaAlgorithm, MetaStep
from lightning_maml.checkpoint_settings import check_checkpoint
from lightning_maml.checks import check_int
from lightning_maml.cpu import keep_freed_memory, warn_bf16_on_cpu
from lightning_maml.eval_metrics import REDUCED_METRICS_ADVICE, EvaluationMetrics, warn_diverged
from lightning_maml.hyperparameters import describe
from lightning_maml.losses import LossArg, resolve_loss
from lightning_maml.metrics import classification_accuracy
from lightning_maml.process_group import destroy_process_group_at_exit
from lightning_maml.targets import check_batch, check_hessian_shots
from lightning_maml.tasks import TaskBatch
from lightning_maml.threads import warn_if_oversubscribed

__all__ = ["MetaLearner"]


def default_meta_optimizer(params) -> torch.optim.Optimizer:
    """Adam with learning rate 1e-3, the meta-optimizer of Finn et al. 2017."""
    return torch.optim.Adam(params, lr=1e-3)


class MetaLearner(LightningModule):
    """Meta-trains a model with a MAML-family algorithm under any Lightning ``Trainer``.

    Each training step asks the algorithm for the meta-gradient of the batch of tasks, applies
    it through ``manual_backward`` of the surrogate ``sum(g.detach() * w)`` (whose gradient is
    exactly ``g``, so DDP's all-reduce, precision plugins and Lightning's hooks all see an
    ordinary backward), clips it, and steps the meta-optimizer. Validation and test adapt to
    each task's support set with gradients for ``eval_inner_steps`` steps and score the query
    set; classification (integer targets, logits with a class dimension) also reports accuracy.

    Logged: ``train/loss`` (post-adaptation query loss), ``train/loss_before`` (with the
    algorithm's ``track_loss_before=True``),
    ``train/grad_norm`` (the all-reduced meta-gradient's norm before clipping),
    ``train/accuracy``, on the Trainer's logging steps and the first and last step of a fit;
    ``val/…`` and ``test/…`` loss and accuracy over tasks with their 95% confidence
    half-widths (``…_ci95``).

    Args:
        model: The network; its parameters are the meta-parameters.
        algorithm: ``MAML``, ``FOMAML`` or ``HFMAML`` (any :class:`MetaAlgorithm`).
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``loss(prediction, target) -> scalar``.
        meta_optimizer: A callable from parameters to an optimizer (default: Adam, lr 1e-3).
        lr_scheduler: An optional callable from the optimizer to an LR scheduler; it is stepped
            once per meta-step.
        gradient_clip_val: Clip the meta-gradient to this value (``None``: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        eval_inner_steps: Inner steps at validation and test (default: the algorithm's
            ``inner_steps``; Finn et al. use 10 at test time).

    Raises:
        ValueError: On an unknown loss name, a bad clipping setting or ``eval_inner_steps < 1``.
        FloatingPointError: During training, when the meta-loss or meta-gradient is not finite.
    """

    def __init__(
        self,
        model: nn.Module,
        algorithm: MetaAlgorithm,
        loss: LossArg = "mse",
        meta_optimizer: OptimizerCallable = default_meta_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        eval_inner_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(algorithm, MetaAlgorithm):
            raise ValueError(
                "algorithm must be a MetaAlgorithm such as MAML(inner_lr=...), FOMAML(...) or "
                f"HFMAML(...), got {type(algorithm).__name__}."
            )
        loss_fn, loss_name = resolve_loss(loss)
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 or None, got {gradient_clip_val!r}.")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}."
            )
        if eval_inner_steps is not None:
            check_int("eval_inner_steps", eval_inner_steps)

        self.automatic_optimization = False
        self.model = model
        self.algorithm = algorithm
        # The inner update's learned step sizes are meta-parameters: as a submodule here they
        # are in the state dict and checkpoints, the meta-optimizer's parameters and DDP's.
        algorithm.bind(model)
        if eval_inner_steps is not None:
            # Per-step step sizes fix the number of steps: refuse another one now, not at the
            # first validation.
            algorithm.step_sizes(algorithm.inner_update.rates(), eval_inner_steps)
        self.inner_update = algorithm.inner_update
        self.loss_fn = loss_fn
        #: The loss by name ("mse", "cross_entropy"), or None for a callable.
        self.loss_name = loss_name
        self.meta_optimizer = meta_optimizer
        self.lr_scheduler = lr_scheduler
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.eval_inner_steps = eval_inner_steps
        self.eval_metrics = EvaluationMetrics()
        # The stages whose first batch was checked against the model and the loss.
        self._checked_stages: set[str] = set()
        #: The last training step's :class:`MetaStep` (statistics for callbacks).
        self.last_meta_step: MetaStep | None = None
        #: The last evaluation batch's :class:`Evaluation`.
        self.last_evaluation: Evaluation | None = None

        # Under LightningCLI the arguments arrive as plain config (class_path dicts), which
        # load_from_checkpoint can re-instantiate. Objects passed in Python are replaced by a
        # description, so that checkpoints stay picklable and loggers get readable configs.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        plain = {k: describe(v) for k, v in self.hparams.items()}
        if plain != dict(self.hparams):
            self.save_hyperparameters(plain)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> MetaLearner:
        """Lightning's ``load_from_checkpoint`` with ``weights_only=True`` for every path (Lightning
        unpickles ``http(s)://`` ones with ``False``, which runs any code the file holds)."""
        if len(args) < 4:  # weights_only is the fifth parameter, after map_location and two more
            kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # -- set-up ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # In every process (ddp_spawn starts fresh ones); filterwarnings replaces its own copy.
        warnings.filterwarnings("ignore", REDUCED_METRICS_ADVICE, PossibleUserWarning)
        self.eval_metrics.reset()
        destroy_process_group_at_exit()
        # Each process's own threads: ranks and runs that share cores slow each other several-fold.
        warn_if_oversubscribed()
        trainer = compat.attached_trainer(self)
        if trainer is not None and trainer.strategy.root_device.type == "cpu":
            # Reuse freed activations instead of faulting fresh pages in every step.
            keep_freed_memory()
        # Fail before the first step on a model or datamodule the algorithm cannot use.
        self.algorithm.check_model(self.model)
        check_hessian_shots(self.algorithm, getattr(trainer, "datamodule", None))

    def on_fit_start(self) -> None:
        # bf16 on a CPU without it is emulated: slower than fp32, so say so before the run.
        warn_bf16_on_cpu(self.trainer.precision, self.device.type)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Compares the checkpoint's settings with this run's before its weights are loaded: every
        setting comes from the run; those that differ are named in a warning, and a different
        model is refused (:mod:`lightning_maml.checkpoint_settings`).

        Raises:
            ValueError: If the checkpoint was made for a different model.
        """
        check_checkpoint(self, checkpoint)

    def configure_optimizers(self) -> Any:
        optimizer = self.meta_optimizer(self.meta_parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def meta_parameters(self) -> list[nn.Parameter]:
        """What the meta-optimizer trains: the model's parameters and the learned step sizes."""
        return [*self.model.parameters(), *self.inner_update.parameters()]

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # -- training --------------------------------------------------------------------------

    def check_batch(self, batch: TaskBatch) -> None:
        """Raises ``ValueError`` if ``batch`` does not suit the model and the loss.

        MetaLearner calls it on the first batch of each stage; the checks are
        :func:`lightning_maml.targets.check_batch`'s.
        """
        check_batch(self.model, self.loss_name, batch)

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        if "train" not in self._checked_stages:
            self.check_batch(batch)
            self._checked_stages.add("train")
        # configure_optimizers gives one optimizer and at most one scheduler.
        optimizer = cast(LightningOptimizer, self.optimizers())
        step = self.algorithm.meta_gradient(self.model, self.loss_fn, batch, self.global_step)
        self.last_meta_step = step

        surrogate = step.surrogate(self.model, self.inner_update)
        optimizer.zero_grad()
        self.manual_backward(surrogate)
        grads = [p.grad for p in self.meta_parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(
                f"Non-finite meta-{'loss' if not torch.isfinite(step.loss) else 'gradient'} at "
                f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}): "
                f"meta-loss {step.loss.item():.4g}, meta-gradient norm {grad_norm.item():.4g}. "
                "Training stopped before the parameters were changed. Lower the inner_lr or "
                "the meta learning rate, or clip the meta-gradient with --model.gradient_clip_val "
                "(MetaLearner(gradient_clip_val=...); the Trainer's gradient_clip_val does not "
                "apply under manual optimization)."
            )
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,  # type: ignore[arg-type]  # Lightning documents passing self.optimizers()
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )
        optimizer.step()
        scheduler = cast("LRScheduler | None", self.lr_schedulers())
        if scheduler is not None:
            scheduler.step()

        if self._logs_training_step():
            tasks = batch.num_tasks
            self.log("train/loss", step.loss, prog_bar=True, batch_size=tasks)
            if step.loss_before is not None:
                self.log("train/loss_before", step.loss_before, batch_size=tasks)
            self.log("train/grad_norm", grad_norm, prog_bar=True, batch_size=tasks)
            accuracy = classification_accuracy(step.predictions, batch.query_y)
            if accuracy is not None:
                self.log("train/accuracy", accuracy.mean(), prog_bar=True, batch_size=tasks)
        return step.loss

    def _logs_training_step(self) -> bool:
        """Whether this step logs: on the Trainer's logging steps (as ``LearningRateMonitor``
        does), and on a fit's first and last step so that the progress bar and
        ``callback_metrics`` have them; each ``self.log`` costs more than a small model's
        meta-step. Called after the optimizer step, which counts in ``global_step``."""
        trainer = self.trainer
        return (
            compat.should_update_logs(trainer)
            or bool(trainer.fast_dev_run)  # type: ignore[attr-defined]  # set by Lightning outside __init__, undeclared
            or self.global_step == 1
            or 0 < trainer.max_steps <= self.global_step
        )

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None) -> Evaluation:
        """Adapts to each task of ``batch`` and scores its query set, even under inference mode.

        Lightning evaluates under ``torch.inference_mode``; adaptation needs gradients, so this
        leaves inference mode and copies the batch out of inference tensors first.
        """
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        with torch.inference_mode(False), torch.enable_grad():
            if any(t.is_inference() for t in batch.named_tensors().values()):
                batch = batch.clone()
            return self.algorithm.evaluate(self.model, self.loss_fn, batch, steps)

    def _eval_step(self, batch: TaskBatch, stage: str) -> None:
        if stage not in self._checked_stages:
            self.check_batch(batch)
            self._checked_stages.add(stage)
        result = self.evaluate(batch)
        self.last_evaluation = result
        accuracy = classification_accuracy(result.predictions, batch.query_y)
        self.eval_metrics.add_batch(stage, result, batch.num_tasks, accuracy)

    def _eval_epoch_end(self, stage: str) -> None:
        shown, other, tasks, diverged = self.eval_metrics.compute(stage)
        for key, value in shown.items():
            self.log(key, value, prog_bar=True)
        for key, value in other.items():
            self.log(key, value)
        if diverged:
            warn_diverged(
                stage, tasks, diverged, self.algorithm, self.eval_inner_steps, self.global_step
            )

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
