"""The theory step size: the pure formula and the TheoryStepSize callback in a real Trainer."""

from __future__ import annotations

import csv
import functools

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_maml import FOMAML, HFMAML, MAML, MetaLearner, TaskBatch
from lightning_maml.callbacks import TheoryStepSize
from lightning_maml.datamodules.base import MetaDataModule, Task
from lightning_maml.theory import theory_step_size
from lightning_maml.variants import get, theory_constants

# One task, the same at every draw: pooled examples x = 1, 2, 3 and y = 1, 1, 0.
SUPPORT = (torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [1.0]]))
QUERY = (torch.tensor([[3.0]]), torch.tensor([[0.0]]))
W0 = 0.5
# At w = 0.5 the residuals are -0.5, 0, 1.5, so grad f = 2 mean(x r) = 2 * 4 / 3 = 8 / 3 on all
# three examples and 2 * (-0.25) = -0.5 on the first two.
GRAD_NORM_ALL, GRAD_NORM_TWO = 8 / 3, 0.5


class FixedTasks(MetaDataModule):
    """Serves the one task above and records the first number of every generator it is given."""

    def __init__(self) -> None:
        super().__init__(meta_batch_size=2, seed=5)
        self.draws: list[float] = []

    def task_sampler(self, split: str):
        return self.sample

    def sample(self, rng: np.random.Generator, split: str) -> Task:
        self.draws.append(rng.random())
        return Task(*SUPPORT, *QUERY)


def own_draws(step: int, tasks: int) -> list[float]:
    """What the callback's generators ``[seed, 3, step, j]`` give first."""
    return [np.random.default_rng([5, 3, step, j]).random() for j in range(tasks)]


def training_draws(steps: int = 2) -> list[float]:
    """What the training stream's generators give first (the loader reads one step ahead)."""
    return [np.random.default_rng([5, 0, s, t]).random() for s in range(steps) for t in range(2)]


def learner(algorithm=None, optimizer=torch.optim.SGD, **kwargs) -> MetaLearner:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(W0)
    return MetaLearner(
        model,
        algorithm or FOMAML(inner_lr=0.1),
        loss="mse",
        meta_optimizer=functools.partial(optimizer, lr=123.0),
        **kwargs,
    )


def fit(module, callback, tmp_path, datamodule=None, steps=1):
    trainer = Trainer(
        max_steps=steps,
        callbacks=[callback],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=datamodule or FixedTasks())
    return trainer


def logged(trainer) -> list[dict[str, str]]:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


def test_formula_by_hand():
    beta, L_tilde = theory_step_size(2.0, 0.5, 0.1, 1 / 12, torch.tensor([1.0, 3.0]))
    assert L_tilde == pytest.approx(4 * 2 + 2 * 0.5 * 0.1 * 2.0)  # 8.2
    assert beta == pytest.approx(1 / (12 * 8.2))
    assert theory_step_size(2.0, 0.0, 0.1, 1 / 12, None) == (pytest.approx(1 / 96), 8.0)


def test_default_constants_per_variant():
    assert get("maml").theory.step_size == pytest.approx(1 / 12)
    assert get("fomaml").theory.step_size == pytest.approx(1 / 18)
    assert get("hfmaml").theory.step_size == pytest.approx(1 / 25)
    assert [theory_constants(a) for a in (MAML(0.1), FOMAML(0.1), HFMAML(0.1))] == [
        get("maml").theory,
        get("fomaml").theory,
        get("hfmaml").theory,
    ]


def test_callback_sets_and_logs_the_hand_computed_step(tmp_path):
    module = learner()
    datamodule = FixedTasks()
    callback = TheoryStepSize(L=2.0, rho=3.0, tasks=3)
    task = TaskBatch(*(t.unsqueeze(0) for t in (*SUPPORT, *QUERY)))
    meta_grad = FOMAML(inner_lr=0.1).meta_gradient(module.model, module.loss_fn, task).grads
    trainer = fit(module, callback, tmp_path, datamodule)

    # L~ = 4 L + 2 rho alpha mean ||grad f_j|| = 8 + 2 * 3 * 0.1 * 8/3 = 9.6; FO-MAML's c = 1/18.
    assert callback.L_tilde == pytest.approx(9.6)
    assert callback.beta == pytest.approx(1 / (18 * 9.6))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1 / (18 * 9.6))
    expected = W0 - callback.beta * meta_grad["weight"].item()
    assert module.model.weight.item() == pytest.approx(expected, rel=1e-6)
    row = next(r for r in logged(trainer) if r.get("theory/beta"))
    assert float(row["theory/beta"]) == pytest.approx(1 / (18 * 9.6))
    assert float(row["theory/L_tilde"]) == pytest.approx(9.6)
    # Its tasks come from its own stream [seed, 3, step, j], not from the training stream.
    assert set(own_draws(0, 3)) <= set(datamodule.draws)
    assert set(datamodule.draws) - set(own_draws(0, 3)) <= set(training_draws())


def test_shots_limit_the_data_batch_and_c_overrides(tmp_path):
    callback = TheoryStepSize(L=2.0, rho=3.0, c=0.5, tasks=2, shots=2)
    fit(learner(), callback, tmp_path)
    assert callback.L_tilde == pytest.approx(8 + 0.6 * GRAD_NORM_TWO)
    assert callback.beta == pytest.approx(0.5 / (8 + 0.6 * GRAD_NORM_TWO))


def test_rho_zero_draws_no_tasks(tmp_path):
    datamodule = FixedTasks()
    callback = TheoryStepSize(L=2.0, rho=0.0)
    fit(learner(MAML(inner_lr=0.1)), callback, tmp_path, datamodule)
    assert callback.L_tilde == 8.0 and callback.beta == pytest.approx(1 / 96)
    assert set(datamodule.draws) <= set(training_draws())


def test_too_many_shots_say_how_to_fix(tmp_path):
    with pytest.raises(ValueError, match="carry 3"):
        fit(learner(), TheoryStepSize(L=2.0, rho=3.0, shots=4), tmp_path)


def test_other_optimizers_warn_and_schedulers_raise(tmp_path):
    with pytest.warns(UserWarning, match="use torch.optim.SGD"):
        fit(learner(optimizer=torch.optim.Adam), TheoryStepSize(L=2.0, rho=0.0), tmp_path)
    scheduled = learner(
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)
    )
    with pytest.raises(ValueError, match="drop the model's lr_scheduler"):
        fit(scheduled, TheoryStepSize(L=2.0, rho=0.0), tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"L": 0.0, "rho": 0.0},
        {"L": 1.0, "rho": -1.0},
        {"L": 1.0, "rho": 0.0, "c": 0.0},
        {"L": 1.0, "rho": 0.0, "tasks": 0},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        TheoryStepSize(**kwargs)
