"""MAML: the exact second-order meta-gradient."""

from __future__ import annotations

import functools
from typing import Literal

from torch import Tensor

from lightning_maml.algorithms.base import (
    ChunkSize,
    CompileMode,
    HessianBatch,
    MetaAlgorithm,
    Supports,
    query_stats,
)
from lightning_maml.functional import EXACT_HVPS, Params, TaskModel, gradient_and_value
from lightning_maml.inner import InnerUpdate

__all__ = ["MAML"]

Backward = Literal["graph", "recursion"]
ExactHvp = Literal["reverse", "forward"]


class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning with the exact meta-gradient.

    Update rule (one inner step, tasks i of the meta-batch B_k):
    ``w_{k+1} = w_k - beta_k / B * sum_i (I - alpha hess f_i(w_k, D_h)) grad f_i(w_k - alpha grad f_i(w_k, D_in), D_o)``.

    With ``inner_steps = k > 1`` the meta-gradient is the derivative through all k inner steps,
    ``prod_j (I - alpha hess f_i(w_j)) grad f_i(w_k, D_o)``. ``hessian_batch="inner"`` takes
    the Hessians on the support set ``D_in`` (Finn et al. 2017: backpropagation through the
    inner loop; a biased estimate of grad F); ``"independent"`` takes them on the task's own
    Hessian set ``D_h`` (the unbiased estimator of Fallah et al. 2020) while the inner steps
    themselves still use ``D_in``.

    Two ways to compute the same meta-gradient (``backward``):

    - ``"graph"`` (default): differentiate through the inner loop, a double backward. Every
      inner step's second-order graph stays alive until the meta-backward, so memory grows
      with ``inner_steps``.
    - ``"recursion"``: run the inner loop without a second-order graph, keep its points
      ``w_0 .. w_{k-1}``, take the outer gradient ``v`` at ``w_k`` and apply
      ``g_k = v``, ``g_j = g_{j+1} - alpha hess f_i(w_j) g_{j+1}`` backwards
      (:func:`~lightning_maml.functional.backward_recursion`), each Hessian-vector product
      exact and formed on its own. Memory stays near FO-MAML's whatever ``inner_steps`` (one
      product's work at a time, plus the k points); each step costs one exact product, more
      compute than HF-MAML's finite difference. It is HF-MAML's backward recursion with exact
      products, so it agrees with ``"graph"`` up to rounding. The products are evaluated in
      the parameters' precision under mixed-precision autocast.

    ``hvp`` chooses how ``"recursion"`` forms each exact product: ``"reverse"`` (default, a
    double backward of one step, :func:`~lightning_maml.functional.reverse_hvp`) or
    ``"forward"`` (forward-over-reverse, :func:`~lightning_maml.functional.forward_hvp`; the
    loss must support forward-mode differentiation, which ``F.mse_loss`` does not in torch
    2.13: use :func:`~lightning_maml.functional.mse_loss`, as ``MetaLearner(loss="mse")``
    does). Which is faster depends on the model and device: ``benchmarks/speed.py`` measures
    both.

    Args:
        inner_lr: The inner step size alpha (> 0).
        inner_steps: The number of inner steps (>= 1).
        hessian_batch: ``"inner"`` or ``"independent"``.
        task_chunk_size: Tasks per vectorised call (see :class:`MetaAlgorithm`).
        track_loss_before: Also report the pre-adaptation query loss (see :class:`MetaAlgorithm`).
        compile: Compile the per-chunk computation with ``torch.compile`` (see :class:`MetaAlgorithm`).
        backward: ``"graph"`` or ``"recursion"``, as above.
        hvp: ``"reverse"`` or ``"forward"``: the products of ``backward="recursion"``.

    References:
        C. Finn, P. Abbeel, S. Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks. ICML 2017.
        A. Fallah, A. Mokhtari, A. Ozdaglar. On the Convergence Theory of Gradient-Based
        Model-Agnostic Meta-Learning Algorithms. AISTATS 2020 (Algorithm 1, MAML).
        B. A. Pearlmutter. Fast Exact Multiplication by the Hessian. Neural Computation 1994.
    """

    def __init__(
        self,
        inner_lr: float,
        inner_steps: int = 1,
        hessian_batch: HessianBatch = "inner",
        task_chunk_size: ChunkSize = "auto",
        track_loss_before: bool = False,
        compile: bool | CompileMode = False,
        backward: Backward = "graph",
        hvp: ExactHvp = "reverse",
        inner_update: InnerUpdate | None = None,
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
        if backward not in ("graph", "recursion"):
            raise ValueError(
                f"MAML backward must be 'graph' (differentiate through the inner loop) or "
                f"'recursion' (exact Hessian-vector products along the inner trajectory, "
                f"first-order memory), got {backward!r}."
            )
        if hvp not in EXACT_HVPS:
            raise ValueError(f"MAML hvp must be 'reverse' or 'forward', got {hvp!r}.")
        if backward == "graph" and hvp != "reverse":
            raise ValueError(
                f"MAML hvp={hvp!r} chooses the products of backward='recursion'; set "
                "backward='recursion' too, or drop hvp."
            )
        self.backward = backward
        self.hvp = hvp

    def supports(self) -> Supports:
        # Per-step views only by differentiating through the inner loop.
        return Supports(per_step_view=self.backward == "graph")

    def task_meta_gradient(
        self,
        task: TaskModel,
        params: Params,
        rates: Params,
        data: dict[str, Tensor],
        weights: Tensor | None = None,
        second_order: bool = True,
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        """One task's meta-gradient; by differentiating through the inner loop (``"graph"``),
        the query loss's weight after each inner step may be given (``weights``, MAML++'s
        multi-step loss; by default the last step's loss alone) and the inner gradients taken
        as constants (``second_order=False``)."""
        if self.backward == "recursion":
            x_h, y_h = self.hessian_set(data)
            hvp = functools.partial(EXACT_HVPS[self.hvp], task, x=x_h, y=y_h)
            return self.backward_pass(task, params, rates, data, hvp)
        hessian = self.hessian_set(data) if self.hessian_batch == "independent" else None

        def objective(p: Params, r: Params) -> tuple[Tensor, dict[str, Tensor]]:
            adapted, trajectory, query = self.adapt(
                task,
                p,
                r,
                data,
                hessian_data=hessian,
                keep_points=weights is not None,
                first_order=not second_order,
            )
            loss, prediction = query(adapted)
            total = loss
            if weights is not None:
                # The points after steps 0 .. k-2 are the trajectory's w_1 .. w_{k-1}.
                total = weights[-1].to(loss.dtype) * loss
                for j, point in enumerate(trajectory.points[1:]):
                    early, _ = query(point, j)
                    total = total + weights[j].to(loss.dtype) * early
            stats = query_stats(task, p, trajectory, loss, prediction, data, self.track_loss_before)
            return total, stats

        # Per task, then vmapped by the base class. The other order, one grad of the vmapped
        # sum, gets BatchNorm's double backward wrong in torch.func (measured: conv biases
        # before BatchNorm, whose true gradient is 0, got 1e-3; see tests/algorithms/test_algorithms.py).
        (grads, rate_grads), (_, stats) = gradient_and_value(
            lambda both: objective(*both), (params, rates), has_aux=True
        )
        return grads, rate_grads, stats
