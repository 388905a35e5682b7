"""Batch normalisation and convolution with closed-form double backwards, and max-pooling through
the channels-last kernel, against torch.autograd.

The reference is ``F.batch_norm``, ``F.conv2d`` and ``F.max_pool2d`` differentiated twice by
PyTorch itself, in float64, and torch.autograd's numerical checks of the first and second derivatives.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn import functional as F

from lightning_maml.double_backward import (
    ShortDoubleBackward,
    batch_norm,
    conv2d,
    max_pool2d,
    pytorch_double_backward,
)
from lightning_maml.functional import differentiated_twice

SHAPES = [(3, 4, 5, 5), (6, 3), (2, 3, 4), (1, 2, 3, 3)]


def inputs(shape, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()


def native(x, weight, bias):
    return F.batch_norm(x, None, None, weight, bias, training=True)


def second_order(fn, x, weight, bias):
    """Gradients of a function of the first gradients (which use every output of the first
    backward, with cotangents that depend on all three inputs)."""
    g = torch.Generator().manual_seed(7)
    r = torch.randn(x.shape, generator=g, dtype=x.dtype)
    s = torch.randn(x.shape, generator=g, dtype=x.dtype)
    y = fn(x, weight, bias)
    gx, gw, gb = torch.autograd.grad(
        (y * r).sum() + (y**2 * bias.view(1, -1, *[1] * (x.dim() - 2))).sum(),
        (x, weight, bias),
        create_graph=True,
    )
    outer = (gx * s).sum() + (gw**2).sum() + (gb * gw * weight).sum() + (gx**2 * x).sum()
    return torch.autograd.grad(outer, (x, weight, bias))


@pytest.mark.parametrize(
    ("shape", "channels_last"), [(s, False) for s in SHAPES] + [((3, 4, 5, 5), True)]
)
def test_values_and_first_and_second_derivatives_equal_pytorchs(shape, channels_last):
    x, weight, bias = inputs(shape, channels_last)
    torch.testing.assert_close(batch_norm(x, weight, bias), native(x, weight, bias))
    ours = second_order(batch_norm, x, weight, bias)
    theirs = second_order(native, x, weight, bias)
    for name, a, b in zip(("x", "weight", "bias"), ours, theirs, strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("shape", [(3, 2, 3, 3), (5, 3)])
def test_numerical_gradient_and_gradgrad_checks(shape):
    x, weight, bias = inputs(shape, seed=3)
    assert torch.autograd.gradcheck(batch_norm, (x, weight, bias))
    assert torch.autograd.gradgradcheck(batch_norm, (x, weight, bias))


def test_a_third_derivative_raises_instead_of_being_wrong():
    x, weight, bias = inputs((3, 2, 3, 3))
    y = batch_norm(x, weight, bias)
    (gx,) = torch.autograd.grad((y**3).sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative of batch normalisation"):
        torch.autograd.grad((gx**2).sum(), (x,), create_graph=True)
    # Without create_graph the second derivative is taken as usual.
    (ggx,) = torch.autograd.grad((gx**2).sum(), (x,))
    assert torch.isfinite(ggx).all()


def routing_spy(layer, node: str, routed: list[bool]) -> ShortDoubleBackward:
    """The mode, recording for each call of ``layer`` whether its output came from ``node``."""

    class Spy(ShortDoubleBackward):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = super().__torch_function__(func, types, args, kwargs)
            if func is layer:
                routed.append(out.grad_fn is not None and node in out.grad_fn.name())
            return out

    return Spy()


def test_the_mode_routes_only_the_batch_norms_it_computes_alike():
    x, weight, bias = inputs((4, 3, 2, 2))
    routed: list[bool] = []
    running_mean, running_var = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
    with routing_spy(F.batch_norm, "_BatchNorm", routed):
        F.batch_norm(x, None, None, weight, bias, training=True)  # routed
        F.batch_norm(x, None, None, None, None, training=True)  # no affine layer
        F.batch_norm(x, running_mean, running_var, weight, bias, training=True)  # estimates
        F.batch_norm(x, running_mean, running_var, weight, bias, training=False)  # eval
        vmap(lambda t: F.batch_norm(t, None, None, weight, bias, training=True))(x.unsqueeze(0))
        meta = [t.detach().to("meta").requires_grad_() for t in (x, weight, bias)]
        F.batch_norm(meta[0], None, None, meta[1], meta[2], training=True)  # not a CPU
    assert routed == [True, False, False, False, False, False]


def test_differentiated_twice_routes_a_models_layers_and_gets_maml_right():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False))
    model.double()
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def inner_loss(p):
        return torch.func.functional_call(model, p, (x,)).pow(2).mean()

    def maml(p):
        g = grad(inner_loss)(p)
        return inner_loss({n: p[n] - 0.1 * g[n] for n in p})

    expected = grad(maml)(params)  # torch.func, PyTorch's own double backward
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    with differentiated_twice():
        out = torch.func.functional_call(model, leaves, (x,))
        assert "_BatchNorm" in out.grad_fn.name()
        assert "_Conv2d" in out.grad_fn.next_functions[0][0].name()
        g = torch.autograd.grad(out.pow(2).mean(), list(leaves.values()), create_graph=True)
        adapted = {n: leaves[n] - 0.1 * gn for n, gn in zip(leaves, g, strict=True)}
    got = torch.autograd.grad(inner_loss(adapted), list(leaves.values()))
    for (name, e), o in zip(expected.items(), got, strict=True):
        torch.testing.assert_close(o, e, msg=name)


CONVS = [
    # in channels, stride, padding, dilation, groups, bias
    (1, 1, 1, 1, 1, True),
    (4, 1, 1, 1, 1, True),
    (4, 2, 0, 1, 1, False),
    (4, 1, 2, 2, 2, True),
    (4, 2, 1, 1, 1, True),
]


def conv_inputs(cin, groups, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, cin, 7, 7, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(6, cin // groups, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize(("cin", "stride", "padding", "dilation", "groups", "bias"), CONVS)
def test_conv_first_and_second_derivatives_equal_pytorchs(
    cin, stride, padding, dilation, groups, bias
):
    x, w, b = conv_inputs(cin, groups, bias)
    leaves = (x, w) if b is None else (x, w, b)
    options = (stride, padding, dilation, groups)

    def second(layer):
        y = layer(x, w, b, *options)
        first = torch.autograd.grad(
            (y**2 * y.detach()).sum() + (y * x.sum()).sum(), leaves, create_graph=True
        )
        outer = sum((g**2).sum() for g in first) + (first[1] * w).sum()
        return torch.autograd.grad(outer, leaves)

    torch.testing.assert_close(conv2d(x, w, b, *options), F.conv2d(x, w, b, *options))
    for ours, theirs in zip(second(conv2d), second(F.conv2d), strict=True):
        torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradgradcheck(
        lambda x, w, *b: conv2d(x, w, *(b or [None]), *options), leaves
    )


def test_conv_of_an_input_without_gradient_and_the_third_derivative():
    # A first layer's input (images) needs no gradient: its terms are skipped, not zero-filled.
    _, w, b = conv_inputs(1, 1, True)
    x = torch.randn(3, 1, 7, 7, dtype=torch.float64)
    y = conv2d(x, w, b, 1, 1)
    gw, gb = torch.autograd.grad((y**2).sum(), (w, b), create_graph=True)
    ours = torch.autograd.grad((gw**2).sum() + gb.sum(), (w, b))
    y = F.conv2d(x, w, b, 1, 1)
    gw, gb = torch.autograd.grad((y**2).sum(), (w, b), create_graph=True)
    theirs = torch.autograd.grad((gw**2).sum() + gb.sum(), (w, b))
    for a, c in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, c)
    y = conv2d(x, w, b, 1, 1)
    (gw,) = torch.autograd.grad((y**3).sum(), (w,), create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative of a convolution"):
        torch.autograd.grad((gw**2).sum(), (w,), create_graph=True)


def test_the_mode_routes_only_the_convolutions_it_computes_alike():
    x, w, b = conv_inputs(4, 1, True)
    seen: list[bool] = []
    with routing_spy(torch.conv2d, "_Conv2d", seen):
        nn.functional.conv2d(x, w, b, padding=1)  # routed
        nn.functional.conv2d(x, w, b, padding="same")  # string padding
        nn.functional.conv2d(x[0], w, b, padding=1)  # unbatched
        vmap(lambda t: nn.functional.conv2d(t, w, b, padding=1))(x.unsqueeze(0))
        meta = [t.detach().to("meta").requires_grad_() for t in (x, w, b)]
        nn.functional.conv2d(*meta, padding=1)  # not a CPU
    assert seen == [True, False, False, False, False]


def test_pytorch_double_backward_turns_the_routing_off_and_gives_the_same_meta_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten()
    ).double()
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]

    def meta_gradient():
        leaves = [p.detach().clone().requires_grad_() for p in model.parameters()]

        def loss(params):
            out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))
            return out.pow(2).mean()

        with differentiated_twice():
            out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
            kind = out.grad_fn.next_functions[0][0].name()
            g = torch.autograd.grad(out.pow(2).mean(), leaves, create_graph=True)
        adapted = [p - 0.1 * gp for p, gp in zip(leaves, g, strict=True)]
        return kind, torch.autograd.grad(loss(adapted), leaves)

    short_kind, short = meta_gradient()
    with pytorch_double_backward():
        torch_kind, theirs = meta_gradient()
    assert "_BatchNorm" in short_kind and "_BatchNorm" not in torch_kind
    for a, b in zip(short, theirs, strict=True):
        torch.testing.assert_close(a, b)


POOLS = [
    # shape, kernel_size, stride, padding, dilation, ceil_mode
    ((3, 4, 8, 8), 2, None, 0, 1, False),
    ((2, 3, 7, 7), 2, None, 0, 1, False),  # odd: the last row and column are dropped
    ((2, 3, 7, 7), 2, None, 0, 1, True),
    ((2, 3, 9, 8), (3, 2), (2, 1), (1, 0), 1, False),
    ((2, 3, 9, 9), 3, 2, 1, 2, False),
    ((1, 1, 6, 6), 2, [], 0, 1, False),  # an empty stride is the kernel size
]


@pytest.mark.parametrize(("shape", "kernel", "stride", "padding", "dilation", "ceil"), POOLS)
def test_max_pool_values_and_derivatives_equal_pytorchs(
    shape, kernel, stride, padding, dilation, ceil
):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    options = (kernel, stride, padding, dilation, ceil)
    torch_stride = None if stride == [] else stride

    def second(layer, *options):
        y = layer(x, *options)
        (first,) = torch.autograd.grad((y**3).sum(), (x,), create_graph=True)
        return y, first, torch.autograd.grad((first**2 * x).sum(), (x,))[0]

    ours = second(max_pool2d, *options)
    theirs = second(F.max_pool2d, kernel, torch_stride, padding, dilation, ceil)
    assert ours[0].is_contiguous()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.autograd.gradgradcheck(lambda t: max_pool2d(t, *options), (x,))


def test_the_mode_routes_only_the_nchw_max_pools():
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    seen: list[bool] = []
    with routing_spy(F.max_pool2d, "_MaxPool2d", seen):
        F.max_pool2d(x, 2)  # routed
        nn.MaxPool2d(2, stride=2)(x)  # routed, through the module
        # Asking for the indices calls F.max_pool2d_with_indices, which is not routed.
        assert "_MaxPool2d" not in F.max_pool2d(x, 2, return_indices=True)[0].grad_fn.name()
        F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2)  # fast already
        F.max_pool2d(x[0], 2)  # unbatched
        F.max_pool2d(x.transpose(2, 3), 2)  # not contiguous
        vmap(lambda t: F.max_pool2d(t, 2))(x.unsqueeze(0))
        F.max_pool2d(x.detach().to("meta").requires_grad_(), 2)  # not a CPU
        with pytorch_double_backward():
            F.max_pool2d(x, 2)
    assert seen == [True, True, False, False, False, False, False, False]
