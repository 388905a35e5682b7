"""Meta-gradients against an independent reference built on torch.autograd.functional.hessian.

The reference works on one flat float64 parameter vector with plain torch.autograd, so it shares
no code with the library's torch.func core.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian

from lightning_maml import FOMAML, HFMAML, MAML, TaskBatch

TASKS, SHOTS = 3, 4


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    # Smooth activations, so the Hessian is not piecewise constant and rho > 0.
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def tiny_tasks(hessian_set: bool = True) -> TaskBatch:
    g = torch.Generator().manual_seed(1)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(TASKS, SHOTS, 2, generator=g, dtype=torch.float64)
        return x, torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(
            TASKS, SHOTS, 1, generator=g, dtype=torch.float64
        )

    support, query, hess = sample(), sample(), sample()
    return TaskBatch(*support, *query, *(hess if hessian_set else (None, None)))


def flat_loss(model: nn.Module):
    """f(theta; x, y) for a flat parameter vector theta, by plain tensor algebra."""
    shapes = [p.shape for p in model.parameters()]

    def f(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        chunks, i = [], 0
        for shape in shapes:
            n = shape.numel()
            chunks.append(theta[i : i + n].view(shape))
            i += n
        w1, b1, w2, b2 = chunks
        prediction = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        return ((prediction - y) ** 2).mean()

    return f


def flat_grad(f, theta, x, y) -> torch.Tensor:
    theta = theta.detach().requires_grad_(True)
    return torch.autograd.grad(f(theta, x, y), theta)[0]


def reference(model, tasks, inner_lr, inner_steps, mode) -> torch.Tensor:
    """Mean over tasks of prod_j (I - alpha H(w_j)) grad f_o(w_k), or grad f_o(w_k) for "first"."""
    f = flat_loss(model)
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    total = torch.zeros_like(theta0)
    for i in range(tasks.num_tasks):
        points, theta = [], theta0
        for _ in range(inner_steps):
            points.append(theta)
            theta = theta - inner_lr * flat_grad(f, theta, tasks.support_x[i], tasks.support_y[i])
        g = flat_grad(f, theta, tasks.query_x[i], tasks.query_y[i])
        if mode != "first":
            x_h, y_h = (
                (tasks.hessian_x[i], tasks.hessian_y[i])
                if mode == "independent"
                else (tasks.support_x[i], tasks.support_y[i])
            )
            for w in reversed(points):
                h = hessian(lambda t, x_h=x_h, y_h=y_h: f(t, x_h, y_h), w)
                g = g - inner_lr * h @ g
        total += g
    return total / tasks.num_tasks


def flat(grads: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n, _ in model.named_parameters()])


mse = nn.functional.mse_loss


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("hessian_batch", ["inner", "independent"])
def test_maml_matches_hessian_reference(inner_steps, hessian_batch):
    model, tasks = tiny_net(), tiny_tasks()
    result = MAML(0.3, inner_steps, hessian_batch).meta_gradient(model, mse, tasks)
    expected = reference(model, tasks, 0.3, inner_steps, hessian_batch)
    torch.testing.assert_close(flat(result.grads, model), expected, rtol=1e-9, atol=1e-12)


def test_maml_hessian_modes_differ():
    # Guards the reference test: the two estimators must not coincide on this problem.
    model, tasks = tiny_net(), tiny_tasks()
    inner = flat(MAML(0.3, hessian_batch="inner").meta_gradient(model, mse, tasks).grads, model)
    indep = flat(
        MAML(0.3, hessian_batch="independent").meta_gradient(model, mse, tasks).grads, model
    )
    assert (inner - indep).norm() > 1e-3 * inner.norm()


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_fomaml_matches_reference(inner_steps):
    model, tasks = tiny_net(), tiny_tasks()
    result = FOMAML(0.3, inner_steps).meta_gradient(model, mse, tasks)
    expected = reference(model, tasks, 0.3, inner_steps, "first")
    torch.testing.assert_close(flat(result.grads, model), expected, rtol=1e-9, atol=1e-12)


def test_query_loss_is_post_adaptation_mean():
    model, tasks = tiny_net(), tiny_tasks()
    f = flat_loss(model)
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    losses = []
    for i in range(TASKS):
        u = theta0 - 0.3 * flat_grad(f, theta0, tasks.support_x[i], tasks.support_y[i])
        losses.append(f(u, tasks.query_x[i], tasks.query_y[i]))
    result = FOMAML(0.3).meta_gradient(model, mse, tasks)
    torch.testing.assert_close(result.loss, torch.stack(losses).mean())
    torch.testing.assert_close(result.task_losses, torch.stack(losses))


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("hessian_batch", ["inner", "independent"])
def test_hfmaml_error_falls_with_delta(inner_steps, hessian_batch):
    model, tasks = tiny_net(), tiny_tasks()
    exact = reference(model, tasks, 0.3, inner_steps, hessian_batch)
    errors = []
    for delta in [1e-1, 1e-2, 1e-3]:
        algo = HFMAML(0.3, inner_steps, hessian_batch, delta=delta)
        errors.append((flat(algo.meta_gradient(model, mse, tasks).grads, model) - exact).norm())
    # Central differences: error O(delta^2), so each 10x smaller delta cuts it by far more than 10x.
    assert errors[0] > 30 * errors[1] > 30 * 30 * errors[2]
    assert errors[2] < 1e-6 * exact.norm()


def test_hfmaml_delta_rules():
    model, tasks = tiny_net(), tiny_tasks()
    v = reference(model, tasks, 0.3, 1, "first")  # only its scale matters below
    scale = HFMAML(0.3, delta_scale=0.05).meta_gradient(model, mse, tasks)
    theory = HFMAML(0.3, delta="theory", rho=2.0).meta_gradient(model, mse, tasks)
    fixed = HFMAML(0.3, delta=0.02).meta_gradient(model, mse, tasks)
    torch.testing.assert_close(
        fixed.stats["hfmaml/delta"], torch.tensor([0.02], dtype=torch.float64)
    )
    # delta_i = c / ||v_i|| and 1 / (6 rho alpha ||v_i||) per task; compare via the same norms.
    f = flat_loss(model)
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    norms = []
    for i in range(TASKS):
        u = theta0 - 0.3 * flat_grad(f, theta0, tasks.support_x[i], tasks.support_y[i])
        norms.append(flat_grad(f, u, tasks.query_x[i], tasks.query_y[i]).norm())
    norms = torch.stack(norms)
    torch.testing.assert_close(scale.stats["hfmaml/delta"], (0.05 / norms).mean().unsqueeze(0))
    torch.testing.assert_close(
        theory.stats["hfmaml/delta"], (1 / (6 * 2.0 * 0.3 * norms)).mean().unsqueeze(0)
    )
    assert v.norm() > 0


def test_fomaml_equals_maml_as_inner_lr_vanishes():
    model, tasks = tiny_net(), tiny_tasks()
    for inner_lr, tolerance in [(1e-2, 1e-1), (1e-5, 1e-4)]:
        first = flat(FOMAML(inner_lr).meta_gradient(model, mse, tasks).grads, model)
        exact = flat(MAML(inner_lr).meta_gradient(model, mse, tasks).grads, model)
        assert (first - exact).norm() < tolerance * exact.norm()
    assert (first - exact).norm() > 0  # they are different estimators, not one code path


def algorithms():
    return [
        MAML(0.3, 2),
        MAML(0.3, 2, "independent"),
        FOMAML(0.3, 2),
        HFMAML(0.3, 2, delta=1e-3),
        HFMAML(0.3, 1, "independent"),
    ]


@pytest.mark.parametrize("algorithm", algorithms(), ids=repr)
def test_chunked_and_looped_equal_vectorised(algorithm):
    model, tasks = tiny_net(), tiny_tasks()
    results = {}
    for size in [None, 2, 1]:
        algorithm.task_chunk_size = size
        results[size] = algorithm.meta_gradient(model, mse, tasks)
    for size in [2, 1]:
        torch.testing.assert_close(results[size].grads, results[None].grads)
        torch.testing.assert_close(results[size].loss, results[None].loss)
        torch.testing.assert_close(
            results[size].stats["grad_norm/inner"], results[None].stats["grad_norm/inner"]
        )


def test_batchnorm_without_running_stats_vmaps():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).double()
    x = torch.randn(4, 6, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 6))
    tasks = TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    ce = nn.functional.cross_entropy
    looped = MAML(0.1, task_chunk_size=1).meta_gradient(model, ce, tasks)
    vectorised = MAML(0.1, task_chunk_size=None).meta_gradient(model, ce, tasks)
    torch.testing.assert_close(looped.grads, vectorised.grads)
    assert all(g.abs().sum() > 0 for g in vectorised.grads.values())


def test_model_is_not_modified():
    model, tasks = tiny_net(), tiny_tasks()
    before = {n: p.clone() for n, p in model.named_parameters()}
    for algorithm in algorithms():
        algorithm.meta_gradient(model, mse, tasks)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None


def test_evaluate_adapts_longer():
    model, tasks = tiny_net(), tiny_tasks()
    one = MAML(0.3).evaluate(model, mse, tasks, inner_steps=1)
    five = MAML(0.3).evaluate(model, mse, tasks, inner_steps=5)
    assert five.stats["loss/support"].shape == (5,)
    assert five.stats["loss/support"][-1] < five.stats["loss/support"][0]
    torch.testing.assert_close(one.loss, FOMAML(0.3).meta_gradient(model, mse, tasks).loss)
    # evaluation needs no Hessian set even for the independent estimator
    MAML(0.3, hessian_batch="independent").evaluate(model, mse, tiny_tasks(hessian_set=False))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MAML(0.0), "inner_lr must be a positive finite number"),
        (lambda: MAML(-0.1), "inner_lr must be a positive finite number"),
        (lambda: FOMAML(0.1, inner_steps=0), "inner_steps must be an integer >= 1"),
        (
            lambda: MAML(0.1, hessian_batch="outer"),
            "hessian_batch must be 'inner' or 'independent'",
        ),
        (lambda: MAML(0.1, task_chunk_size=0), "task_chunk_size must be an integer >= 1"),
        (lambda: HFMAML(0.1, delta="theory"), "needs rho > 0"),
        (lambda: HFMAML(0.1, delta=-1.0), "delta must be a positive number"),
        (lambda: HFMAML(0.1, delta=0.1, delta_scale=0.1), "either delta or delta_scale"),
        (lambda: HFMAML(0.1, rho=1.0), "rho is used only with delta='theory'"),
        (lambda: FOMAML(0.1, compile="fast"), "compile must be true, false or one of"),
        (lambda: MAML(0.1, compile="reduce-overhead"), "CUDA-graph modes are not supported"),
    ],
)
def test_bad_hyperparameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "algorithm", [MAML(0.1, hessian_batch="independent"), HFMAML(0.1, hessian_batch="independent")]
)
def test_independent_without_hessian_set_raises(algorithm):
    with pytest.raises(ValueError, match="needs a Hessian set D_h"):
        algorithm.meta_gradient(tiny_net(), mse, tiny_tasks(hessian_set=False))


def test_fomaml_ignores_missing_hessian_set():
    # FO-MAML has no Hessian term: without D_h it runs, and gives the meta-gradient it gives with D_h.
    without = FOMAML(0.1).meta_gradient(tiny_net(), mse, tiny_tasks(hessian_set=False))
    with_set = FOMAML(0.1).meta_gradient(tiny_net(), mse, tiny_tasks(hessian_set=True))
    assert without.grads.keys() == with_set.grads.keys()
    for name, grad in with_set.grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(without.grads[name], grad, rtol=0, atol=0)


def test_mismatched_task_dimension_raises():
    x = torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="disagree in the task dimension"):
        TaskBatch(x, x, x[:2], x[:2])
    with pytest.raises(ValueError, match="only one of hessian_x / hessian_y"):
        TaskBatch(x, x, x, x, hessian_x=x)
    with pytest.raises(ValueError, match="examples per task"):
        TaskBatch(x, x[:, :3], x, x)


def test_running_statistics_raise():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    tasks = TaskBatch(*(torch.randn(2, 4, 2),) * 4)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        MAML(0.1).meta_gradient(model, mse, tasks)


def test_pre_adaptation_query_loss_only_when_tracked():
    model, tasks = tiny_net(), tiny_tasks()
    f = flat_loss(model)
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = torch.stack([f(theta0, tasks.query_x[i], tasks.query_y[i]) for i in range(TASKS)])
    assert MAML(0.3).meta_gradient(model, mse, tasks).loss_before is None
    tracked = MAML(0.3, track_loss_before=True).meta_gradient(model, mse, tasks)
    torch.testing.assert_close(tracked.loss_before, expected.mean())
    torch.testing.assert_close(MAML(0.3).evaluate(model, mse, tasks).loss_before, expected.mean())
