"""StationarityMonitor: its estimate against the closed-form grad F, logging, early stopping."""

from __future__ import annotations

import csv
import functools

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_maml import FOMAML, MAML, MetaLearner
from lightning_maml.callbacks import StationarityMonitor
from lightning_maml.datamodules import LinearTasks, LinearTasksDataModule
from lightning_maml.theory import LinearTaskFamily

INNER_LR = 0.025


def learner(lr: float, algorithm=None) -> MetaLearner:
    torch.manual_seed(0)
    return MetaLearner(
        torch.nn.Linear(10, 1, bias=False),
        algorithm or MAML(INNER_LR, hessian_batch="independent"),
        loss="mse",
        meta_optimizer=functools.partial(torch.optim.SGD, lr=lr),
    )


def fit(module, monitor, tmp_path, max_steps):
    trainer = Trainer(
        max_steps=max_steps,
        callbacks=[monitor],
        logger=CSVLogger(tmp_path),
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(
        module, datamodule=LinearTasksDataModule(shots=20, query_shots=20, hessian_shots=20)
    )
    return trainer


def test_estimate_matches_closed_form_grad_F(tmp_path):
    sampler = LinearTasks(shots=300, query_shots=300, hessian_shots=300)
    monitor = StationarityMonitor(every_n_steps=1, tasks=400, sampler=sampler)
    module = learner(lr=0.0, algorithm=FOMAML(INNER_LR))  # any variant: the monitor uses MAML
    w0 = module.model.weight.detach().double().numpy().ravel()
    fit(module, monitor, tmp_path, max_steps=1)
    exact = LinearTaskFamily().grad_F_norm(w0, INNER_LR)
    step, value, stderr = monitor.history[0]
    assert step == 0
    assert value == pytest.approx(exact, rel=0.1)
    assert stderr < 0.1 * exact
    assert monitor.held_out.num_tasks == 400 and monitor.held_out.has_hessian


def test_logs_and_stops_below_eps(tmp_path):
    sampler = LinearTasks(shots=100, query_shots=100, hessian_shots=100)
    monitor = StationarityMonitor(every_n_steps=5, tasks=100, sampler=sampler, eps=2.0)
    trainer = fit(learner(lr=0.05), monitor, tmp_path, max_steps=500)

    steps = [s for s, _, _ in monitor.history]
    values = [v for _, v, _ in monitor.history]
    assert values[0] > 2.0 and values[-1] <= 2.0
    assert all(v > 2.0 for v in values[:-1])
    assert steps == list(range(0, steps[-1] + 1, 5))
    assert trainer.global_step == steps[-1] < 500
    assert monitor.best == min(values)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("theory/grad_F_norm")]
    assert [int(r["step"]) for r in rows] == steps
    assert float(rows[-1]["theory/grad_F_norm_min"]) == pytest.approx(min(values))
    assert all(float(r["theory/grad_F_norm_stderr"]) > 0 for r in rows)


def test_defaults_to_the_datamodules_tasks(tmp_path):
    monitor = StationarityMonitor(every_n_steps=1, tasks=4)
    fit(learner(lr=0.01), monitor, tmp_path, max_steps=2)
    assert [s for s, _, _ in monitor.history] == [0, 1, 2]
    assert monitor.held_out.support_x.shape == (4, 20, 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_steps": 0},
        {"tasks": 1},
        {"eps": 0.0},
        {"sampler": "LinearTasks"},
        {"planned_steps": 0},
        {"stop": "yes"},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        StationarityMonitor(**kwargs)


def test_stop_true_stops_at_the_first_estimate_below_eps(tmp_path, capfd):
    sampler = LinearTasks(shots=100, query_shots=100, hessian_shots=100)
    monitor = StationarityMonitor(every_n_steps=5, tasks=100, sampler=sampler, eps=2.0)
    trainer = fit(learner(lr=0.05), monitor, tmp_path, max_steps=500)

    first_below = next((s, v) for s, v, _ in monitor.history if v <= 2.0)
    assert monitor.reached[:2] == first_below
    assert trainer.global_step == first_below[0]
    assert monitor.verdict.startswith(f"reached eps=2 at step {first_below[0]} of the planned 500")
    assert "standard errors" in monitor.verdict
    assert (
        f"StationarityMonitor: {monitor.verdict}" in capfd.readouterr().out
    )  # Lightning's info log, on stderr
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("theory/grad_F_norm")]
    assert all(float(r["theory/planned_steps"]) == 500 for r in rows)
    assert [r["theory/reached_step"] for r in rows][-1] == str(float(first_below[0]))
    assert all(r["theory/reached_step"] == "" for r in rows[:-1])


def test_stop_false_runs_on_and_keeps_the_first_reached_step(tmp_path):
    sampler = LinearTasks(shots=100, query_shots=100, hessian_shots=100)
    monitor = StationarityMonitor(
        every_n_steps=5, tasks=100, sampler=sampler, eps=2.0, stop=False, planned_steps=300
    )
    trainer = fit(learner(lr=0.05), monitor, tmp_path, max_steps=60)

    first_below = next(s for s, v, _ in monitor.history if v <= 2.0)
    assert trainer.global_step == 60 > first_below
    assert monitor.reached[0] == first_below
    assert monitor.verdict.startswith(f"reached eps=2 at step {first_below} of the planned 300:")


def test_verdict_when_eps_is_not_reached(tmp_path, capfd):
    sampler = LinearTasks(shots=50, query_shots=50, hessian_shots=50)
    monitor = StationarityMonitor(every_n_steps=4, tasks=20, sampler=sampler, eps=0.01)
    trainer = fit(learner(lr=0.05), monitor, tmp_path, max_steps=10)

    assert trainer.global_step == 10
    assert [s for s, _, _ in monitor.history] == [0, 4, 8, 10]  # the last step is measured too
    assert monitor.reached is None
    best = min(v for _, v, _ in monitor.history)
    best_step = next(s for s, v, _ in monitor.history if v == best)
    expected = (
        f"did not reach eps=0.01 in 10 steps: best ||grad F|| = {best:.4g} at step {best_step} "
        f"({best / 0.01:.4g} times eps)"
    )
    assert monitor.verdict == expected
    assert (
        f"StationarityMonitor: {expected}" in capfd.readouterr().out
    )  # Lightning's info log, on stderr


def test_the_confidence_statement_follows_the_standard_error():
    from lightning_maml.callbacks.stationarity import confidence

    assert "~95% confidence" in confidence(0.5, 0.1, 1.0)  # 5 standard errors below
    assert "within the estimate's noise" in confidence(0.95, 0.1, 1.0)  # half of one
