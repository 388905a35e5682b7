"""MAML by backward recursion (exact Hessian-vector products) against an independent reference.

The reference writes each network out by hand on one flat float64 parameter vector (convolution,
BatchNorm, pooling and the losses as tensor algebra) and forms each Hessian-vector product by a
plain ``torch.autograd`` double backward: it shares no code with the library's torch.func core.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lightning_maml import FOMAML, HFMAML, MAML, TaskBatch
from lightning_maml.functional import EXACT_HVPS, TaskModel, mse_loss
from lightning_maml.losses import LOSSES
from lightning_maml.models import ConvNet

INNER_LR = {"mlp": 0.3, "conv": 0.4}


def make_model(net: str) -> nn.Module:
    torch.manual_seed(0)
    if net == "mlp":
        # Smooth activations, so that the Hessian changes from step to step.
        return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    return ConvNet(in_channels=1, ways=3, hidden=4, image_size=8, blocks=2).double()


def make_tasks(net: str, tasks: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    if net == "mlp":
        x = torch.randn(tasks, 12, 2, generator=g, dtype=torch.float64)
        y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(
            tasks, 12, 1, generator=g, dtype=torch.float64
        )
    else:
        x = torch.randn(tasks, 12, 1, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (tasks, 12), generator=g)
    return TaskBatch(x[:, :4], y[:, :4], x[:, 4:8], y[:, 4:8], x[:, 8:], y[:, 8:])


def unflatten(model: nn.Module, theta: torch.Tensor) -> list[torch.Tensor]:
    chunks, i = [], 0
    for p in model.parameters():
        chunks.append(theta[i : i + p.numel()].view(p.shape))
        i += p.numel()
    return chunks


def flat_loss(net: str, model: nn.Module):
    """f(theta; x, y) for a flat parameter vector theta, written out by hand."""

    def mlp(theta, x, y):
        w1, b1, w2, b2 = unflatten(model, theta)
        prediction = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        return ((prediction - y) ** 2).mean()

    def conv(theta, x, y):
        *blocks, w_out, b_out = unflatten(model, theta)
        h = x
        for i in range(0, len(blocks), 4):
            w, b, gamma, beta = blocks[i : i + 4]
            h = nn.functional.conv2d(h, w, b, padding=1)
            mean = h.mean((0, 2, 3), keepdim=True)
            var = ((h - mean) ** 2).mean((0, 2, 3), keepdim=True)  # biased, as BatchNorm's
            h = (h - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(
                1, -1, 1, 1
            )
            h = nn.functional.max_pool2d(torch.relu(h), 2)
        logits = h.flatten(1) @ w_out.T + b_out
        log_p = logits - torch.logsumexp(logits, 1, keepdim=True)
        return -log_p[torch.arange(len(y)), y].mean()

    return mlp if net == "mlp" else conv


def flat_grad(f, theta, x, y) -> torch.Tensor:
    theta = theta.detach().requires_grad_(True)
    return torch.autograd.grad(f(theta, x, y), theta)[0]


def flat_hvp(f, theta, vector, x, y) -> torch.Tensor:
    """hess f(theta) @ vector: the gradient of <grad f(theta), vector> (double backward)."""
    theta = theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta, x, y), theta, create_graph=True)
    return torch.autograd.grad(g @ vector, theta)[0]


@functools.cache
def reference(net: str, inner_steps: int, hessian_batch: str):
    """Mean over tasks of prod_j (I - alpha H(w_j)) grad f_o(w_k), by torch.autograd alone.

    Also returns each step's mean product norm ||H_j g_{j+1}||, in inner-step order.
    """
    model, tasks, lr = make_model(net), make_tasks(net), INNER_LR[net]
    f = flat_loss(net, model)
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    total, norms = torch.zeros_like(theta0), torch.zeros(inner_steps, dtype=torch.float64)
    for i in range(tasks.num_tasks):
        points, theta = [], theta0
        for _ in range(inner_steps):
            points.append(theta)
            theta = theta - lr * flat_grad(f, theta, tasks.support_x[i], tasks.support_y[i])
        g = flat_grad(f, theta, tasks.query_x[i], tasks.query_y[i])
        split = "hessian" if hessian_batch == "independent" else "support"
        x_h, y_h = getattr(tasks, f"{split}_x")[i], getattr(tasks, f"{split}_y")[i]
        for j in reversed(range(inner_steps)):
            product = flat_hvp(f, points[j], g, x_h, y_h)
            norms[j] += product.norm() / tasks.num_tasks
            g = g - lr * product
        total += g / tasks.num_tasks
    return total, norms


def flat(grads: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n, _ in model.named_parameters()])


def loss_of(net: str):
    return LOSSES["mse" if net == "mlp" else "cross_entropy"]


def exact_variants(inner_steps: int, hessian_batch: str, lr: float):
    variants = {"graph": MAML(lr, inner_steps, hessian_batch)}
    for hvp in EXACT_HVPS:
        variants[f"recursion-{hvp}"] = MAML(
            lr, inner_steps, hessian_batch, backward="recursion", hvp=hvp
        )
        variants[f"hfmaml-{hvp}"] = HFMAML(lr, inner_steps, hessian_batch, hvp=hvp)
    return variants


@pytest.mark.parametrize("inner_steps", [1, 2, 3])
@pytest.mark.parametrize("hessian_batch", ["inner", "independent"])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_exact_variants_match_hessian_reference_float64(net, hessian_batch, inner_steps):
    model, tasks = make_model(net), make_tasks(net)
    expected, _ = reference(net, inner_steps, hessian_batch)
    scale = expected.abs().max()
    for name, algorithm in exact_variants(inner_steps, hessian_batch, INNER_LR[net]).items():
        grads = algorithm.meta_gradient(model, loss_of(net), tasks).grads
        torch.testing.assert_close(
            flat(grads, model),
            expected,
            rtol=1e-9,
            atol=1e-9 * scale,
            msg=lambda m, n=name: f"{n}: {m}",
        )
        if net == "conv":
            # A conv bias before BatchNorm cancels in the normalisation: its true
            # meta-gradient is 0, and the products must not invent one.
            for bias in ("features.0.bias", "features.4.bias"):
                assert grads[bias].abs().max() < 1e-12 * scale


@pytest.mark.parametrize("inner_steps", [1, 3])
@pytest.mark.parametrize("hessian_batch", ["inner", "independent"])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_recursion_matches_double_backward_float32(net, hessian_batch, inner_steps):
    model, tasks = make_model(net).float(), make_tasks(net)
    tasks = TaskBatch(
        **{k: v.float() if v.is_floating_point() else v for k, v in tasks.named_tensors().items()}
    )
    expected, _ = reference(net, inner_steps, hessian_batch)
    variants = exact_variants(inner_steps, hessian_batch, INNER_LR[net])
    results = {
        name: flat(algorithm.meta_gradient(model, loss_of(net), tasks).grads, model)
        for name, algorithm in variants.items()
    }
    tolerance = {"rtol": 1e-5, "atol": 1e-5 * expected.abs().max().item()}
    torch.testing.assert_close(results["graph"].double(), expected, **tolerance)
    for name in set(results) - {"graph"}:
        torch.testing.assert_close(results[name], results["graph"], **tolerance)
        torch.testing.assert_close(results[name].double(), expected, **tolerance)


def test_hessian_terms_matter_here():
    # Guards the reference tests: on these problems the Hessian terms and the two Hessian
    # batches change the meta-gradient well beyond the tolerances used above.
    for net in ("mlp", "conv"):
        model, tasks = make_model(net), make_tasks(net)
        exact, _ = reference(net, 2, "inner")
        independent, _ = reference(net, 2, "independent")
        first = flat(
            FOMAML(INNER_LR[net], 2).meta_gradient(model, loss_of(net), tasks).grads, model
        )
        assert (exact - first).norm() > 1e-2 * exact.norm()
        assert (exact - independent).norm() > 1e-2 * exact.norm()


@pytest.mark.parametrize("hvp", list(EXACT_HVPS))
@pytest.mark.parametrize("hessian_batch", ["inner", "independent"])
def test_hfmaml_exact_reports_exact_product_norms(hessian_batch, hvp):
    model, tasks = make_model("mlp"), make_tasks("mlp")
    result = HFMAML(0.3, 3, hessian_batch, hvp=hvp).meta_gradient(model, mse_loss, tasks)
    _, norms = reference("mlp", 3, hessian_batch)
    assert "hfmaml/delta" not in result.stats  # no finite difference, no step
    # Per-task norms averaged over tasks, in inner-step order j = 0 .. k-1.
    torch.testing.assert_close(result.stats["hfmaml/hvp_norm"], norms, rtol=1e-9, atol=0)


@pytest.mark.parametrize("hvp", list(EXACT_HVPS))
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_recursion_under_vmap_chunks_equals_per_task_loop(net, hvp):
    # A chunk of one task runs through torch.autograd, larger ones through vmap (torch.func).
    model, tasks = make_model(net), make_tasks(net, tasks=4)
    algorithm = MAML(INNER_LR[net], 2, "independent", backward="recursion", hvp=hvp)
    results = {}
    for size in [None, 3, 1]:
        algorithm.task_chunk_size = size
        results[size] = algorithm.meta_gradient(model, loss_of(net), tasks)
    for size in [3, 1]:
        torch.testing.assert_close(results[size].grads, results[None].grads, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(results[size].task_losses, results[None].task_losses)


@pytest.mark.parametrize("hvp", list(EXACT_HVPS))
def test_exact_hvp_keeps_the_parameters_precision_under_autocast(hvp):
    model, tasks = make_model("conv").float(), make_tasks("conv")
    task = TaskModel(model, LOSSES["cross_entropy"])
    params = task.params()
    vector = {n: torch.randn_like(p) for n, p in params.items()}
    x, y = tasks.support_x[0].float(), tasks.support_y[0]
    plain = EXACT_HVPS[hvp](task, params, vector, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = EXACT_HVPS[hvp](task, params, vector, x, y)
        # Autocast is on here: the forward pass itself runs in bfloat16.
        assert task.predict(params, x).dtype == torch.bfloat16
    for name, product in plain.items():
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], product, rtol=0, atol=0)


@pytest.mark.parametrize(
    "algorithm",
    [MAML(0.3, 3, backward="recursion"), MAML(0.3, 3, backward="recursion", hvp="forward")],
    ids=repr,
)
def test_recursion_under_bf16_autocast_stays_close_to_float32(algorithm):
    model, tasks = make_model("mlp").float(), make_tasks("mlp", tasks=4).to(torch.float32)
    exact = flat(algorithm.meta_gradient(model, mse_loss, tasks).grads, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = flat(algorithm.meta_gradient(model, mse_loss, tasks).grads, model)
    assert mixed.dtype == torch.float32
    # bf16 keeps 8 mantissa bits; the inner steps and the outer gradient run in it, the
    # products not (measured error: 0.5%; the double backward's under bf16: 0.7%).
    assert (mixed - exact).norm() < 0.05 * exact.norm()


def test_loss_without_forward_mode_gets_a_clear_error():
    model, tasks = make_model("mlp"), make_tasks("mlp")
    forward = MAML(0.3, backward="recursion", hvp="forward")
    with pytest.raises(RuntimeError, match="does not support forward-mode differentiation"):
        forward.meta_gradient(model, nn.functional.mse_loss, tasks)
    # The double backward has no such restriction.
    MAML(0.3, backward="recursion").meta_gradient(model, nn.functional.mse_loss, tasks)


def test_mse_loss_equals_torch_and_refuses_broadcasting():
    prediction, target = torch.randn(5, 1), torch.randn(5, 1)
    torch.testing.assert_close(
        mse_loss(prediction, target), nn.functional.mse_loss(prediction, target)
    )
    with pytest.raises(ValueError, match="give the targets the model's output shape"):
        mse_loss(prediction, target.squeeze(1))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MAML(0.1, backward="forward"), "MAML backward must be 'graph'"),
        (lambda: MAML(0.1, backward="recursion", hvp="exact"), "MAML hvp must be 'reverse'"),
        (lambda: MAML(0.1, hvp="forward"), "set backward='recursion' too"),
        (lambda: HFMAML(0.1, hvp="exact"), "HFMAML hvp must be 'finite_difference', 'reverse'"),
        (lambda: HFMAML(0.1, hvp="reverse", delta=0.01), "takes no delta, rho or delta_scale"),
        (lambda: HFMAML(0.1, hvp="forward", delta_scale=0.1), "takes no delta, rho or delta_scale"),
    ],
)
def test_bad_options_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_options_round_trip_through_hparams():
    for algorithm in (
        MAML(0.1, 2, backward="recursion", hvp="forward"),
        HFMAML(0.1, 2, hvp="reverse"),
        HFMAML(0.1, 2),
    ):
        hparams = algorithm.hparams()
        settings = {k: v for k, v in hparams.items() if k not in ("variant", "inner_update")}
        update = type(algorithm.inner_update)(**hparams["inner_update"]["init_args"])
        rebuilt = type(algorithm)(**settings, inner_update=update)
        assert rebuilt.hparams() == hparams


@pytest.mark.parametrize("hvp", list(EXACT_HVPS))
def test_exact_hvp_where_the_gradient_is_constant(hvp):
    # The mean output of a linear model: its gradient does not depend on the parameters, so
    # the Hessian is zero (the double backward has no graph to differentiate).
    model = nn.Linear(3, 2).double()
    task = TaskModel(model, lambda prediction, target: prediction.mean())
    x = torch.randn(5, 3, dtype=torch.float64)
    params = task.params()
    vector = {n: torch.randn_like(p) for n, p in params.items()}
    product = EXACT_HVPS[hvp](task, params, vector, x, torch.zeros(5))
    for name, p in params.items():
        torch.testing.assert_close(product[name], torch.zeros_like(p), rtol=0, atol=0)
