"""Hessian-free MAML: Hessian-vector products as finite differences of gradients."""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import Tensor

from lightning_maml.algorithms.base import ChunkSize, CompileMode, HessianBatch, MetaAlgorithm
from lightning_maml.functional import (
    EXACT_HVPS,
    Params,
    TaskModel,
    finite_difference_hvp,
    tree_norm,
)
from lightning_maml.inner import InnerUpdate
from lightning_maml.theory.constants import SHARED, SharedConstants

__all__ = ["HFMAML"]

#: delta = DEFAULT_DELTA_SCALE / ||v|| when no rule is given.
DEFAULT_DELTA_SCALE = 0.01

Hvp = Literal["finite_difference", "reverse", "forward"]


class HFMAML(MetaAlgorithm):
    """Hessian-free MAML: MAML's meta-gradient with finite-difference Hessian-vector products.

    Update rule (one inner step): with ``u_i = w_k - alpha grad f_i(w_k, D_in)``,
    ``v_i = grad f_i(u_i, D_o)`` and
    ``d_i = [grad f_i(w_k + delta_i v_i, D_h) - grad f_i(w_k - delta_i v_i, D_h)] / (2 delta_i)``,
    ``w_{k+1} = w_k - beta_k / B * sum_i (v_i - alpha d_i)``.

    It keeps MAML's guarantees (Fallah et al. 2020, Theorem on HF-MAML) with two extra
    first-order gradients per inner step and no second-order graph, so its memory stays close to
    FO-MAML's. The finite-difference error is at most ``rho * delta * ||v||^2``.

    With ``inner_steps = k > 1`` (beyond the paper; this project's extension) the product
    ``prod_j (I - alpha hess f_i(w_j))`` is applied backwards along the stored inner trajectory:
    ``g_k = v_i``, ``g_j = g_{j+1} - alpha d_j(g_{j+1})`` with ``d_j`` the finite difference at
    ``w_j`` in the direction ``g_{j+1}``, and the task's meta-gradient is ``g_0``
    (:func:`~lightning_maml.functional.backward_recursion`).

    ``hvp`` chooses how each product ``hess f_i(w_j) g`` is formed: ``"finite_difference"``
    (default, the paper's ``d_j``: two gradients), or exactly by ``"reverse"`` (a double
    backward of one step, :func:`~lightning_maml.functional.reverse_hvp`) or ``"forward"``
    (forward-over-reverse, :func:`~lightning_maml.functional.forward_hvp`); an exact product
    costs more compute than the finite difference and the same memory. With an exact product
    the result is MAML's exact meta-gradient, as ``MAML(backward="recursion")`` computes it,
    and delta plays no part.

    The step delta (one rule):

    - ``delta=0.001``: a fixed step;
    - ``delta="theory", rho=...``: ``delta_i = 1 / (6 rho alpha ||v_i||)``, the theorem's choice
      (its 6 is ``constants.delta_denominator``);
    - ``delta_scale=c``: ``delta_i = c / ||v_i||`` (default ``c = 0.01``), so that the
      perturbation ``delta_i v_i`` has norm c whatever the gradient's scale.

    The default suits twice-differentiable models, the theorem's setting, where the difference's
    error is rounding (small delta) or curvature (large delta). In a ReLU or max-pool network
    each unit the perturbation switches adds a gradient jump divided by ``2 delta``, and a
    larger ``c`` averages those out: the image recipes take ``c = 0.3``, and
    ``benchmarks/README.md`` has the measurements and ``benchmarks/fidelity.py`` the tool.

    Args:
        inner_lr: The inner step size alpha (> 0).
        inner_steps: The number of inner steps (>= 1).
        hessian_batch: Where the finite differences are taken: ``"inner"`` (support set D_in)
            or ``"independent"`` (the task's Hessian set D_h, as in the paper).
        delta: A fixed positive step, or ``"theory"`` (needs ``rho``).
        rho: The Hessian-Lipschitz constant for ``delta="theory"``.
        delta_scale: The c of ``delta = c / ||v||``.
        task_chunk_size: Tasks per vectorised call (see :class:`MetaAlgorithm`).
        track_loss_before: Also report the pre-adaptation query loss (see :class:`MetaAlgorithm`).
        compile: Compile the per-chunk computation with ``torch.compile`` (see :class:`MetaAlgorithm`).
        hvp: ``"finite_difference"``, ``"reverse"`` or ``"forward"``, as above.
        inner_update: Which parameters adapt, with which step sizes (see
            :class:`~lightning_maml.inner.InnerUpdate`). The delta rules are stated for one step
            size: with learned ones, ``inner_lr`` stands for them in the rules.
        constants: The theory's shared constants (the 6 of ``delta="theory"``), Fallah et al.
            2020's by default (:data:`~lightning_maml.theory.constants.SHARED`).

    References:
        A. Fallah, A. Mokhtari, A. Ozdaglar. On the Convergence Theory of Gradient-Based
        Model-Agnostic Meta-Learning Algorithms. AISTATS 2020 (Section 6, HF-MAML).
        B. A. Pearlmutter. Fast Exact Multiplication by the Hessian. Neural Computation 1994.
    """

    def __init__(
        self,
        inner_lr: float,
        inner_steps: int = 1,
        hessian_batch: HessianBatch = "inner",
        delta: float | Literal["theory"] | None = None,
        rho: float | None = None,
        delta_scale: float | None = None,
        task_chunk_size: ChunkSize = "auto",
        track_loss_before: bool = False,
        compile: bool | CompileMode = False,
        hvp: Hvp = "finite_difference",
        inner_update: InnerUpdate | None = None,
        constants: SharedConstants = SHARED,
    ) -> None:
        super().__init__(
            inner_lr,
            inner_steps,
            hessian_batch,
            task_chunk_size,
            track_loss_before,
            compile,
            inner_update,
        )
        if hvp != "finite_difference" and hvp not in EXACT_HVPS:
            raise ValueError(
                "HFMAML hvp must be 'finite_difference', 'reverse' or 'forward' (exact "
                f"products), got {hvp!r}."
            )
        self.constants = constants
        self.hvp = hvp
        if hvp in EXACT_HVPS:
            if (delta, rho, delta_scale) != (None, None, None):
                raise ValueError(
                    f"HFMAML(hvp={hvp!r}) forms exact products and takes no delta, rho or "
                    "delta_scale: drop them, or use hvp='finite_difference'."
                )
            self.delta = self.rho = self.delta_scale = None
            return
        if delta is not None and delta_scale is not None:
            raise ValueError(
                f"Give HFMAML either delta or delta_scale, not both (got delta={delta!r} and "
                f"delta_scale={delta_scale!r}). The recipes set delta_scale: to use delta from "
                "the command line, also pass --model.algorithm.init_args.delta_scale null."
            )
        if delta == "theory":
            if rho is None or not rho > 0:
                raise ValueError(
                    "HFMAML(delta='theory') needs rho > 0, the Hessian-Lipschitz constant "
                    f"(got rho={rho!r}); estimate it with `lightning-maml estimate`, or use "
                    "delta_scale=c for delta = c / ||v||."
                )
        elif delta is not None:
            if isinstance(delta, str) or not delta > 0:
                raise ValueError(
                    f"HFMAML delta must be a positive number or 'theory', got {delta!r}."
                )
            if rho is not None:
                raise ValueError(
                    "rho is used only with delta='theory'; drop rho or set delta='theory'."
                )
        else:
            if rho is not None:
                raise ValueError(
                    "rho is used only with delta='theory'; drop rho or set delta='theory'."
                )
            if delta_scale is None:
                delta_scale = DEFAULT_DELTA_SCALE
            if not delta_scale > 0:
                raise ValueError(f"HFMAML delta_scale must be > 0, got {delta_scale!r}.")
        self.delta = delta
        self.rho = rho
        self.delta_scale = delta_scale

    def step_size(self, vector_norm: Tensor) -> Tensor:
        """The finite-difference step delta for a direction of norm ``vector_norm``."""
        # A zero direction has a zero product for any delta; the floor only avoids inf * 0.
        norm = vector_norm.clamp_min(torch.finfo(vector_norm.dtype).eps)
        if self.delta == "theory":
            rho = cast(float, self.rho)  # delta='theory' has rho > 0 (__init__)
            return 1.0 / (self.constants.delta_denominator * rho * self.inner_lr * norm)
        if self.delta is not None:
            return torch.full_like(norm, float(self.delta))
        return cast(float, self.delta_scale) / norm  # set by __init__ without delta

    def task_meta_gradient(
        self, task: TaskModel, params: Params, rates: Params, data: dict[str, Tensor]
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        x_h, y_h = self.hessian_set(data)
        deltas, norms = [], []

        def hvp(point: Params, direction: Params) -> Params:
            # The recursion asks for H (alpha (.) g); the delta rules are stated for the
            # direction g, whose norm is that of alpha (.) g over alpha for one step size.
            if self.hvp in EXACT_HVPS:
                product = EXACT_HVPS[self.hvp](task, point, direction, x_h, y_h)
            else:
                deltas.append(self.step_size(tree_norm(direction) / self.inner_lr))
                product = finite_difference_hvp(
                    task, point, direction, deltas[-1] / self.inner_lr, x_h, y_h
                )
            norms.append(tree_norm(product) / self.inner_lr)
            return product

        grads, rate_grads, stats = self.backward_pass(task, params, rates, data, hvp)
        # The recursion runs j = k-1 .. 0; reported in inner-step order like the other statistics.
        if deltas:
            stats["hfmaml/delta"] = torch.stack(deltas[::-1])
        stats["hfmaml/hvp_norm"] = torch.stack(norms[::-1])
        return grads, rate_grads, stats
