"""The conv net's faster CPU forms (pool before ReLU, channels-last) against the plain one.

The reference is the conv net as Finn et al. write it, ``conv - BatchNorm - ReLU - maxpool``,
NCHW, with the same parameters, in float64: outputs, gradients and second-order gradients
(MAML's) must agree whichever layout the model picks, per task and under ``vmap``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_maml import FOMAML, MAML, TaskBatch
from lightning_maml.models import ConvNet


def plain_reference(model: ConvNet) -> nn.Module:
    """The same parameters in the plain block order, NCHW."""
    layers: list[nn.Module] = []
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    for conv, norm in zip(convs, norms, strict=True):
        layers += [conv, norm, nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), model.classifier)


def net(channels_last: bool, in_channels: int = 1) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(in_channels, 3, 4, 12, blocks=3, channels_last=channels_last).double()


def images(n: int = 6, in_channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, in_channels, 12, 12, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_and_gradients_equal_the_plain_net(channels_last, in_channels):
    model = net(channels_last, in_channels)
    assert model.uses_channels_last(images(in_channels=in_channels)) is channels_last
    reference = plain_reference(model)
    x, y = images(in_channels=in_channels), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(model(x), reference(x))
    params = dict(model.named_parameters())

    def loss(p, module, names):
        out = functional_call(module, {names[n]: t for n, t in p.items()}, (x,))
        return nn.functional.cross_entropy(out, y)

    ours = {n: n for n in params}
    # The reference Sequential names its modules anew: map by object identity.
    by_id = {id(m): name for name, m in reference.named_modules()}
    theirs = {}
    for name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            theirs[f"{name}.{p_name}"] = f"{by_id[id(module)]}.{p_name}"

    g_ours = torch.autograd.grad(loss(params, model, ours), list(params.values()))
    g_ref = torch.autograd.grad(loss(params, reference, theirs), list(params.values()))
    torch.testing.assert_close(g_ours, g_ref)


def test_channels_last_is_taken_per_task_on_cpu_only_outside_vmap():
    model = net(True)
    seen = []

    def record(module, inputs, output):
        seen.append(model.uses_channels_last(inputs[0]))
        if not torch._C._are_functorch_transforms_active():
            seen.append(output.is_contiguous(memory_format=torch.channels_last))

    model.features[0].register_forward_hook(record)
    model(images())
    assert seen == [True, True]
    seen.clear()
    vmap(model)(images().unsqueeze(0).expand(2, -1, -1, -1, -1))
    assert seen == [False]
    assert not model.uses_channels_last(torch.zeros(2, 1, 12, 12, device="meta"))


def conv_tasks() -> TaskBatch:
    x = images(2 * 12).reshape(2, 12, 1, 12, 12)
    y = torch.arange(3).repeat(4).expand(2, -1)
    return TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])


@pytest.mark.parametrize("algorithm", [MAML, FOMAML])
@pytest.mark.parametrize("chunk", ["auto", None])
def test_meta_gradients_equal_the_plain_net(algorithm, chunk):
    # "auto" runs task by task (channels-last on a CPU), None one vmap call (NCHW).
    tasks = conv_tasks()
    results = []
    for channels_last in (True, False):
        model = net(channels_last)
        meta = algorithm(0.1, inner_steps=2, task_chunk_size=chunk)
        meta.bind(model)
        step = meta.meta_gradient(model, nn.functional.cross_entropy, tasks)
        results.append(step.grads)
    reference = net(False)
    plain = plain_reference(reference)
    names = dict(
        zip(dict(reference.named_parameters()), dict(plain.named_parameters()), strict=True)
    )
    inner_lr, first_order = 0.1, algorithm is FOMAML

    def task_loss(p, i):
        def f(q, x, y):
            return nn.functional.cross_entropy(functional_call(plain, q, (x,)), y)

        q = {names[n]: t for n, t in p.items()}
        for _ in range(2):
            g = grad(f)(q, tasks.support_x[i], tasks.support_y[i])
            q = {n: q[n] - inner_lr * (g[n].detach() if first_order else g[n]) for n in q}
        return f(q, tasks.query_x[i], tasks.query_y[i])

    params = {n: p.detach() for n, p in reference.named_parameters()}
    expected = grad(lambda p: sum(task_loss(p, i) for i in range(2)) / 2)(params)
    for grads in results:
        for n, g in expected.items():
            torch.testing.assert_close(grads[n], g, msg=n)


@pytest.mark.parametrize(("algorithm", "inner_layout"), [(MAML, False), (FOMAML, True)])
def test_layout_per_pass_of_a_meta_step(algorithm, inner_layout):
    # MAML differentiates its inner steps twice: NCHW there; its query pass, and all of
    # FO-MAML's passes, channels-last.
    model, seen = net(True), []
    model.features[0].register_forward_hook(
        lambda m, i, o: seen.append(
            (i[0].shape[0], o.is_contiguous(memory_format=torch.channels_last))
        )
    )
    meta = algorithm(0.1, inner_steps=2)
    meta.bind(model)
    t = conv_tasks()
    one = TaskBatch(t.support_x[:1], t.support_y[:1], t.query_x[:1], t.query_y[:1])
    meta.meta_gradient(model, nn.functional.cross_entropy, one)
    assert seen == [(3, inner_layout), (3, inner_layout), (9, True)]
