"""Linear-regression tasks and the closed-form MAML objective of their family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_maml import MAML
from lightning_maml.datamodules import LinearTasks, LinearTasksDataModule
from lightning_maml.theory import LinearTaskFamily


def test_task_shapes_and_seeded_determinism():
    tasks = LinearTasks(dim=4, shots=3, query_shots=5, hessian_shots=2)
    task = tasks(np.random.default_rng(7), "train")
    assert task.support_x.shape == (3, 4) and task.support_y.shape == (3, 1)
    assert task.query_x.shape == (5, 4) and task.hessian_x.shape == (2, 4)
    assert task.support_x.dtype == torch.float32
    again = tasks(np.random.default_rng(7), "train")
    assert all(torch.equal(a, b) for a, b in zip(task, again, strict=True))
    assert LinearTasks(hessian_shots=0)(np.random.default_rng(0), "train").hessian_x is None


def test_labels_follow_the_curvature_tied_optimum():
    tasks = LinearTasks(dim=3, spread=2.0, shots=10, query_shots=10, hessian_shots=0)
    rng = np.random.default_rng(3)
    task = tasks(rng, "train")
    # The same draws in the same order: curvatures, then inputs.
    rng = np.random.default_rng(3)
    a = rng.uniform(0.2, 2.0, size=3)
    theta = 1.0 + 2.0 * (a - 1.1) / (1.8 / math.sqrt(12))
    np.testing.assert_allclose(tasks.optimum(a), theta)
    x = torch.cat([task.support_x, task.query_x]).double()
    y = torch.cat([task.support_y, task.query_y]).double()
    np.testing.assert_allclose(
        (x @ torch.from_numpy(theta)).numpy(), y.squeeze(1).numpy(), atol=1e-4
    )


def test_optimum_spread_is_the_coordinate_std():
    tasks = LinearTasks(spread=0.5)
    a = np.random.default_rng(0).uniform(0.2, 2.0, size=200_000)
    theta = tasks.optimum(a)
    assert theta.mean() == pytest.approx(1.0, abs=0.01)
    assert theta.std() == pytest.approx(0.5, rel=0.01)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dim": 0},
        {"shots": 0},
        {"hessian_shots": -1},
        {"curvature_range": (0.0, 1.0)},
        {"spread": -1.0},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        LinearTasks(**kwargs)


def test_datamodule_batches_and_hessian_shots():
    dm = LinearTasksDataModule(dim=5, shots=4, query_shots=6, hessian_shots=3, meta_batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 4, 5) and batch.hessian_y.shape == (2, 3, 1)
    assert dm.hessian_shots == 3


def test_grad_F_is_the_derivative_of_F():
    family = LinearTaskFamily(dim=3, spread=1.5, noise_std=0.3)
    w = np.array([0.3, -1.0, 2.0])
    for inner_lr, steps in [(0.025, 1), (0.05, 3)]:
        numeric = [
            (family.F(w + h, inner_lr, steps) - family.F(w - h, inner_lr, steps)) / 2e-6
            for h in 1e-6 * np.eye(3)
        ]
        np.testing.assert_allclose(family.grad_F(w, inner_lr, steps), numeric, rtol=1e-6)
        assert family.grad_F_norm(family.maml_optimum(inner_lr, steps), inner_lr, steps) < 1e-12


def test_closed_form_matches_sampled_tasks():
    family = LinearTaskFamily(dim=10, spread=1.0)
    tasks = LinearTasks(dim=10, spread=1.0, shots=500, query_shots=500, hessian_shots=500)
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1, bias=False)
    w = model.weight.detach().double().numpy().ravel()
    from lightning_maml.datamodules.base import TrainTaskStream

    batch = TrainTaskStream(tasks, 400, seed=1).batch(0)
    algorithm = MAML(0.025, hessian_batch="independent")
    step = algorithm.meta_gradient(model, torch.nn.functional.mse_loss, batch)
    assert step.loss.item() == pytest.approx(family.F(w, 0.025), rel=0.05)
    sampled = step.grads["weight"].double().numpy().ravel()
    exact = family.grad_F(w, 0.025)
    assert np.linalg.norm(sampled - exact) < 0.1 * np.linalg.norm(exact)


def test_fomaml_floor_matches_the_measured_figures():
    # The issue measured 0.034 / 0.066 / 0.125 on the loss 0.5 * mse at inner_lr 0.025 / 0.05 /
    # 0.1; the loss "mse" doubles every gradient and halves the inner_lr for the same iterates.
    family = LinearTaskFamily()
    floors = [family.fomaml_floor(a) for a in (0.0125, 0.025, 0.05)]
    np.testing.assert_allclose(floors, [2 * 0.034, 2 * 0.066, 2 * 0.125], rtol=0.02)
    spreads = [LinearTaskFamily(spread=s).fomaml_floor(0.025) for s in (0.5, 1.0, 2.0)]
    np.testing.assert_allclose(spreads, [2 * 0.033, 2 * 0.066, 2 * 0.133], rtol=0.02)
    # About 0.2 * inner_lr * L * sigma, with sigma at the MAML optimum.
    for a, floor in zip((0.0125, 0.025, 0.05), floors, strict=True):
        sigma = family.sigma(family.maml_optimum(a))
        assert floor / (a * family.L * sigma) == pytest.approx(0.2, abs=0.03)


def test_sigma_is_the_task_gradient_spread():
    family = LinearTaskFamily(dim=2, spread=1.0)
    tasks = LinearTasks(dim=2, spread=1.0)
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 2.0, size=(200_000, 2))
    w = np.array([0.5, 1.5])
    grads = 2 * a * (w - tasks.optimum(a))
    assert family.sigma(w) == pytest.approx(np.sqrt(grads.var(0).sum()), rel=0.01)
    assert family.L == 4.0 and family.rho == 0.0
