"""Estimates of the constants of Fallah et al. 2020's assumptions at the current weights.

Each task's examples (support, query and Hessian sets together: they are i.i.d. draws of the
task's data) stand in for its data distribution. At the weights ``w``:

- ``L``: the largest ``|eigenvalue|`` of ``hess f_i(w)`` over the tasks, by power iteration on
  Hessian-vector products (A2 asks for a bound that holds for every task, hence the max).
- ``rho``: ``max ||hess f_i(w + r e) v - hess f_i(w) v|| / r`` over the tasks, for the top
  eigenvector ``v`` and the directions ``e`` in {``v``, a random unit vector}. It probes a few
  directions at one point, so it is an estimate of the local constant, not a bound (A3). On a
  network with kinks (ReLU) the Hessian jumps where a unit changes sign, and the estimate then
  depends on r.
- ``sigma``: the spread of the task gradients, ``E_i ||grad f_i(w) - grad f(w)||^2`` (A4), with
  the within-task noise of each task's gradient ``sigma_tilde^2 / n`` subtracted.
- ``sigma_tilde``: the root mean over tasks of the variance of the per-example gradients (A5).
- ``sigma_H``: the same spread for per-example Hessian-vector products along unit directions
  (the top eigenvector and random ones), the largest over the directions. A direction sees
  ``||(H_theta - H) v||``, a lower estimate of the operator-norm spread of A5.

The per-example quantities need a loss that is a mean of per-example terms (``"mse"``,
``"cross_entropy"``) and a model whose output for one example does not depend on the others.
The computation runs in float64 by default so that the finite differences of ``rho`` are not
rounding noise.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from lightning_maml.checks import check_int
from lightning_maml.functional import LossFn, Params, TaskModel, axpy, tree_norm
from lightning_maml.tasks import TaskBatch

__all__ = ["ConstantEstimates", "estimate_constants", "pooled_examples"]


@dataclass
class ConstantEstimates:
    """The constants of Fallah et al. 2020's assumptions, estimated at one point ``w``.

    Attributes:
        L: Smoothness of the task losses (A2).
        rho: Lipschitz constant of the task Hessians (A3), an estimate from a few directions.
        sigma: Spread of the task gradients (A4).
        sigma_tilde: Spread of the per-example gradients within a task (A5).
        sigma_H: Spread of the per-example Hessian-vector products within a task (A5).
        grad_norm: The mean task-gradient norm ``E_i ||grad f_i(w)||`` (enters ``L(w)``).
        tasks: The number of tasks the estimates used.
        examples: Examples per task.
        power_iterations: Power-iteration steps for ``L``.
        rho_radius: The distance ``r`` of the nearby points for ``rho``.
        directions: Random directions for ``sigma_H`` (besides the top eigenvector).
    """

    L: float
    rho: float
    sigma: float
    sigma_tilde: float
    sigma_H: float
    grad_norm: float
    tasks: int
    examples: int
    power_iterations: int
    rho_radius: float
    directions: int

    def as_dict(self) -> dict[str, float | int]:
        """The estimates as a plain dictionary (JSON-ready)."""
        return asdict(self)


def pooled_examples(tasks: TaskBatch, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Each task's examples as one batch: its support, query and Hessian sets, concatenated.

    The three sets are independent draws from the task's data, so together they are simply a
    larger sample of it.

    Args:
        tasks: The tasks.
        limit: Keep only the first ``limit`` examples of each task.

    Returns:
        Inputs and targets shaped ``(tasks, examples, ...)``.

    Raises:
        ValueError: If the tasks carry fewer than ``limit`` examples.
    """
    splits = [s for s in ("support", "query", "hessian") if getattr(tasks, f"{s}_x") is not None]
    x = torch.cat([getattr(tasks, f"{s}_x") for s in splits], dim=1)
    y = torch.cat([getattr(tasks, f"{s}_y") for s in splits], dim=1)
    if limit is not None:
        if limit > x.shape[1]:
            raise ValueError(
                f"{limit} examples per task were asked for, but the tasks carry {x.shape[1]} "
                "(support + query + Hessian sets): ask for fewer or give the datamodule more "
                "query_shots."
            )
        x, y = x[:, :limit], y[:, :limit]
    return x, y


def _dot(a: Params, b: Params) -> Tensor:
    return cast(Tensor, sum((a[n] * b[n]).sum() for n in a))  # a parameter dict is not empty


def _scale(a: Params, s: Tensor | float) -> Params:
    return {n: t * s for n, t in a.items()}


def _hvp(task: TaskModel, params: Params, vector: Params, x: Tensor, y: Tensor) -> Params:
    """``hess f(params; x, y) @ vector`` by reverse-over-reverse differentiation.

    ``TaskModel.hvp`` (forward-over-reverse) fails on ``F.mse_loss`` in current torch releases
    ("ZeroTensors are immutable", pytorch/pytorch#123996); the reverse-over-reverse product
    is the same matrix-vector product and works for every loss.
    """
    _, pullback = vjp(lambda p: grad(task.loss)(p, x, y), params)  # type: ignore[misc]  # torch.func.vjp's return type ignores has_aux=False
    return pullback(vector)[0]


def _random_units(params: Params, shape: tuple[int, ...], generator: torch.Generator) -> Params:
    """Random directions of unit norm (over all parameters), with leading dimensions ``shape``."""
    draws = {
        n: torch.randn((*shape, *p.shape), generator=generator, dtype=p.dtype).to(p.device)
        for n, p in params.items()
    }
    norm = torch.sqrt(
        cast(Tensor, sum(d.flatten(len(shape)).pow(2).sum(-1) for d in draws.values()))
    )
    return {n: d / norm.view(*shape, *([1] * (d.dim() - len(shape)))) for n, d in draws.items()}


def _per_task(
    task: TaskModel,
    power_iterations: int,
    rho_radius: float,
    params: Params,
    data: dict,
) -> dict[str, Tensor | Params]:
    """Everything one task contributes to the estimates (``vmap`` ped over tasks)."""
    x, y = data["x"], data["y"]
    n = x.shape[0]

    def example_loss(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
        return task.loss(p, xi.unsqueeze(0), yi.unsqueeze(0))

    # Per-example gradients: their mean is the task gradient, their spread sigma_tilde.
    example_grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    task_grad = {k: g.mean(0) for k, g in example_grads.items()}
    within = sum((g - task_grad[k]).pow(2).sum() for k, g in example_grads.items()) / (n - 1)

    vector = data["start"]
    for _ in range(power_iterations):
        product = _hvp(task, params, vector, x, y)
        norm = tree_norm(product)
        # A zero product (a flat direction) would divide 0 by 0; the floor keeps it at 0.
        vector = _scale(product, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny))
    product = _hvp(task, params, vector, x, y)
    eigenvalue = _dot(vector, product).abs()

    rho = (
        torch.stack(
            [
                tree_norm(
                    axpy(-1.0, product, _hvp(task, axpy(rho_radius, e, params), vector, x, y))
                )
                for e in (vector, data["perturbation"])
            ]
        ).max()
        / rho_radius
    )

    def example_hvp(v: Params, xi: Tensor, yi: Tensor) -> Params:
        return _hvp(task, params, v, xi.unsqueeze(0), yi.unsqueeze(0))

    def hvp_spread(v: Params) -> Tensor:
        products = vmap(example_hvp, in_dims=(None, 0, 0))(v, x, y)
        return sum((h - h.mean(0)).pow(2).sum() for h in products.values()) / (n - 1)

    directions = data["directions"]
    count = next(iter(directions.values())).shape[0]
    spreads = [hvp_spread(vector)] + [
        hvp_spread({k: d[i] for k, d in directions.items()}) for i in range(count)
    ]
    return {
        "grad": task_grad,
        "within": within,
        "eigenvalue": eigenvalue,
        "rho": rho,
        "hvp_spread": torch.stack(spreads),
    }


def estimate_constants(
    model: nn.Module,
    loss_fn: LossFn,
    tasks: TaskBatch,
    power_iterations: int = 30,
    rho_radius: float = 1e-3,
    directions: int = 4,
    task_chunk_size: int = 8,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
) -> ConstantEstimates:
    """Estimates L, rho, sigma, sigma_tilde and sigma_H at the model's current weights.

    See the module docstring for what each estimate measures.

    Args:
        model: The model at the weights ``w`` (not modified).
        loss_fn: The task loss, a mean over examples.
        tasks: At least two tasks with at least two examples each (all their sets are pooled).
        power_iterations: Power-iteration steps for ``L``.
        rho_radius: The distance of the nearby points for ``rho``.
        directions: Random unit directions for ``sigma_H`` besides the top eigenvector.
        task_chunk_size: Tasks per vectorised call (per-example gradients of this many tasks
            are held at once).
        seed: Seed of the random directions.
        dtype: Computation dtype (``None``: the model's own).

    Returns:
        The estimates.

    Raises:
        ValueError: On fewer than two tasks or examples, or a non-positive setting.
    """
    x, y = pooled_examples(tasks)
    if tasks.num_tasks < 2 or x.shape[1] < 2:
        raise ValueError(
            f"Estimating spreads needs at least 2 tasks of at least 2 examples; got "
            f"{tasks.num_tasks} tasks of {x.shape[1]}."
        )
    check_int("power_iterations", power_iterations)
    check_int("task_chunk_size", task_chunk_size)
    if not rho_radius > 0 or isinstance(directions, bool) or directions < 0:
        raise ValueError(
            f"rho_radius must be > 0 and directions >= 0, got {rho_radius!r} and {directions!r}."
        )
    if dtype is not None:
        # A copy: the caller's model stays in its own dtype.
        model = copy.deepcopy(model).to(dtype)
        x = x.to(dtype) if x.is_floating_point() else x
        y = y.to(dtype) if y.is_floating_point() else y
    task = TaskModel(model, loss_fn)
    params = task.params()
    num_tasks, examples = x.shape[0], x.shape[1]
    generator = torch.Generator().manual_seed(seed)
    data: dict[str, Any] = {
        "x": x,
        "y": y,
        "start": _random_units(params, (num_tasks,), generator),
        "perturbation": _random_units(params, (num_tasks,), generator),
        "directions": _random_units(params, (num_tasks, directions), generator),
    }

    def per_task(p: Params, d: dict) -> dict:
        return _per_task(task, power_iterations, rho_radius, p, d)

    parts = []
    with torch.no_grad():  # torch.func differentiates regardless
        for start in range(0, num_tasks, task_chunk_size):
            chunk = {
                k: (
                    {n: t[start : start + task_chunk_size] for n, t in v.items()}
                    if isinstance(v, dict)
                    else v[start : start + task_chunk_size]
                )
                for k, v in data.items()
            }
            parts.append(vmap(per_task, in_dims=(None, 0), randomness="different")(params, chunk))
    grads = {n: torch.cat([p["grad"][n] for p in parts]) for n in params}
    within, eigenvalues, rhos, hvp_spreads = (
        torch.cat([p[k] for p in parts]) for k in ("within", "eigenvalue", "rho", "hvp_spread")
    )
    flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
    between = (flat - flat.mean(0)).pow(2).sum(1).sum() / (num_tasks - 1)
    # Each task gradient is itself a mean of `examples` noisy terms: remove that noise.
    sigma_sq = (between - within.mean() / examples).clamp_min(0.0)
    return ConstantEstimates(
        L=eigenvalues.max().item(),
        rho=rhos.max().item(),
        sigma=sigma_sq.sqrt().item(),
        sigma_tilde=within.mean().sqrt().item(),
        sigma_H=hvp_spreads.mean(0).max().sqrt().item(),
        grad_norm=flat.norm(dim=1).mean().item(),
        tasks=num_tasks,
        examples=examples,
        power_iterations=power_iterations,
        rho_radius=rho_radius,
        directions=directions,
    )
