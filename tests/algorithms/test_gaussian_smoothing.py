"""HF-MAML's Gaussian-smoothing Hessian-vector products against float64 torch.autograd references.

The estimate is random, so each statistical test draws many directions from a fixed seed and
compares the mean with the exact value within its standard error: derived in closed form for a
quadratic loss (where the antithetic difference is exactly ``H u``, so that each term is
``H u <u, v>`` with covariance ``H (||v||^2 I + v v^T) H``), and estimated from the draws
elsewhere. The references are ``torch.autograd.functional.hessian`` and a plain double backward
on hand-written forward passes, and MAML's meta-gradient through the inner loop. One exact test
ties the antithetic form to the one-sided form of Ji, Yang and Liang's code.
"""

from __future__ import annotations

import functools
import pickle

import lightning as L
import pytest
import torch
from torch import nn

from lightning_maml import HFMAML, MAML, MetaLearner, TaskBatch
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.functional import TaskModel, gaussian_smoothing_hvp, mse_loss
from lightning_maml.models import MLP

#: A draw's mean lies within Z standard errors of the truth (a fixed seed makes each test
#: deterministic; Z is wide enough that a correct estimator passes for most seeds).
Z = 4.5


def flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflat(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, t in like.items():
        out[name] = vector[i : i + t.numel()].view(t.shape)
        i += t.numel()
    return out


def directions(params: dict[str, torch.Tensor], samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn((samples, *p.shape), generator=g, dtype=torch.float64)
        for n, p in params.items()
    }


# -- a quadratic loss: a linear model under the squared error -------------------------------


def linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()  # 4 parameters; the loss is exactly quadratic in them
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, 1, generator=g, dtype=torch.float64)
    task = TaskModel(model, mse_loss)
    params = task.params()
    vector = unflat(torch.randn(4, generator=g, dtype=torch.float64), params)

    def loss(theta: torch.Tensor) -> torch.Tensor:  # written out, without the library
        return ((x @ theta[:3] + theta[3] - y.squeeze(1)) ** 2).mean()

    hessian = torch.autograd.functional.hessian(loss, flat(params))
    return task, params, vector, x, y, hessian


def test_quadratic_each_draw_is_h_u_times_u_dot_v_at_any_radius():
    task, params, vector, x, y, hessian = linear_problem()
    noise = directions(params, 16, seed=2)
    u = torch.stack([flat({n: noise[n][s] for n in params}) for s in range(16)])
    expected = (u @ hessian.T * (u @ flat(vector))[:, None]).mean(0)
    for radius in (1e-4, 1.0, 100.0):
        estimate = gaussian_smoothing_hvp(task, params, vector, noise, radius, x, y)
        torch.testing.assert_close(flat(estimate), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.slow
def test_quadratic_mean_is_unbiased_within_its_derived_standard_error():
    task, params, vector, x, y, hessian = linear_problem()
    samples = 4000
    estimate = flat(
        gaussian_smoothing_hvp(task, params, vector, directions(params, samples, 3), 0.01, x, y)
    )
    v = flat(vector)
    exact = hessian @ v
    covariance = hessian @ (v.dot(v) * torch.eye(4, dtype=v.dtype) + torch.outer(v, v)) @ hessian
    covariance /= samples

    def mahalanobis(e: torch.Tensor) -> float:
        return float(e @ torch.linalg.solve(covariance, e))

    # chi-square with 4 degrees of freedom: 0.9999 quantile 23.5.
    assert mahalanobis(estimate - exact) < 23.5
    # The bound has teeth: an estimator off by half in scale, or by the 2 of its 2 mu, falls
    # far outside it with this many draws.
    assert mahalanobis(1.5 * estimate - exact) > 100
    assert mahalanobis(2.0 * estimate - exact) > 100


# -- a smooth MLP: the smoothed Hessian is off by O(mu^2) -----------------------------------


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True))
    task = TaskModel(model, mse_loss)
    params = task.params()
    vector = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}

    def loss(theta: torch.Tensor) -> torch.Tensor:  # written out, without the library
        w1, b1, w2, b2 = unflat(theta, params).values()
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    def hvp(theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        theta = theta.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
        return torch.autograd.grad(gradient @ v, theta)[0]

    return task, params, vector, x, y, hvp


@pytest.mark.slow
def test_smooth_mlp_mean_approaches_the_exact_product():
    task, params, vector, x, y, hvp = mlp_problem()
    theta, v = flat(params), flat(vector)
    exact = hvp(theta, v)
    samples = 800
    noise = directions(params, samples, seed=4)
    draws, bias_terms = [], {}
    for radius in (1e-3, 1e-2):
        terms, deviations = [], []
        for s in range(samples):
            one = {n: noise[n][s : s + 1] for n in params}
            term = flat(gaussian_smoothing_hvp(task, params, vector, one, radius, x, y))
            u = flat({n: one[n][0] for n in params})
            # The same direction's exact term H u <u, v>: what is left is the O(mu^2) bias.
            deviations.append(term - hvp(theta, u) * u.dot(v))
            terms.append(term)
        bias_terms[radius] = torch.stack(deviations)
        if radius == 1e-3:
            draws = torch.stack(terms)
    # The bias of the antithetic difference falls as mu^2: 100 times from mu = 1e-2 to 1e-3.
    ratio = bias_terms[1e-2].abs().mean() / bias_terms[1e-3].abs().mean()
    assert 60 < ratio < 160
    bias_bound = bias_terms[1e-3].abs().max(0).values
    mean = draws.mean(0)
    standard_error = draws.std(0) / samples**0.5
    assert bool(((mean - exact).abs() <= Z * standard_error + bias_bound).all())
    # The standard error is what limits the estimate here, not the bias.
    assert float(bias_bound.max()) < 0.05 * float(standard_error.min())


def test_antithetic_form_is_the_authors_one_sided_form_over_mirrored_directions():
    # Ji, Yang and Liang's code (GGS-MAML-DL, approx_method="ggs") estimates hess f(w) v as
    # mean_s [grad f(w + mu u_s) - grad f(w)] / mu * <u_s, v>, u_s ~ N(0, I). Averaged over each
    # u_s and its mirror -u_s (same density, so the same expectation) it is the antithetic
    # term, exactly, at any radius: the two forms estimate the same smoothed Hessian.
    task, params, vector, x, y, _ = mlp_problem()
    theta, v = flat(params), flat(vector)

    def gradient(t: torch.Tensor) -> torch.Tensor:  # written out, without the library
        t = t.detach().requires_grad_()
        w1, b1, w2, b2 = unflat(t, params).values()
        loss = ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()
        return torch.autograd.grad(loss, t)[0]

    samples = 6
    noise = directions(params, samples, seed=5)
    u = torch.stack([flat({n: noise[n][s] for n in params}) for s in range(samples)])
    for radius in (1e-2, 0.3):

        def one_sided(d: torch.Tensor, mu: float = radius) -> torch.Tensor:
            return (gradient(theta + mu * d) - gradient(theta)) / mu * d.dot(v)

        mirrored = torch.stack([(one_sided(d) + one_sided(-d)) / 2 for d in u]).mean(0)
        estimate = flat(gaussian_smoothing_hvp(task, params, vector, noise, radius, x, y))
        torch.testing.assert_close(estimate, mirrored, rtol=1e-9, atol=1e-12)
        # Without the mirror the one-sided terms differ: the identity is not vacuous.
        plain = torch.stack([one_sided(d) for d in u]).mean(0)
        assert float((plain - estimate).abs().max()) > 1e-6


# -- HF-MAML's meta-gradient -----------------------------------------------------------------


def tasks_of(count: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(count, 12, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(
        count, 12, 1, generator=g, dtype=torch.float64
    )
    return TaskBatch(x[:, :4], y[:, :4], x[:, 4:8], y[:, 4:8], x[:, 8:], y[:, 8:])


def reference_meta_gradient(model: nn.Module, tasks: TaskBatch, lr: float, steps: int):
    """MAML's meta-gradient by plain torch.autograd through the inner loop (Hessian set D_h)."""
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_() for p in model.parameters())

    def loss(ps, x, y):
        return ((torch.tanh(x @ ps[0].T + ps[1]) @ ps[2].T + ps[3] - y) ** 2).mean()

    total = 0
    for t in range(tasks.num_tasks):
        ps = [w1, b1, w2, b2]
        for _ in range(steps):
            grads = torch.autograd.grad(loss(ps, tasks.support_x[t], tasks.support_y[t]), ps)
            hess_grads = torch.autograd.grad(
                loss(ps, tasks.hessian_x[t], tasks.hessian_y[t]), ps, create_graph=True
            )
            # Value of the support gradient, derivative of the Hessian set's (as the library).
            ps = [
                p - lr * (g + h - h.detach()) for p, g, h in zip(ps, grads, hess_grads, strict=True)
            ]
        total = total + loss(ps, tasks.query_x[t], tasks.query_y[t])
    grads = torch.autograd.grad(total / tasks.num_tasks, [w1, b1, w2, b2])
    return torch.cat([g.reshape(-1) for g in grads])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()


@pytest.mark.slow
@pytest.mark.parametrize("task_chunk_size", [1, None], ids=["loop", "vmap"])
def test_meta_gradient_averaged_over_seeds_matches_maml(task_chunk_size):
    model, tasks = mlp(), tasks_of()
    exact = reference_meta_gradient(model, tasks, 0.3, 2)
    library = MAML(0.3, 2, "independent").meta_gradient(model, mse_loss, tasks).grads
    torch.testing.assert_close(flat(library), exact, rtol=1e-9, atol=1e-12)
    estimates = torch.stack(
        [
            flat(
                HFMAML(
                    0.3,
                    2,
                    "independent",
                    hvp="gaussian_smoothing",
                    smoothing_radius=1e-3,
                    smoothing_samples=4,
                    seed=seed,
                    task_chunk_size=task_chunk_size,
                )
                .meta_gradient(model, mse_loss, tasks)
                .grads
            )
            for seed in range(150)
        ]
    )
    mean, standard_error = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert bool(((mean - exact).abs() <= Z * standard_error).all())
    # One draw is noisy: the mean over draws is far closer than a draw.
    single = (estimates - exact).norm(dim=1).median()
    assert float((mean - exact).norm()) < float(single) / 5


def test_tasks_of_a_chunk_draw_their_own_directions():
    model, tasks = mlp(), tasks_of(1)
    # The same task three times: equal products would mean shared directions.
    same = TaskBatch(**{n: t.expand(3, *t.shape[1:]) for n, t in tasks.named_tensors().items()})
    for chunk in (1, None):
        algorithm = HFMAML(0.3, 2, hvp="gaussian_smoothing", task_chunk_size=chunk)
        stats = algorithm._run(model, mse_loss, same, "chunk_meta_gradient")
        norms = stats["hfmaml/hvp_norm"]  # (tasks, inner steps)
        assert norms.shape == (3, 2)
        assert len(set(norms.flatten().tolist())) == 6


# -- reproducibility -------------------------------------------------------------------------


def smoothing(seed: int = 0, inner_steps: int = 2, **kwargs) -> HFMAML:
    return HFMAML(0.3, inner_steps, hvp="gaussian_smoothing", seed=seed, **kwargs)


def test_draws_are_reproducible_by_seed_and_step():
    model, tasks = mlp(), tasks_of()

    def grads(algorithm: HFMAML, step: int | None = None) -> torch.Tensor:
        return flat(algorithm.meta_gradient(model, mse_loss, tasks, step).grads)

    # Without a step: a fresh algorithm of the same seed draws the same sequence.
    first, second = smoothing(), smoothing()
    a1, a2 = grads(first), grads(first)
    torch.testing.assert_close(grads(second), a1, rtol=0, atol=0)
    torch.testing.assert_close(grads(second), a2, rtol=0, atol=0)
    assert not torch.equal(a1, a2)
    assert not torch.equal(grads(smoothing(seed=1)), a1)
    # With a step: the draw depends on the seed and the step only, not on what ran before.
    algorithm = smoothing()
    at_5 = grads(algorithm, 5)
    grads(algorithm, 6)
    torch.testing.assert_close(grads(algorithm, 5), at_5, rtol=0, atol=0)
    torch.testing.assert_close(grads(smoothing(), 5), at_5, rtol=0, atol=0)
    assert not torch.equal(grads(smoothing(), 6), at_5)
    assert not torch.equal(grads(smoothing(seed=1), 5), at_5)


def test_options_round_trip_through_hparams():
    algorithm = smoothing(seed=3, smoothing_radius=0.01, smoothing_samples=5)
    hparams = algorithm.hparams()
    assert (hparams["smoothing_radius"], hparams["smoothing_samples"], hparams["seed"]) == (
        0.01,
        5,
        3,
    )
    settings = {k: v for k, v in hparams.items() if k not in ("variant", "inner_update")}
    assert HFMAML(**settings).hparams() == hparams


# -- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: smoothing(smoothing_radius=0.0), "smoothing_radius must be a positive"),
        (lambda: smoothing(smoothing_radius=-1e-3), "smoothing_radius must be a positive"),
        (lambda: smoothing(smoothing_radius=float("inf")), "smoothing_radius must be a positive"),
        (lambda: smoothing(smoothing_samples=0), "smoothing_samples must be an integer >= 1"),
        (lambda: smoothing(smoothing_samples=2.5), "smoothing_samples must be an integer >= 1"),
        (lambda: smoothing(seed=-1), "seed must be an integer >= 0"),
        (lambda: smoothing(delta_scale=0.3), "takes no delta, rho or delta_scale"),
        (lambda: smoothing(delta=0.01), "takes no delta, rho or delta_scale"),
        (lambda: smoothing(delta="theory", rho=1.0), "takes no delta, rho or delta_scale"),
        (lambda: HFMAML(0.1, smoothing_radius=1e-3), "only with hvp='gaussian_smoothing'"),
        (lambda: HFMAML(0.1, hvp="reverse", smoothing_samples=4), "only with hvp='gaussian_"),
        (lambda: HFMAML(0.1, delta_scale=0.3, smoothing_samples=4), "only with hvp='gaussian_"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_recipe_conflict_says_how_to_clear_delta_scale():
    with pytest.raises(ValueError, match=r"--model\.algorithm\.init_args\.delta_scale null"):
        smoothing(delta_scale=0.3)


# -- in a Trainer ----------------------------------------------------------------------------


def fit(max_steps: int, ckpt_path=None, callbacks=()) -> MetaLearner:
    L.seed_everything(0)
    learner = MetaLearner(
        MLP(hidden=8),
        HFMAML(0.05, 2, hvp="gaussian_smoothing", smoothing_samples=2),
        meta_optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=3), ckpt_path=ckpt_path)
    return learner


def test_trains_in_a_trainer_and_resumes_with_the_same_draws(tmp_path):
    from lightning_maml.callbacks import ModelCheckpoint

    L.seed_everything(0)
    initial = {n: p.detach().clone() for n, p in MLP(hidden=8).named_parameters()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    uninterrupted = fit(4, callbacks=[checkpoint])
    trained = dict(uninterrupted.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in trained.values())
    assert any(not torch.equal(trained[n], initial[n]) for n in initial)
    # Resumed at step 2, the steps 2 and 3 draw the same directions as the uninterrupted run.
    resumed = fit(4, ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    for (name, a), b in zip(
        uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


# -- compiled, pickled -------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_meta_gradient_draws_as_eager():
    torch._dynamo.reset()
    model, tasks = mlp().float(), tasks_of()
    tasks = TaskBatch(**{n: t.float() for n, t in tasks.named_tensors().items()})
    # One step and one direction: compiling the unrolled loop of more takes minutes on a CPU.
    options = {"inner_steps": 1, "smoothing_samples": 1}
    eager = smoothing(**options).meta_gradient(model, mse_loss, tasks, step=3)
    compiled = smoothing(**options, compile=True).meta_gradient(model, mse_loss, tasks, step=3)
    for name, grad in eager.grads.items():
        torch.testing.assert_close(compiled.grads[name], grad, rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()


def test_pickles_after_drawing_and_draws_the_same_by_step():
    model, tasks = mlp(), tasks_of()
    algorithm = smoothing()
    before = algorithm.meta_gradient(model, mse_loss, tasks, step=2)
    copy = pickle.loads(pickle.dumps(algorithm))  # what ddp_spawn does to the LightningModule
    after = copy.meta_gradient(model, mse_loss, tasks, step=2)
    torch.testing.assert_close(flat(after.grads), flat(before.grads), rtol=0, atol=0)
