"""Batch normalisation and convolution with short double backwards, for passes whose gradient
is differentiated again (MAML's inner steps).

PyTorch's double backward of batch normalisation (``batchnorm_double_backward``) is a
composite of some seventy small kernels per call, most of them ``mul`` and ``sum`` over the
whole activation; that of a convolution computes its weight term as a convolution with batch
and channels swapped, which oneDNN runs slowly for the small support sets of few-shot tasks.
Here the forward and the first backward are PyTorch's own fused kernels, and the backward of
that backward is written out from its closed form (below), with the kernels that suit it.
:func:`~lightning_maml.functional.differentiated_twice` routes ``F.batch_norm`` and
``F.conv2d`` here (:class:`ShortDoubleBackward`) where they apply: on a CPU (measured there;
accelerators keep PyTorch's path), outside ``torch.func`` transforms and ``torch.compile``,
batch normalisation with batch statistics (no running estimates) and an affine layer, and 2-d
convolution with numeric padding. ``F.max_pool2d`` of a contiguous NCHW input is routed too
(:func:`max_pool2d`): there the CPU's NCHW kernel is the slow part, not the double backward, and
the channels-last kernel computes the same result. Anything else keeps PyTorch's own path.

Batch normalisation, per channel with ``N`` elements, ``s = 1/sqrt(var + eps)``,
``xh = (x - mean) s``, weight ``g``; the first backward of ``y = g xh + b`` is::

    db = sum(dy),  dg = sum(dy xh),  dx = g h,  h = s (dy - mean(dy) - xh mean(dy xh))

With cotangents ``a``, ``u``, ``c`` of ``dx``, ``dg``, ``db`` and ``m = mean(dy xh)``::

    d dy = g s (a - mean(a) - xh mean(a xh)) + u xh + c
    d x  = -g s xh mean(a h) - g s^2 m (a - mean(a) - xh mean(a xh)) - g s mean(a xh) h + u h
    d g  = sum(a h)

(``d x`` uses ``d s / d x_j = -s^2 xh_j / N`` and ``d xh_i / d x_j = s (delta_ij - 1/N -
xh_i xh_j / N)``.)

Convolution ``y = conv(x, w) + b``: its first backward ``dx = conv_x^T(dy; w)``,
``dw = conv_w^T(dy; x)``, ``db = sum(dy)`` is bilinear, so with cotangents ``a``, ``u``, ``c``::

    d dy = conv(a, w) + conv(x, u) + c,   d x = conv_x^T(dy; u),   d w = conv_w^T(dy; a)

where ``conv_x^T`` and ``conv_w^T`` are the input and weight gradients of a convolution
(``convolution_backward``, which has its own oneDNN kernels).

These second derivatives are the last: a meta-gradient of inner gradients needs no third,
and asking for one raises an error rather than return a wrong value.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "ShortDoubleBackward",
    "batch_norm",
    "conv2d",
    "max_pool2d",
    "pytorch_double_backward",
]


def _channel_dims(x: Tensor) -> tuple[list[int], list[int], int]:
    """The dimensions reduced per channel, the broadcast shape of a per-channel vector, and the
    number of elements per channel."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    return dims, shape, x.numel() // x.shape[1]


def _refuse_third_derivative(layer: str, *tensors: Tensor | None) -> None:
    """Raises if a second backward is itself being differentiated: the closed forms are not
    (batch normalisation's treats the batch statistics as constants of x, and would silently
    miss their terms)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"A third derivative of {layer} was asked for inside "
            "lightning_maml.functional.differentiated_twice(), where it is differentiable "
            "twice only. Compute higher derivatives outside that context (the layer is then "
            "PyTorch's own)."
        )


class _BatchNorm(torch.autograd.Function):
    """``native_batch_norm`` in training mode without running estimates; its backward is
    :class:`_BatchNormGrad`, so that the double backward is the closed form above."""

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor, bias: Tensor, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight, _, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dg, db = _BatchNormGrad.apply(dy, x, weight, mean, invstd, ctx.eps)
        return dx, dg, db, None


class _BatchNormGrad(torch.autograd.Function):
    """The first backward, ``(dy, x, g) -> (dx, dg, db)``, by PyTorch's fused kernel; its own
    backward is the closed form of the module docstring."""

    @staticmethod
    def forward(
        dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx, dg, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
        return dx, dg, db

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
        dy, x, weight, mean, invstd, _ = inputs
        _, dg, db = output
        ctx.save_for_backward(dy, x, weight, mean, invstd, dg, db)

    @staticmethod
    def backward(ctx: Any, a: Tensor, u: Tensor, c: Tensor) -> tuple[Tensor | None, ...]:
        dy, x, weight, mean, invstd, dg, db = ctx.saved_tensors
        _refuse_third_derivative("batch normalisation", a, u, c, dy, x, weight)
        dims, shape, n = _channel_dims(x)
        s, g = invstd.view(shape), weight.view(shape)
        xh = (x - mean.view(shape)) * s
        dy_mean, m = (db / n).view(shape), (dg / n).view(shape)
        # h = dx / g, without dividing by a weight that may be zero.
        h = torch.addcmul((dy - dy_mean) * s, xh, m * s, value=-1)
        a_mean = a.mean(dims).view(shape)
        a_xh = (a * xh).mean(dims).view(shape)
        a_h = (a * h).sum(dims)
        gs = g * s
        gs2m = gs * s * m
        d_dy = torch.addcmul(
            torch.addcmul(c.view(shape) - gs * a_mean, xh, u.view(shape) - gs * a_xh), a, gs
        )
        d_x = torch.addcmul(
            torch.addcmul(gs2m * a_mean, xh, gs2m * a_xh - gs * (a_h / n).view(shape)),
            h,
            u.view(shape) - gs * a_xh,
        )
        d_x = torch.addcmul(d_x, a, gs2m, value=-1)
        return d_dy, d_x, a_h, None, None, None


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Training-mode batch normalisation over dimension 1 with the short double backward.

    Args:
        x: The input, ``(N, C, ...)``, any memory format.
        weight: The scale, ``(C,)``.
        bias: The shift, ``(C,)``.
        eps: Added to the variance.

    Returns:
        ``weight * (x - mean) / sqrt(var + eps) + bias`` with the batch's own per-channel mean
        and (biased) variance, as ``F.batch_norm(x, None, None, weight, bias, training=True)``.
    """
    return _BatchNorm.apply(x, weight, bias, eps)[0]


class _Conv2d(torch.autograd.Function):
    """``conv2d``; its backward is :class:`_Conv2dGrad`, so that the double backward is the
    closed form of the module docstring."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, options: tuple) -> Tensor:
        return torch.conv2d(x, weight, bias, *options)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, _, options = inputs
        ctx.save_for_backward(x, weight)
        ctx.options = options

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx, dw, db = _Conv2dGrad.apply(dy, x, weight, ctx.options, ctx.needs_input_grad[:3])
        return dx, dw, db, None


def _conv_backward(dy: Tensor, x: Tensor, weight: Tensor, options: tuple, mask: list[bool]):
    """``convolution_backward``: the input, weight and bias gradients that ``mask`` asks for."""
    stride, padding, dilation, groups = options
    return torch.ops.aten.convolution_backward(
        dy, x, weight, None, stride, padding, dilation, False, [0, 0], groups, mask
    )


class _Conv2dGrad(torch.autograd.Function):
    """The first backward, ``(dy, x, w) -> (dx, dw, db)``, by PyTorch's fused kernel; its own
    backward is the closed form of the module docstring."""

    @staticmethod
    def forward(
        dy: Tensor, x: Tensor, weight: Tensor, options: tuple, mask: tuple[bool, bool, bool]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return _conv_backward(dy, x, weight, options, list(mask))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        dy, x, weight, options, _ = inputs
        ctx.save_for_backward(dy, x, weight)
        ctx.options = options
        # Cotangents that are zero stay None, and their terms are skipped.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(
        ctx: Any, a: Tensor | None, u: Tensor | None, c: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        dy, x, weight = ctx.saved_tensors
        _refuse_third_derivative("a convolution", a, u, c, dy, x, weight)
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        d_dy = d_x = d_w = None
        if need_dy:
            stride, padding, dilation, groups = ctx.options
            terms = []
            if a is not None:
                terms.append(torch.conv2d(a, weight, None, stride, padding, dilation, groups))
            if u is not None:
                terms.append(torch.conv2d(x, u, None, stride, padding, dilation, groups))
            d_dy = terms[0] if terms else torch.zeros_like(dy)
            for term in terms[1:]:
                d_dy = d_dy.add_(term)
            if c is not None:
                d_dy = d_dy + c.view(1, -1, 1, 1)
        if need_x and u is not None:
            d_x = _conv_backward(dy, x, u, ctx.options, [True, False, False])[0]
        if need_w and a is not None:
            d_w = _conv_backward(dy, a, weight, ctx.options, [False, True, False])[1]
        return d_dy, d_x, d_w, None, None


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> Tensor:
    """``F.conv2d`` with the short double backward (numeric padding only).

    Args:
        x: The input, ``(N, C_in, H, W)``.
        weight: The filters, ``(C_out, C_in / groups, kH, kW)``.
        bias: The bias, ``(C_out,)``, or None.
        stride: As ``F.conv2d``'s, two ints.
        padding: As ``F.conv2d``'s, two ints.
        dilation: As ``F.conv2d``'s, two ints.
        groups: As ``F.conv2d``'s.

    Returns:
        ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``.
    """
    options = (_pair(stride), _pair(padding), _pair(dilation), groups)
    return _Conv2d.apply(x, weight, bias, options)


def _pair(value: int | Sequence[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else [int(v) for v in value]


class _MaxPool2d(torch.autograd.Function):
    """``max_pool2d`` of an NCHW input by the channels-last kernel, its result NCHW again.

    The CPU's NCHW max-pool kernel is several times slower than its channels-last one on a
    few-shot support set, more than a layout copy costs, and the passes of
    :func:`~lightning_maml.functional.differentiated_twice` run NCHW. The indices are positions
    within each ``(n, c)`` plane, the same in either layout, and the backward is PyTorch's own
    (``max_pool2d_with_indices_backward``, itself differentiable to any order).
    """

    @staticmethod
    def forward(x: Tensor, options: tuple) -> tuple[Tensor, Tensor]:
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), *options
        )
        return out.contiguous(), indices.contiguous()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        x, options = inputs
        ctx.save_for_backward(x, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.options = options

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        x, indices = ctx.saved_tensors
        dx = torch.ops.aten.max_pool2d_with_indices_backward(dy, x, *ctx.options, indices)
        return dx, None


def max_pool2d(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """``F.max_pool2d`` of a contiguous NCHW input through the channels-last kernel.

    Args:
        x: The input, ``(N, C, H, W)``.
        kernel_size: As ``F.max_pool2d``'s.
        stride: As ``F.max_pool2d``'s (``None`` or empty: the kernel size).
        padding: As ``F.max_pool2d``'s.
        dilation: As ``F.max_pool2d``'s.
        ceil_mode: As ``F.max_pool2d``'s.

    Returns:
        ``F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)``, contiguous NCHW.
    """
    kernel = _pair(kernel_size)
    steps = kernel if stride is None or (not isinstance(stride, int) and not stride) else stride
    options = (kernel, _pair(steps), _pair(padding), _pair(dilation), bool(ceil_mode))
    return _MaxPool2d.apply(x, options)[0]


_PYTORCH = contextvars.ContextVar("pytorch_double_backward", default=False)


@contextlib.contextmanager
def pytorch_double_backward() -> Iterator[None]:
    """Inside, :class:`ShortDoubleBackward` routes nothing: every layer is PyTorch's own.

    For comparisons (``benchmarks/speed.py --double-backward both``) and for telling a suspected
    difference apart; the meta-gradients agree up to rounding either way.
    """
    token = _PYTORCH.set(True)
    try:
        yield
    finally:
        _PYTORCH.reset(token)


class ShortDoubleBackward(TorchFunctionMode):
    """Routes ``F.batch_norm``, ``F.conv2d`` and ``F.max_pool2d`` to :func:`batch_norm`,
    :func:`conv2d` and :func:`max_pool2d` where those compute the same thing.

    That is: on a CPU (where it was measured; accelerators keep PyTorch's path), not under
    ``torch.func`` transforms (a custom autograd function there would need a vmap rule) or
    ``torch.compile``; for batch normalisation, batch statistics (training mode, no running
    estimates), an affine layer and an input with a channel dimension; for a convolution, a
    4-d input and numeric padding; for max-pooling, a contiguous NCHW 4-d input and no indices
    asked for. Other calls run unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.batch_norm or func is torch.conv2d or func is F.max_pool2d) and not (
            torch._C._are_functorch_transforms_active()
            or torch.compiler.is_compiling()
            or _PYTORCH.get()
        ):
            if func is F.batch_norm:
                call = _F_BATCH_NORM.bind(*args, **kwargs)
                call.apply_defaults()
                a = call.arguments
                x, weight, bias = a["input"], a["weight"], a["bias"]
                if (
                    a["training"]
                    and a["running_mean"] is None
                    and a["running_var"] is None
                    and isinstance(weight, Tensor)
                    and isinstance(bias, Tensor)
                    and x.dim() >= 2
                    and x.device.type == "cpu"
                ):
                    return batch_norm(x, weight, bias, a["eps"])
            elif func is F.max_pool2d:
                call = _F_MAX_POOL2D.bind(*args, **kwargs)
                call.apply_defaults()
                a = call.arguments
                x = a.pop("input")
                if (
                    not a.pop("return_indices")
                    and x.dim() == 4
                    and x.device.type == "cpu"
                    # NCHW only: a channels-last input takes the fast kernel already.
                    and x.is_contiguous()
                    and not x.is_contiguous(memory_format=torch.channels_last)
                ):
                    return max_pool2d(x, **a)
            else:
                c = dict(zip(_CONV2D_ARGS, args, strict=False)) | kwargs
                x = c.pop("input")
                if (
                    x.dim() == 4
                    and x.device.type == "cpu"
                    and not isinstance(c.get("padding"), str)
                ):
                    return conv2d(x, **c)
        return func(*args, **kwargs)


#: ``F.batch_norm``'s signature, to read a call's arguments by name.
_F_BATCH_NORM = inspect.signature(F.batch_norm)
#: ``F.max_pool2d``'s parameters, read from its wrapped function (the public one is a
#: dispatcher on ``return_indices`` whose own signature is generic).
_F_MAX_POOL2D = inspect.signature(F.max_pool2d_with_indices)
#: ``F.conv2d``'s parameters in order (a builtin, without a signature to read).
_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
