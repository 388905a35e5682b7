"""The functional core: a task's loss, inner-loop adaptation and Hessian-vector products.

Everything here is a pure function of a parameter dictionary, built on :mod:`torch.func`
(``functional_call``, ``grad``, ``jvp``, ``vmap``); no module is cloned or modified. Whether the
inner loop is differentiated through (MAML's default) or not (FO-MAML, HF-MAML, MAML by
recursion, evaluation) depends only on whether the caller wraps it in an outer
``torch.func.grad``: the same code serves both.

The meta-gradient of ``k`` inner steps ``w_{j+1} = w_j - alpha grad f_in(w_j)`` is
``prod_j (I - alpha H_j) v`` with ``v`` the outer gradient at ``w_k``. Differentiating through
the loop forms it by a double backward and keeps every step's second-order graph alive;
:func:`backward_recursion` forms it step by step along the stored points ``w_j``, with a
Hessian-vector product rule of the caller's choice (:func:`reverse_hvp` or :func:`forward_hvp`,
exact, or :func:`finite_difference_hvp` and :func:`gaussian_smoothing_hvp`, approximate) and no
graph kept between steps.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_maml.double_backward import ShortDoubleBackward

__all__ = [
    "EXACT_HVPS",
    "HvpRule",
    "Params",
    "TaskModel",
    "Trajectory",
    "backward_recursion",
    "differentiated_twice",
    "finite_difference_hvp",
    "forward_hvp",
    "gaussian_smoothing_hvp",
    "gradient_and_value",
    "is_differentiated_twice",
    "map_tasks",
    "mse_loss",
    "pullback",
    "reverse_hvp",
    "tree_norm",
]

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``hvp(w, v)``: the product of the Hessian at ``w`` (of a loss the rule knows) with ``v``.
HvpRule = Callable[[Params, Params], Params]

_DIFFERENTIATED_TWICE = contextvars.ContextVar("differentiated_twice", default=False)


@contextlib.contextmanager
def differentiated_twice() -> Iterator[None]:
    """Marks the forward passes inside as ones whose gradient will be differentiated again.

    :meth:`TaskModel.adapt` sets it for the inner steps that an outer gradient differentiates
    through (MAML). A model may choose its memory layout by it
    (:class:`~lightning_maml.models.ConvNet` stays NCHW there); values do not depend on it.
    """
    token = _DIFFERENTIATED_TWICE.set(True)
    try:
        with ShortDoubleBackward():
            yield
    finally:
        _DIFFERENTIATED_TWICE.reset(token)


def is_differentiated_twice() -> bool:
    """Whether the current forward pass is inside :func:`differentiated_twice`."""
    return _DIFFERENTIATED_TWICE.get()


def mse_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """The mean squared error ``mean((prediction - target)^2)``, as ``F.mse_loss`` computes it.

    Written out because ``F.mse_loss`` fails under forward-over-reverse differentiation in
    torch 2.13 ("ZeroTensors are immutable"), which :func:`forward_hvp` uses.

    Raises:
        ValueError: If the shapes differ (``F.mse_loss`` would only warn and broadcast, which
            pairs every prediction with every target).
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"mse_loss got predictions of shape {tuple(prediction.shape)} and targets of shape "
            f"{tuple(target.shape)}: give the targets the model's output shape (for one output, "
            "targets shaped (examples, 1))."
        )
    return (prediction - target).square().mean()


def tree_norm(tree: Params) -> Tensor:
    """The Euclidean norm of all tensors of a parameter dictionary taken as one vector."""
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t) for t in tree.values()])
    )


def gradient_and_value(
    fn: Callable, params: Params | tuple[Params, ...], *args: Tensor, has_aux: bool = False
) -> tuple[Any, Any]:
    """``torch.func.grad_and_value(fn, has_aux=has_aux)(params, *args)``, lighter when it can be.

    ``params`` is a parameter dictionary or a tuple of them (the model's parameters and the
    inner update's learned tensors, say, which may be none); the gradient has its structure.

    torch.func differentiates with ``create_graph=True``, so that an enclosing transform can
    differentiate the gradient again: every activation stays alive and the backward pass is
    recorded until the gradient returns. Outside any torch.func transform (a per-task loop),
    plain ``torch.autograd.grad`` gives the same gradient: a first-order one frees each
    activation as soon as the backward pass has used it, and one that a torch.autograd
    computation will differentiate again (``params`` require grad: MAML's inner steps under
    this function) keeps the graph that it needs, as any double backward does.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return grad_and_value(fn, has_aux=has_aux)(params, *args)
    leaves, spec = tree_flatten(params)
    nested = any(p.requires_grad for p in leaves)
    with torch.enable_grad():
        if not nested:
            leaves = [p.detach().requires_grad_() for p in leaves]
        out = fn(tree_unflatten(leaves, spec), *args)
        grads = torch.autograd.grad(
            out[0] if has_aux else out,
            leaves,
            create_graph=nested,
            allow_unused=True,
            materialize_grads=True,
        )
    if not nested:
        out = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
    return tree_unflatten(list(grads), spec), out


def pullback(fn: Callable[[Params], object], primals: Params, cotangents: object) -> Params:
    """The vector-Jacobian product of ``fn`` at ``primals`` with ``cotangents``.

    ``torch.func.vjp``, extended to an empty ``primals`` (nothing learned), whose gradient is
    empty: the one place where the inner update's learned tensors may be none.
    """
    if not primals:
        return {}
    _, pull = vjp(fn, primals)  # type: ignore[misc]  # torch.func.vjp's return type ignores has_aux=False
    return pull(cotangents)[0]


def axpy(alpha: Tensor | float, x: Params, y: Params) -> Params:
    """``y + alpha * x`` for parameter dictionaries."""
    return {name: y[name] + alpha * x[name] for name in y}


@dataclass
class Trajectory:
    """What the inner loop passed through: one entry per inner step ``j = 0 .. k-1``.

    Attributes:
        points: The parameters ``w_j`` at which each inner gradient was taken (kept only when
            asked for: the backward recursion needs them).
        grads: The inner gradients ``grad f_in(w_j)`` of the adapted parameters, detached (kept
            only when asked for: the gradient of learned step sizes needs them).
        losses: The support loss ``f_in(w_j)`` at each step.
        grad_norms: The inner-gradient norm ``||grad f_in(w_j)||`` at each step.
    """

    points: list[Params] = field(default_factory=list)
    grads: list[Params] = field(default_factory=list)
    losses: list[Tensor] = field(default_factory=list)
    grad_norms: list[Tensor] = field(default_factory=list)


class TaskModel:
    """A model, its buffers and a loss, seen as pure functions of a parameter dictionary.

    Args:
        model: Any module whose forward is a pure function of its parameters and input
            (BatchNorm only with ``track_running_stats=False``).
        loss_fn: ``loss_fn(prediction, target) -> scalar``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.buffers = {name: b.detach() for name, b in model.named_buffers()}

    def params(self) -> Params:
        """The model's trainable parameters, detached (torch.func tracks its own gradients)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def predict(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, {**self.buffers, **params}, (x,))

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self.predict(params, x), y)

    def loss_and_prediction(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        prediction = self.predict(params, x)
        return self.loss_fn(prediction, y), prediction

    def adapt(
        self,
        params: Params,
        x: Tensor,
        y: Tensor,
        step_sizes: Sequence[Mapping[str, Tensor | float]],
        hessian_data: tuple[Tensor, Tensor] | None = None,
        keep_points: bool = False,
        keep_grads: bool = False,
        params_at: Callable[[int, Params], Params] | None = None,
        first_order: bool = False,
    ) -> tuple[Params, Trajectory]:
        """Runs one step of gradient descent on one task's support set per entry of ``step_sizes``.

        ``w_{j+1}[n] = w_j[n] - alpha_j[n] * grad_n f_in(w_j)`` for the parameters ``n`` that
        ``alpha_j = step_sizes[j]`` names; the others keep their value (and the inner gradient
        is taken for the named ones only). Under an outer ``torch.func.grad`` the result stays
        differentiable with respect to ``params`` and the step sizes (MAML).

        Args:
            params: The starting point ``w_0``.
            x: Support inputs of one task.
            y: Support targets of one task.
            step_sizes: ``alpha_j`` for each inner step ``j`` (an
                :class:`~lightning_maml.inner.InnerUpdate` makes them).
            hessian_data: ``(x_h, y_h)`` of the task's Hessian set. When given, each step keeps
                the value ``-alpha_j * grad f_in(w_j)`` but takes its derivative from
                ``grad f_h``, so that differentiating through the loop yields
                ``prod_j (I - alpha_j hess f_h(w_j))``: the paper's independent estimator.
            keep_points: Keep every ``w_j`` in the trajectory.
            keep_grads: Keep every inner gradient in the trajectory.
            params_at: ``params_at(j, w)``, the parameters the model computes with at step
                ``j`` (per-step BatchNorm weights, say); by default ``w`` itself.
            first_order: Detach each inner gradient before the step, so that an enclosing
                ``torch.func.grad`` does not differentiate through it (no Hessian terms).

        Returns:
            The adapted parameters ``w_k`` and the trajectory, in the parameters' precision
            (mixed-precision autocast is off inside).
        """
        trajectory = Trajectory()
        # The inner loop runs in the parameters' precision even under mixed-precision
        # autocast: bf16 inner gradients move w_k enough to turn the conv net's meta-gradient
        # (cosine 0.98 to fp32's on Omniglot), and the support set is the small part of the work.
        # Under an outer torch.autograd gradient (the per-task path) the parameters require
        # grad; unless detached, each inner gradient is then differentiated again.
        # (Not traced by torch.compile, under which ConvNet stays NCHW anyway.)
        twice = (
            not first_order
            and not torch.compiler.is_compiling()
            and any(p.requires_grad for p in params.values())
        )
        layout = differentiated_twice() if twice else contextlib.nullcontext()
        with torch.autocast(x.device.type, enabled=False), layout:
            for j, alpha in enumerate(step_sizes):

                def adapted_loss(
                    part: Params, x: Tensor, y: Tensor, params: Params = params, j: int = j
                ) -> Tensor:
                    merged = {**params, **part}
                    return self.loss(merged if params_at is None else params_at(j, merged), x, y)

                part = {n: params[n] for n in alpha}
                grads, loss = gradient_and_value(adapted_loss, part, x, y)
                trajectory.grad_norms.append(tree_norm(grads).detach())
                trajectory.losses.append(loss.detach())
                if keep_grads:
                    trajectory.grads.append({n: g.detach() for n, g in grads.items()})
                if hessian_data is not None:
                    hess_grads, _ = gradient_and_value(adapted_loss, part, *hessian_data)
                    # Value of grads, derivative of hess_grads (their difference is exactly zero).
                    grads = {
                        n: g.detach() + hess_grads[n] - hess_grads[n].detach()
                        for n, g in grads.items()
                    }
                if first_order:
                    grads = {n: g.detach() for n, g in grads.items()}
                if keep_points:
                    trajectory.points.append(params)
                params = {**params, **{n: params[n] - alpha[n] * grads[n] for n in alpha}}
        return params, trajectory


def finite_difference_hvp(
    task: TaskModel, params: Params, vector: Params, delta: Tensor, x: Tensor, y: Tensor
) -> Params:
    """The central finite difference ``[grad f(w + delta v) - grad f(w - delta v)] / (2 delta)``.

    Its error against ``hess f(w) v`` is at most ``rho * delta * ||v||^2`` (Fallah et al. 2020),
    and it needs two first-order gradients and no second-order graph. They are evaluated in the
    parameters' precision even under mixed-precision autocast.
    """
    # The difference of two nearby gradients needs more mantissa than bfloat16's 8 bits
    # (measured: 23% error under bf16 autocast at delta ||v|| = 0.01), so it leaves autocast.
    with torch.autocast(x.device.type, enabled=False):
        plus, _ = gradient_and_value(task.loss, axpy(delta, vector, params), x, y)
        minus, _ = gradient_and_value(task.loss, axpy(-delta, vector, params), x, y)
    return {n: (plus[n] - minus[n]) / (2 * delta) for n in plus}


def gaussian_smoothing_hvp(
    task: TaskModel,
    params: Params,
    vector: Params,
    noise: Params,
    radius: float,
    x: Tensor,
    y: Tensor,
) -> Params:
    """The gradient-based Gaussian-smoothing estimate of ``hess f(w) v``.

    With ``b`` directions ``u_s ~ N(0, I)`` over all parameters (``noise``, each tensor shaped
    ``(b, *parameter shape)``) and the radius ``mu``::

        (1 / b) sum_s [grad f(w + mu u_s) - grad f(w - mu u_s)] / (2 mu) * <u_s, v>

    Each term is an unbiased estimate of ``hess f_mu(w) v`` for the smoothed loss
    ``f_mu(w) = E f(w + mu u)`` (Stein's identity applied to the gradient, in the antithetic
    form), so the estimate is unbiased for a quadratic ``f`` at any radius and off by
    ``O(mu^2)`` for a smooth one. A ReLU network's ``f_mu`` is smooth, its Hessian the kinks'
    curvature in expectation; but each pair ``w +- mu u_s`` that straddles a kink still carries
    the gradient's jump divided by ``2 mu``, so that small radii are noisy there. For a
    quadratic the term is exactly ``H u_s <u_s, v>``, whose covariance is
    ``H (||v||^2 I + v v^T) H``: the variance grows with the Hessian's Frobenius norm, that is
    with the number of parameters it acts on, and falls as ``1 / b``.

    This is the gradient-based Gaussian-smoothing (GGS) estimator of Ji, Yang and Liang
    (Multi-Step Model-Agnostic Meta-Learning: Convergence and Improved Algorithms, arXiv
    2002.07836v1; JMLR 2022 as Theoretical Convergence of Multi-Step Model-Agnostic
    Meta-Learning) in its antithetic form. Their text could not be read here beyond the
    abstract; their code (github.com/JunjieYang97/GGS-MAML-DL, ``meta_regression.py`` and
    ``meta_matrix_rank.py``, ``approx_method="ggs"``) takes the one-sided form
    ``(1 / b) sum_s [grad f(w + mu u_s) - grad f(w)] / mu * <u_s, v>``, with ``u_s ~ N(0, I)``
    not normalised and the radius multiplying ``u_s`` as here. The two have the same
    expectation, exactly and at any radius: the antithetic term for ``u`` is the mean of
    the one-sided terms for ``u`` and ``-u``, and ``-u`` has the density of ``u`` (the tests
    check this identity). So each is unbiased for ``hess f_mu(w) v``; the antithetic form drops
    the part of each one-sided term that is odd in ``u`` (mean zero, variance ``O(mu^2)``) and
    does not need ``grad f(w)``, at ``2 b`` gradients against ``b + 1``. One more difference:
    their code draws the directions once per run and reuses them at every meta-iteration; here
    the caller draws fresh ones per task, inner step and training step. It costs ``2 b``
    first-order gradients and no second-order graph; the gradients are evaluated in the
    parameters' precision even under mixed-precision autocast, as in
    :func:`finite_difference_hvp`.

    Args:
        task: The model and loss ``f``.
        params: The point ``w``.
        vector: ``v``.
        noise: The directions ``u_s`` by parameter name, stacked on dim 0 (the caller draws
            them, from a seeded generator, so that the estimate is reproducible).
        radius: The smoothing radius ``mu`` (> 0).
        x: The inputs of the loss.
        y: The targets of the loss.

    Returns:
        The estimate, shaped like ``params``.
    """
    samples = next(iter(noise.values())).shape[0]
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    with torch.autocast(x.device.type, enabled=False):
        for s in range(samples):
            direction = {n: noise[n][s] for n in params}
            plus, _ = gradient_and_value(task.loss, axpy(radius, direction, params), x, y)
            minus, _ = gradient_and_value(task.loss, axpy(-radius, direction, params), x, y)
            weight = sum(torch.sum(direction[n] * vector[n]) for n in params) / (2 * radius)
            total = {n: total[n] + (plus[n] - minus[n]) * weight for n in total}
    return {n: t / samples for n, t in total.items()}


def reverse_hvp(task: TaskModel, params: Params, vector: Params, x: Tensor, y: Tensor) -> Params:
    """The exact Hessian-vector product ``hess f(w) v`` by a double backward.

    The vector-Jacobian product of the gradient with ``v`` (the Hessian is symmetric): exact up
    to rounding, at a small constant multiple of a gradient's cost, and the graph of this one
    product is freed when it returns (B. A. Pearlmutter, Fast Exact Multiplication by the
    Hessian, Neural Computation 1994). Evaluated in the parameters' precision even under
    mixed-precision autocast, like :func:`finite_difference_hvp`.
    """
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            _, pullback = vjp(lambda p: grad(task.loss)(p, x, y), params)  # type: ignore[misc]  # torch.func.vjp's return type ignores has_aux=False
            return pullback(vector)[0]
        # Outside torch.func (a per-task loop), torch.autograd, as in gradient_and_value.
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
            grads = torch.autograd.grad(
                task.loss(leaves, x, y), list(leaves.values()), create_graph=True, allow_unused=True
            )
            # A gradient that does not depend on the parameters has a zero Hessian.
            pairs = [(g, vector[n]) for n, g in zip(leaves, grads, strict=True) if g is not None]
            pairs = [(g, v) for g, v in pairs if g.requires_grad]
            if not pairs:
                return {n: torch.zeros_like(p) for n, p in params.items()}
            products = torch.autograd.grad(
                [g for g, _ in pairs],
                list(leaves.values()),
                grad_outputs=[v for _, v in pairs],
                allow_unused=True,
                materialize_grads=True,
            )
        return dict(zip(leaves, products, strict=True))


def forward_hvp(task: TaskModel, params: Params, vector: Params, x: Tensor, y: Tensor) -> Params:
    """The exact Hessian-vector product ``hess f(w) v`` by forward-over-reverse differentiation.

    ``torch.func.jvp`` of ``torch.func.grad``: the directional derivative of the gradient at
    ``w`` along ``v``, exact up to rounding, with no graph kept after it returns (Pearlmutter
    1994). The same product as :func:`reverse_hvp` by another route, whose speed depends on
    the model and the device (``benchmarks/speed.py`` measures both). Evaluated in the
    parameters' precision even under mixed-precision autocast.

    Raises:
        RuntimeError: If the loss does not support forward-mode differentiation, as
            ``F.mse_loss`` does not in torch 2.13 (use :func:`mse_loss`).
    """
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            # Dynamo (torch 2.13) fails to trace a jvp under vmap whose function closes over
            # the input ("Tensor device mismatch"); as a primal with a zero tangent it traces.
            return jvp(
                lambda p, x: grad(task.loss)(p, x, y), (params, x), (vector, torch.zeros_like(x))
            )[1]
        try:
            return jvp(lambda p: grad(task.loss)(p, x, y), (params,), (vector,))[1]
        except RuntimeError as error:
            if "ZeroTensors are immutable" not in str(error):
                raise
            raise RuntimeError(
                "The loss does not support forward-mode differentiation, which hvp='forward' "
                "uses: F.mse_loss fails this way in torch 2.13. Use "
                "lightning_maml.functional.mse_loss (MetaLearner(loss='mse') does), or "
                "hvp='reverse'."
            ) from error


#: The exact Hessian-vector product rules by name (``hvp`` of MAML and HF-MAML).
EXACT_HVPS: dict[str, Callable[..., Params]] = {"reverse": reverse_hvp, "forward": forward_hvp}


def backward_recursion(
    vector: Params,
    points: Sequence[Params],
    step_sizes: Sequence[Mapping[str, Tensor | float]],
    hvp: HvpRule,
    inner_grads: Sequence[Params] = (),
) -> tuple[Params, list[Params]]:
    """The derivative of k inner steps applied to ``v``, formed backwards one step at a time.

    The inner steps ``w_{j+1} = w_j - alpha_j (.) grad f_in(w_j)`` (``alpha_j`` zero on the
    parameters that do not adapt) have the Jacobian ``I - diag(alpha_j) H_j``, with ``H_j`` the
    Hessian at ``w_j`` of the loss that ``hvp`` takes it on. The chain rule gives ``g_k = v``,
    ``g_j = g_{j+1} - H_j (alpha_j (.) g_{j+1})`` for ``j = k-1 .. 0``; with one scalar step
    size, ``g_j = (I - alpha H_j) g_{j+1}``. Each step needs one product ``hvp(w_j, u)`` and
    nothing of the other steps, so no graph is kept between steps. With an exact ``hvp``
    (:func:`reverse_hvp`, :func:`forward_hvp`) and ``v`` the outer gradient at ``w_k`` this is
    MAML's meta-gradient (Finn et al. 2017); with :func:`finite_difference_hvp` it is HF-MAML's
    (Fallah et al. 2020, and its k-step extension).

    Args:
        vector: ``v``.
        points: ``w_0 .. w_{k-1}``.
        step_sizes: ``alpha_0 .. alpha_{k-1}``, by adapted parameter.
        hvp: The Hessian-vector product rule, ``hvp(w_j, u) -> H_j u``.
        inner_grads: The inner gradients ``grad f_in(w_j)`` (none, or one per step), to also
            return the gradient with respect to each ``alpha_j``: ``-grad f_in(w_j) (.)
            g_{j+1}`` (before it is summed to the step size's shape, see
            :meth:`~lightning_maml.inner.InnerUpdate.rate_gradient`).

    Returns:
        ``g_0``, and the step sizes' gradients in step order (one per inner gradient given).
    """
    cotangents: list[Params] = []
    for j in reversed(range(len(points))):
        alpha = step_sizes[j]
        if inner_grads:
            cotangents.append({n: -inner_grads[j][n] * vector[n] for n in alpha})
        direction = {
            n: alpha[n] * v if n in alpha else torch.zeros_like(v) for n, v in vector.items()
        }
        product = hvp(points[j], direction)
        vector = {n: v - product[n] for n, v in vector.items()}
    return vector, cotangents[::-1]


def map_tasks(fn: Callable, params: Params, data: dict[str, Tensor]):
    """Applies a per-task function to every task of ``data`` (dim 0), with shared ``params``.

    One task is a direct call; several are one ``vmap`` call. Outputs are stacked over tasks.
    """
    num_tasks = next(iter(data.values())).shape[0]
    if num_tasks == 1:
        out = fn(params, {k: v[0] for k, v in data.items()})
        return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, out)
    # "different": modules that draw random numbers (dropout) draw them per task.
    return vmap(fn, in_dims=(None, 0), randomness="different")(params, data)
