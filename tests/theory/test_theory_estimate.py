"""Constant estimates against families where L, rho, sigma, sigma_tilde and sigma_H are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_maml.tasks import TaskBatch
from lightning_maml.theory import estimate_constants, pooled_examples

CURVATURES = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])


class Point(nn.Module):
    """Predicts its own parameter vector for every input: the loss alone shapes f_i."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


def weighted_squares(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``0.5 (w - y)^T diag(h) (w - y)`` per example: Hessian diag(h) whatever the example."""
    return 0.5 * ((prediction - target).pow(2) * CURVATURES).sum(-1).mean()


def quadratic_tasks(num_tasks: int, examples: int, spread: float, noise: float) -> TaskBatch:
    """Task i: ``y = theta_i + noise * N(0, I)`` with ``theta_i ~ N(1, spread^2 I)``."""
    generator = torch.Generator().manual_seed(0)
    dim = len(CURVATURES)
    theta = 1 + spread * torch.randn(num_tasks, 1, dim, generator=generator)
    y = theta + noise * torch.randn(num_tasks, examples, dim, generator=generator)
    x = torch.zeros(num_tasks, examples, 1)
    half = examples // 2
    return TaskBatch(x[:, :half], y[:, :half], x[:, half:], y[:, half:])


def test_quadratic_family_within_ten_percent():
    spread, noise = 1.5, 0.7
    estimates = estimate_constants(
        Point(5), weighted_squares, quadratic_tasks(300, 40, spread, noise)
    )
    # grad f_i(w) = H (w - theta_i), per example H (w - y_j): the spreads are ||H|| times the
    # spreads of theta and of the noise; the Hessian H is the same everywhere.
    h_norm = CURVATURES.norm().item()
    assert pytest.approx(CURVATURES.max().item(), rel=0.1) == estimates.L
    assert estimates.sigma == pytest.approx(h_norm * spread, rel=0.1)
    assert estimates.sigma_tilde == pytest.approx(h_norm * noise, rel=0.1)
    assert estimates.rho < 1e-6
    assert estimates.sigma_H < 1e-6
    assert estimates.tasks == 300 and estimates.examples == 40


def cubic(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(w - y)^3 / 6`` per example: Hessian ``w - y``, so rho = 1 and sigma_H = noise."""
    return ((prediction - target).pow(3) / 6).sum(-1).mean()


def test_cubic_family_rho_and_hessian_spread():
    tasks = quadratic_tasks(50, 40, spread=0.0, noise=0.5)
    tasks = TaskBatch(
        *(t[..., :1] if t.shape[-1] == 5 else t for t in tasks.named_tensors().values())
    )
    model = Point(1)
    with torch.no_grad():
        model.w.fill_(4.0)
    estimates = estimate_constants(model, cubic, tasks)
    assert estimates.rho == pytest.approx(1.0, rel=0.01)
    # hess f_i(w) = w - mean(y) = 4 - 1 (up to the sample mean), the same for every task.
    assert pytest.approx(3.0, rel=0.1) == estimates.L
    assert estimates.sigma_H == pytest.approx(0.5, rel=0.1)


def test_the_model_is_left_alone():
    model = Point(5)
    estimate_constants(model, weighted_squares, quadratic_tasks(4, 6, 1.0, 1.0))
    assert model.w.dtype == torch.float32 and torch.equal(model.w, torch.zeros(5))


def test_pooled_examples_and_limit():
    tasks = quadratic_tasks(3, 10, 1.0, 1.0)
    x, y = pooled_examples(tasks)
    assert x.shape == (3, 10, 1) and y.shape == (3, 10, 5)
    assert torch.equal(y[:, :5], tasks.support_y)
    assert pooled_examples(tasks, 7)[1].shape == (3, 7, 5)
    with pytest.raises(ValueError, match="carry 10"):
        pooled_examples(tasks, 11)


def test_too_few_tasks_raise():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        estimate_constants(Point(5), weighted_squares, quadratic_tasks(1, 10, 1.0, 1.0))
    with pytest.raises(ValueError, match="power_iterations"):
        estimate_constants(
            Point(5), weighted_squares, quadratic_tasks(2, 10, 1.0, 1.0), power_iterations=0
        )
