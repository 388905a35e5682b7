"""TheoryStepSize: the meta learning rate ``beta_k = c / L~(w_k)`` of Fallah et al. 2020."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_maml.checks import check_int
from lightning_maml.tasks import STREAMS, TaskSampler, draw_tasks
from lightning_maml.theory.constants import VariantConstants
from lightning_maml.theory.estimate import pooled_examples
from lightning_maml.theory.multistep import inner_lr_bound
from lightning_maml.theory.step_size import task_gradient_norms, theory_step_size
from lightning_maml.variants import theory_constants, variant_of

if TYPE_CHECKING:
    from lightning_maml.learner import MetaLearner

__all__ = ["TheoryStepSize"]


class TheoryStepSize(Callback):
    """Sets the meta-optimizer's learning rate to the theory's step size before every step.

    ``beta_k = c / L~(w_k)`` with ``L~(w_k) = 4 L + 2 rho alpha (1/B') sum_j ||grad f_j(w_k, D_beta^j)||``,
    the local smoothness of the MAML objective estimated at the current weights on B' tasks of
    its own (drawn from the datamodule's ``task_sampler("train")`` on a seeded stream
    ``default_rng([seed, 3, step, j])``, disjoint from the training tasks) with D_beta examples
    each. With ``rho = 0`` the estimate is the constant ``4 L`` and no task is drawn.

    The theorems are stated for plain gradient steps: pair it with ``torch.optim.SGD`` as the
    ``meta_optimizer`` (any other optimizer gets a warning) and no ``lr_scheduler``. Every rank
    draws the same tasks, so under DDP all ranks take the same step. Logged each step:
    ``theory/beta`` and ``theory/L_tilde``.

    With N inner steps (the learner's ``inner_steps``) the smoothness estimate is the N-step one
    of :mod:`lightning_maml.theory.multistep` (Ji, Yang, Liang 2022; at N = 1 the one above), and
    an inner_lr above ``inner_lr_factor / (N L)``, outside the theorem's range, gets a warning.

    Args:
        L: The smoothness constant of the task losses (``lightning-maml estimate`` gives one).
        rho: The Lipschitz constant of the task Hessians (0 for quadratic losses).
        c: The step-size constant. Default per variant: 1/12 for MAML, 1/18 for FO-MAML, 1/25 for
            HF-MAML (Fallah et al. 2020; :func:`lightning_maml.variants.theory_constants`).
        tasks: B', the tasks of the estimate of ``L~`` at each step.
        shots: D_beta, the examples of each of those tasks (default: all that a task carries,
            support, query and Hessian sets together).
        seed: The seed of the estimate's task stream (default: the datamodule's ``seed``).

    Raises:
        ValueError: On a non-positive ``L``, ``c``, ``tasks`` or ``shots``, a negative ``rho``;
            at fit start, on an LR scheduler or (``rho > 0``) a datamodule without ``task_sampler``.

    References:
        A. Fallah, A. Mokhtari, A. Ozdaglar. On the Convergence Theory of Gradient-Based
        Model-Agnostic Meta-Learning Algorithms. AISTATS 2020.
    """

    def __init__(
        self,
        L: float,
        rho: float,
        c: float | None = None,
        tasks: int = 20,
        shots: int | None = None,
        seed: int | None = None,
    ) -> None:
        if not L > 0:
            raise ValueError(
                f"L must be > 0, got {L!r}; estimate it with `lightning-maml estimate`."
            )
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho!r} (0 for quadratic task losses).")
        if c is not None and not c > 0:
            raise ValueError(f"c must be > 0 or None (the variant's default), got {c!r}.")
        for name, value in [("tasks", tasks), ("shots", shots)]:
            if value is not None:
                check_int(name, value)
        self.L = float(L)
        self.rho = float(rho)
        self.c = c
        self.tasks = tasks
        self.shots = shots
        self.seed = seed
        #: The step size and L~ of the last step.
        self.beta: float | None = None
        self.L_tilde: float | None = None
        self._c: float | None = None
        self._sampler: TaskSampler | None = None
        self._seed = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        algorithm = cast("MetaLearner", pl_module).algorithm
        constants: VariantConstants | None
        if self.c is None:
            constants = theory_constants(algorithm)
            self._c = constants.step_size
        else:  # a given c also serves algorithms the theory does not cover
            self._c = self.c
            variant = variant_of(algorithm)
            constants = None if variant is None else variant.theory
        if constants is not None and algorithm.inner_lr > (
            bound := inner_lr_bound(constants.inner_lr_factor, self.L, algorithm.inner_steps)
        ):
            rank_zero_warn(
                f"TheoryStepSize: inner_lr {algorithm.inner_lr:g} is above the theorem's "
                f"{constants.inner_lr_factor:g} / (inner_steps L) = {bound:.4g} for "
                f"inner_steps = {algorithm.inner_steps}; the step size is still set, but the "
                "convergence guarantee does not apply."
            )
        datamodule = getattr(trainer, "datamodule", None)
        self._seed = self.seed if self.seed is not None else getattr(datamodule, "seed", 0)
        if self.rho > 0:
            task_sampler = getattr(datamodule, "task_sampler", None)
            if not callable(task_sampler):
                raise ValueError(
                    "TheoryStepSize with rho > 0 draws its own tasks from the datamodule's "
                    "task_sampler('train'): use a lightning_maml.datamodules.MetaDataModule, or rho=0 for "
                    "quadratic task losses."
                )
            self._sampler = task_sampler("train")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.lr_scheduler_configs:
            raise ValueError(
                "TheoryStepSize sets the learning rate itself; drop the model's lr_scheduler."
            )
        for optimizer in trainer.optimizers:
            if type(optimizer) is not torch.optim.SGD:
                rank_zero_warn(
                    f"TheoryStepSize sets the learning rate of {type(optimizer).__name__}; the "
                    "theory's step size is for plain gradient steps: use torch.optim.SGD as the "
                    "meta_optimizer."
                )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        learner = cast("MetaLearner", pl_module)
        step = trainer.global_step
        norms = None
        if self.rho > 0:
            keys = ([self._seed, STREAMS["step_size"], step, j] for j in range(self.tasks))
            # setup drew the sampler and the constant c before training started.
            tasks = draw_tasks(cast(TaskSampler, self._sampler), "train", keys)
            x, y = pooled_examples(tasks.to(learner.device), self.shots)
            norms = task_gradient_norms(learner.model, learner.loss_fn, x, y)
        self.beta, self.L_tilde = theory_step_size(
            self.L,
            self.rho,
            learner.algorithm.inner_lr,
            cast(float, self._c),
            norms,
            learner.algorithm.inner_steps,
        )
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.beta
        pl_module.log_dict(
            {"theory/beta": self.beta, "theory/L_tilde": self.L_tilde},
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )
