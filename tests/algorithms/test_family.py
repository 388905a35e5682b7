"""The MAML family on one core: every meta-gradient against an independent float64 reference.

The reference differentiates hand-written forward passes with plain ``torch.autograd`` (no
torch.func, no project code): it runs the inner loop with ``create_graph`` (second order) or
detached inner gradients (first order) and differentiates the query loss with respect to the
initial parameters and the step sizes. Each inner update (fixed, ANIL, BOIL, Meta-SGD, per-step
step sizes, per-step BatchNorm) meets each meta-gradient that can use it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_maml import (
    ANIL,
    BOIL,
    FOMAML,
    HFMAML,
    MAML,
    InnerUpdate,
    MAMLPlusPlus,
    MetaLearner,
    MetaSGD,
    PerStepRates,
    Reptile,
    TaskBatch,
)
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.functional import mse_loss
from lightning_maml.inner.base import key
from lightning_maml.models import MLP, ConvNet

TASKS = 3

# -- tiny float64 problems and their hand-written forward passes ----------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    # tanh: smooth, so that HF-MAML's finite differences converge to the exact products.
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def mlp_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]


def mlp_tasks() -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TASKS, 12, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(TASKS, 12, 1, generator=g).double()
    return TaskBatch(x[:, :4], y[:, :4], x[:, 4:8], y[:, 4:8], x[:, 8:], y[:, 8:])


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet(in_channels=1, ways=3, hidden=3, image_size=8, blocks=2).double()


def conv_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    for conv, bn in (("features.0", "features.1"), ("features.4", "features.5")):
        x = F.conv2d(x, p[f"{conv}.weight"], p[f"{conv}.bias"], padding=1)
        x = F.batch_norm(x, None, None, p[f"{bn}.weight"], p[f"{bn}.bias"], training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return x.flatten(1) @ p["classifier.weight"].T + p["classifier.bias"]


def conv_tasks() -> TaskBatch:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(TASKS, 9, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(3).expand(TASKS, -1)
    return TaskBatch(x[:, :3], y[:, :3], x[:, 3:6], y[:, 3:6], x[:, 6:], y[:, 6:])


PROBLEMS = {
    "mlp": (mlp, mlp_forward, mlp_tasks, mse_loss),
    "conv": (convnet, conv_forward, conv_tasks, F.cross_entropy),
}

# -- the reference ----------------------------------------------------------------------------


def reference(
    problem: str,
    update: InnerUpdate,
    steps: int,
    order: str = "second",
    hessian: str = "inner",
    weights: list[float] | None = None,
    inner_lr: float = 0.3,
):
    """Mean over tasks of d(query loss)/d(params) and d/d(learned tensors), by plain autograd.

    The step sizes and adapted parameters are read from ``update``'s own tensors and names (its
    construction is what is under test elsewhere); everything else is written out here.
    """
    build, forward, make_tasks, loss_fn = PROBLEMS[problem]
    model, tasks = build(), make_tasks()
    update = copy.deepcopy(update)  # bound already: its names, shapes and values are kept
    leaves = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    learned = {n: p.detach().clone().requires_grad_() for n, p in update.named_parameters()}
    per_step_bn = getattr(update, "batch_norm", False)

    def alpha(n: str, j: int):
        if isinstance(update, PerStepRates):
            return learned[f"lr.{key(n)}"][j]
        if learned:  # one learned tensor per parameter, the same on every step
            return learned[f"lr.{key(n)}"]
        return inner_lr

    def view(w: dict, j: int) -> dict:
        if not per_step_bn:
            return w
        return {**w, **{n: w[n] + learned[f"bn.{key(n)}"][j] for n in update.normalized}}

    total_p = {n: torch.zeros_like(v) for n, v in leaves.items()}
    total_r = {n: torch.zeros_like(v) for n, v in learned.items()}
    for i in range(TASKS):
        w = dict(leaves)
        points = []
        for j in range(steps):
            sx, sy = tasks.support_x[i], tasks.support_y[i]
            inner = loss_fn(forward(view(w, j), sx), sy)
            names = update.adapted
            grads = torch.autograd.grad(
                inner, [w[n] for n in names], create_graph=order == "second"
            )
            if hessian == "independent":
                # Value of the support gradient, derivative of the Hessian set's.
                hx, hy = tasks.hessian_x[i], tasks.hessian_y[i]
                h_loss = loss_fn(forward(view(w, j), hx), hy)
                h_grads = torch.autograd.grad(h_loss, [w[n] for n in names], create_graph=True)
                grads = [g.detach() + h - h.detach() for g, h in zip(grads, h_grads, strict=True)]
            if order == "first":
                grads = [g.detach() for g in grads]
            w = {**w, **{n: w[n] - alpha(n, j) * g for n, g in zip(names, grads, strict=True)}}
            points.append(w)
        qx, qy = tasks.query_x[i], tasks.query_y[i]
        if weights is None:
            objective = loss_fn(forward(view(w, steps - 1), qx), qy)
        else:
            objective = sum(
                weights[j] * loss_fn(forward(view(points[j], j), qx), qy) for j in range(steps)
            )
        inputs = [*leaves.values(), *learned.values()]
        grads = torch.autograd.grad(objective, inputs, allow_unused=True, materialize_grads=True)
        for n, g in zip([*leaves, *learned], grads, strict=True):
            (total_p if n in leaves else total_r)[n] += g / TASKS
    return model, tasks, loss_fn, total_p, total_r


def assert_matches(step, model_grads: dict, rate_grads: dict, rtol: float) -> None:
    for n, expected in model_grads.items():
        torch.testing.assert_close(step.grads[n], expected, rtol=rtol, atol=rtol * 1e-3, msg=n)
    assert set(step.update_grads) == set(rate_grads)
    for n, expected in rate_grads.items():
        torch.testing.assert_close(
            step.update_grads[n], expected, rtol=rtol, atol=rtol * 1e-3, msg=n
        )


UPDATES = {
    "fixed": lambda: InnerUpdate(),
    "ANIL": lambda: ANIL(),
    "BOIL": lambda: BOIL(),
    "MetaSGD": lambda: MetaSGD(),
    "PerStepRates": lambda: PerStepRates(),
}
EXACT_RULES = {
    "graph": lambda u, k, h: MAML(0.3, k, hessian_batch=h, inner_update=u),
    "recursion-reverse": lambda u, k, h: MAML(
        0.3, k, hessian_batch=h, backward="recursion", inner_update=u
    ),
    "recursion-forward": lambda u, k, h: MAML(
        0.3, k, hessian_batch=h, backward="recursion", hvp="forward", inner_update=u
    ),
    "hfmaml-forward": lambda u, k, h: HFMAML(
        0.3, k, hessian_batch=h, hvp="forward", inner_update=u
    ),
}


def shuffled_rates(update: InnerUpdate, model: nn.Module, steps: int) -> InnerUpdate:
    """Binds ``update`` and moves its learned tensors away from their equal starting values."""
    update.bind(model, 0.3, steps)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in update.parameters():
            p.copy_(p + 0.05 * torch.rand(p.shape, generator=g, dtype=p.dtype))
    return update


@pytest.mark.parametrize("hessian", ["inner", "independent"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("rule", list(EXACT_RULES))
@pytest.mark.parametrize("update", list(UPDATES))
def test_exact_meta_gradients_on_the_mlp(update, rule, steps, hessian):
    inner = shuffled_rates(UPDATES[update](), mlp(), steps)
    model, tasks, loss_fn, expected_p, expected_r = reference("mlp", inner, steps, hessian=hessian)
    algorithm = EXACT_RULES[rule](inner, steps, hessian)
    step = algorithm.meta_gradient(model, loss_fn, tasks)
    assert_matches(step, expected_p, expected_r, rtol=1e-9)


@pytest.mark.parametrize("rule", list(EXACT_RULES))
def test_learned_step_sizes_on_the_head_only(rule):
    inner = shuffled_rates(MetaSGD(adapt=["2"]), mlp(), 2)
    assert inner.adapted == ["2.weight", "2.bias"]
    model, tasks, loss_fn, expected_p, expected_r = reference("mlp", inner, 2)
    step = EXACT_RULES[rule](inner, 2, "inner").meta_gradient(model, loss_fn, tasks)
    assert_matches(step, expected_p, expected_r, rtol=1e-9)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("rule", ["graph", "recursion-reverse"])
@pytest.mark.parametrize("update", ["fixed", "ANIL", "BOIL", "MetaSGD", "PerStepRates"])
def test_exact_meta_gradients_on_the_conv_net_with_batch_norm(update, rule, steps):
    inner = shuffled_rates(UPDATES[update](), convnet(), steps)
    model, tasks, loss_fn, expected_p, expected_r = reference("conv", inner, steps)
    step = EXACT_RULES[rule](inner, steps, "inner").meta_gradient(model, loss_fn, tasks)
    assert_matches(step, expected_p, expected_r, rtol=1e-9)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("update", list(UPDATES))
def test_first_order_meta_gradients(update, steps):
    # First order: the inner gradients are constants, the step sizes still get their gradient.
    inner = shuffled_rates(UPDATES[update](), mlp(), steps)
    model, tasks, loss_fn, expected_p, expected_r = reference("mlp", inner, steps, order="first")
    step = FOMAML(0.3, steps, inner_update=inner).meta_gradient(model, loss_fn, tasks)
    assert_matches(step, expected_p, expected_r, rtol=1e-10)


@pytest.mark.parametrize("update", ["fixed", "ANIL", "MetaSGD", "PerStepRates"])
def test_finite_differences_converge_to_the_exact_meta_gradient(update):
    inner = shuffled_rates(UPDATES[update](), mlp(), 2)
    model, tasks, loss_fn, expected_p, expected_r = reference("mlp", inner, 2)
    step = HFMAML(0.3, 2, delta_scale=1e-5, inner_update=inner).meta_gradient(model, loss_fn, tasks)
    assert_matches(step, expected_p, expected_r, rtol=1e-7)


@pytest.mark.parametrize(
    ("step", "order", "multi_step"),
    [(2, "first", True), (7, "second", True), (2, "first", False), (7, "second", False)],
)
def test_maml_plus_plus_per_step_batch_norm_and_multi_step_loss(step, order, multi_step):
    # Derivative-order annealing: first order before meta-step 5; the multi-step loss anneals
    # over 10 meta-steps (or is off).
    inner = shuffled_rates(PerStepRates(batch_norm=True), convnet(), 3)
    assert inner.normalized == [
        "features.1.weight",
        "features.1.bias",
        "features.5.weight",
        "features.5.bias",
    ]
    algorithm = MAMLPlusPlus(
        0.3,
        3,
        multi_step_loss_steps=10 if multi_step else 0,
        first_order_steps=5,
        inner_update=inner,
    )
    weights = algorithm.step_weights(step)
    assert (weights is not None) == multi_step
    model, tasks, loss_fn, expected_p, expected_r = reference(
        "conv", inner, 3, order=order, weights=None if weights is None else weights.tolist()
    )
    result = algorithm.meta_gradient(model, loss_fn, tasks, step=step)
    assert_matches(result, expected_p, expected_r, rtol=1e-9)
    # The per-step BatchNorm offsets really are used: they all get a gradient.
    assert all(expected_r[n].abs().sum() > 0 for n in expected_r if n.startswith("bn."))


def test_maml_plus_plus_schedules():
    algorithm = MAMLPlusPlus(0.4, 5, multi_step_loss_steps=100, first_order_steps=50)
    start = algorithm.step_weights(0)
    torch.testing.assert_close(start, torch.full((5,), 0.2))
    middle = algorithm.step_weights(50)
    torch.testing.assert_close(middle[:4], torch.full((4,), 0.1))
    assert middle.sum().item() == pytest.approx(1.0)
    late = algorithm.step_weights(99)
    torch.testing.assert_close(late[:4], torch.full((4,), 0.03 / 5))
    assert algorithm.step_weights(100) is None  # the last step's loss alone
    assert algorithm.step_args(49)[1] is False and algorithm.step_args(50)[1] is True


def test_reptile_moves_towards_the_adapted_parameters():
    inner = InnerUpdate()
    model, tasks, loss_fn = mlp(), mlp_tasks(), mse_loss
    step = Reptile(0.3, 3, inner_update=inner).meta_gradient(model, loss_fn, tasks)
    # Reference: three plain SGD steps per task from the model's parameters.
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(TASKS):
        w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        for _ in range(3):
            loss = mse_loss(mlp_forward(w, tasks.support_x[i]), tasks.support_y[i])
            grads = torch.autograd.grad(loss, list(w.values()))
            w = {
                n: (v - 0.3 * g).detach().requires_grad_()
                for (n, v), g in zip(w.items(), grads, strict=True)
            }
        for n, p in model.named_parameters():
            expected[n] += (p.detach() - w[n].detach()) / TASKS
    for n, value in expected.items():
        torch.testing.assert_close(step.grads[n], value, rtol=1e-12, atol=1e-14)
    assert step.update_grads == {}


def readme_variant() -> type:
    """The example inner update of README.md ("Writing a variant"), run as it is written."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("### Writing a variant", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(block, namespace)
    return namespace["PerTensorRate"]


@pytest.mark.parametrize("rule", ["graph", "recursion-reverse"])
def test_the_readme_variant(rule):
    inner = shuffled_rates(readme_variant()(), mlp(), 2)
    assert {p.shape for p in inner.parameters()} == {torch.Size([])}
    model, tasks, loss_fn, expected_p, expected_r = reference("mlp", inner, 2)
    step = EXACT_RULES[rule](inner, 2, "inner").meta_gradient(model, loss_fn, tasks)
    assert_matches(step, expected_p, expected_r, rtol=1e-9)
    first = reference("mlp", inner, 2, order="first")
    step = FOMAML(0.3, 2, inner_update=inner).meta_gradient(model, loss_fn, tasks)
    assert_matches(step, first[3], first[4], rtol=1e-10)


# -- the updates' own rules -------------------------------------------------------------------


def test_anil_adapts_the_head_and_boil_the_body():
    model = ConvNet(1, 5, 8, 28)
    anil, boil = ANIL(), BOIL()
    anil.bind(model, 0.4, 1)
    boil.bind(model, 0.4, 1)
    assert anil.adapted == ["classifier.weight", "classifier.bias"]
    names = [n for n, _ in model.named_parameters()]
    assert boil.adapted == [n for n in names if not n.startswith("classifier")]
    explicit = ANIL(head=["features.12", "classifier"])
    explicit.bind(model, 0.4, 1)
    assert explicit.adapted == ["features.12.weight", "features.12.bias", *anil.adapted]


def test_an_adapted_parameter_changes_only_where_it_should():
    model, tasks = mlp(), mlp_tasks()
    algorithm = MAML(0.3, 2, inner_update=ANIL())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    algorithm.evaluate(model, mse_loss, tasks)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert algorithm.inner_update.adapted == ["2.weight", "2.bias"]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Reptile(0.1, inner_update=MetaSGD()), "Reptile cannot learn step sizes"),
        (lambda: HFMAML(0.1, inner_update=PerStepRates(batch_norm=True)), "per-step BatchNorm"),
        (lambda: FOMAML(0.1, inner_update=PerStepRates(batch_norm=True)), "per-step BatchNorm"),
        (
            lambda: MAML(0.1, backward="recursion", inner_update=PerStepRates(batch_norm=True)),
            "per-step BatchNorm",
        ),
        (lambda: MAML(0.1, inner_update=ANIL(head=["nowhere"])), r"head=\['nowhere'\]|names no"),
        (
            lambda: MAML(0.1, inner_update=InnerUpdate(freeze=["features", "classifier"])),
            "no parameter",
        ),
        (lambda: MAML(0.1, inner_update=PerStepRates(batch_norm=True)), None),
    ],
    ids=["reptile-metasgd", "hf-bn", "fo-bn", "recursion-bn", "unknown-head", "all-frozen", "ok"],
)
def test_bad_combinations_are_refused_before_training(make, match):
    model = ConvNet(1, 5, 8, 28)
    algorithm = make()
    if match is None:
        MetaLearner(model, algorithm, loss="cross_entropy")
        return
    with pytest.raises(ValueError, match=match):
        MetaLearner(model, algorithm, loss="cross_entropy")


def test_per_step_updates_fix_the_number_of_evaluation_steps():
    with pytest.raises(ValueError, match="eval_inner_steps=2"):
        MetaLearner(MLP(), MAML(0.01, 2, inner_update=PerStepRates()), eval_inner_steps=10)


def test_a_learned_update_serves_one_learner():
    algorithm = MAML(0.01, inner_update=MetaSGD())
    MetaLearner(MLP(), algorithm)
    with pytest.raises(ValueError, match="own inner update"):
        MetaLearner(MLP(), algorithm)
    # Fixed step sizes hold no state: one algorithm can serve several learners.
    shared = MAML(0.01)
    MetaLearner(MLP(), shared)
    MetaLearner(MLP(), shared)


# -- training: learned step sizes are meta-parameters ---------------------------------------


def fit(algorithm, max_steps: int, ckpt_path=None, callbacks=(), **kwargs):
    L.seed_everything(0)
    learner = MetaLearner(
        MLP(hidden=8),
        algorithm,
        meta_optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        **kwargs,
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
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=4), ckpt_path=ckpt_path)
    return learner


@pytest.mark.parametrize(
    "make",
    [
        lambda: MAML(0.05, 2, inner_update=MetaSGD()),
        lambda: FOMAML(0.05, 2, inner_update=PerStepRates()),
        lambda: HFMAML(0.05, 2, inner_update=MetaSGD()),
        lambda: MAMLPlusPlus(
            0.05, 2, multi_step_loss_steps=4, first_order_steps=3, inner_update=PerStepRates()
        ),
    ],
    ids=["MAML-MetaSGD", "FOMAML-PerStepRates", "HFMAML-MetaSGD", "MAMLPlusPlus"],
)
def test_learned_step_sizes_train_and_resume_exactly(make, tmp_path):
    from lightning_maml.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    uninterrupted = fit(make(), 6, callbacks=[checkpoint])
    rates = {n: p.detach() for n, p in uninterrupted.inner_update.named_parameters()}
    assert rates and all(not torch.allclose(v, torch.full_like(v, 0.05)) for v in rates.values())
    saved = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("inner_update.lr.") for k in saved)
    resumed = fit(make(), 6, ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    for (name, a), b in zip(
        uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_learned_step_sizes_are_logged(tmp_path):
    from lightning_maml.callbacks import GradNormMonitor

    L.seed_everything(0)
    learner = MetaLearner(MLP(hidden=8), MAML(0.05, 2, inner_update=PerStepRates()))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[GradNormMonitor()],
        limit_val_batches=0,
    )
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2))
    logged = trainer.callback_metrics
    for name in ("0.weight", "4.bias"):
        assert f"inner_lr/{name}_step_1" in logged
    assert "grad_norm/inner_step_1" in logged and "loss/support_step_0" in logged
