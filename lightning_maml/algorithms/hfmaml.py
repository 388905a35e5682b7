"""Hessian-free MAML: Hessian-vector products from differences of gradients."""

from __future__ import annotations

import hashlib
from typing import Literal, cast

import torch
from torch import Tensor, nn

from lightning_maml.algorithms.base import (
    ChunkSize,
    CompileMode,
    HessianBatch,
    MetaAlgorithm,
    MetaStep,
)
from lightning_maml.checks import check_int, check_positive
from lightning_maml.functional import (
    EXACT_HVPS,
    LossFn,
    Params,
    TaskModel,
    finite_difference_hvp,
    gaussian_smoothing_hvp,
    tree_norm,
)
from lightning_maml.inner import InnerUpdate
from lightning_maml.tasks import TaskBatch
from lightning_maml.theory.constants import SHARED, SharedConstants

__all__ = ["HFMAML"]

#: delta = DEFAULT_DELTA_SCALE / ||v|| when no rule is given.
DEFAULT_DELTA_SCALE = 0.01
#: The smoothing radius mu of hvp="gaussian_smoothing" when none is given (the authors' code's
#: approx_delta default; see HFMAML).
DEFAULT_SMOOTHING_RADIUS = 1e-2
#: The number of directions b of hvp="gaussian_smoothing" when none is given (this project's
#: choice; their code takes 10 one-sided directions: see HFMAML).
DEFAULT_SMOOTHING_SAMPLES = 8
#: The prefix of the drawn directions among a task's tensors (they are vmapped with the task).
NOISE_KEY = "gaussian_smoothing/"

Hvp = Literal["finite_difference", "gaussian_smoothing", "reverse", "forward"]


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
    (default, the paper's ``d_j``: two gradients), ``"gaussian_smoothing"`` (below: ``2 b``
    gradients), or exactly by ``"reverse"`` (a double
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

    Gaussian smoothing (``hvp="gaussian_smoothing"``, Ji, Yang and Liang 2022): with ``b``
    directions ``u_s ~ N(0, I)`` over all parameters and the radius ``mu``,
    ``d_j = (1 / b) sum_s [grad f_i(w_j + mu u_s) - grad f_i(w_j - mu u_s)] / (2 mu) * <u_s, g>``,
    an unbiased estimate of the product with the Hessian of the smoothed loss
    ``E f_i(w + mu u)`` (:func:`~lightning_maml.functional.gaussian_smoothing_hvp`: the
    antithetic form of their gradient-based estimator, whose expectation is exactly that of the
    one-sided form ``[grad f_i(w_j + mu u_s) - grad f_i(w_j)] / mu * <u_s, g>`` of the authors'
    code). The estimate is random, with a variance
    that grows with the Hessian's Frobenius norm (with the number of parameters) and falls as
    ``1 / b``; in a ReLU network each pair that straddles a kink still carries the gradient's
    jump divided by ``2 mu``. It suits small models: on the image recipes'
    conv nets the error of a few directions is many times the meta-gradient, far beyond the
    finite difference's (``benchmarks/README.md``, "Gaussian smoothing"). The defaults
    ``mu = 1e-2``, ``b = 8`` are this project's choice from those measurements. Ji et al.'s
    text could not be read here beyond the abstract, so no value from their analysis is used;
    the authors' code for the paper's experiments has the defaults ``approx_delta = 1e-2`` (the
    radius, as ``mu`` here) and ``gaus_num = 10`` (directions of the one-sided form, 10
    gradients beside the inner step's own; GGS-MAML-DL ``regression_train.py`` and
    ``matrix_rank_train.py``, GGS-MAML-RL ``main.py``). The radius is theirs; ``b = 8`` costs 16
    gradients. Each task and inner step draws its own directions from a
    ``torch.Generator`` seeded from ``seed`` and, in training, the global step (and the
    process's rank under DDP), so that a run, and a run resumed from a checkpoint, draws the
    same directions. The directions of a chunk of tasks are drawn before it runs:
    ``b * inner_steps`` parameter-sized tensors per task of the chunk.

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
        hvp: ``"finite_difference"``, ``"gaussian_smoothing"``, ``"reverse"`` or ``"forward"``,
            as above.
        inner_update: Which parameters adapt, with which step sizes (see
            :class:`~lightning_maml.inner.InnerUpdate`). The delta rules are stated for one step
            size: with learned ones, ``inner_lr`` stands for them in the rules.
        constants: The theory's shared constants (the 6 of ``delta="theory"``), Fallah et al.
            2020's by default (:data:`~lightning_maml.theory.constants.SHARED`).
        smoothing_radius: The radius ``mu`` of ``hvp="gaussian_smoothing"`` (> 0; default
            ``1e-2``, as in the authors' code): the perturbation ``mu u`` has a norm of about
            ``mu`` times the square root of the number of parameters.
        smoothing_samples: The number of directions ``b`` of ``hvp="gaussian_smoothing"``
            (>= 1; default 8, this project's choice; the authors' code takes 10 one-sided).
        seed: Seeds the directions of ``hvp="gaussian_smoothing"``.

    References:
        A. Fallah, A. Mokhtari, A. Ozdaglar. On the Convergence Theory of Gradient-Based
        Model-Agnostic Meta-Learning Algorithms. AISTATS 2020 (Section 6, HF-MAML).
        B. A. Pearlmutter. Fast Exact Multiplication by the Hessian. Neural Computation 1994.
        K. Ji, J. Yang, Y. Liang. Theoretical Convergence of Multi-Step Model-Agnostic
        Meta-Learning. JMLR 2022 (arXiv 2002.07836; Hessian-free MAML by Gaussian smoothing in
        v1, Multi-Step Model-Agnostic Meta-Learning: Convergence and Improved Algorithms).
        Code: github.com/JunjieYang97/GGS-MAML-DL and GGS-MAML-RL.
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
        smoothing_radius: float | None = None,
        smoothing_samples: int | None = None,
        seed: int = 0,
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
        if hvp not in ("finite_difference", "gaussian_smoothing") and hvp not in EXACT_HVPS:
            raise ValueError(
                "HFMAML hvp must be 'finite_difference', 'reverse' or 'forward' (exact "
                f"products) or 'gaussian_smoothing', got {hvp!r}."
            )
        self.constants = constants
        self.hvp = hvp
        self.seed = check_int("seed", seed, low=0)
        self._generator: torch.Generator | None = None
        self._generator_seed = self.seed
        if hvp == "gaussian_smoothing":
            if (delta, rho, delta_scale) != (None, None, None):
                raise ValueError(
                    "HFMAML(hvp='gaussian_smoothing') takes no delta, rho or delta_scale (its "
                    "step is smoothing_radius): drop them, or use hvp='finite_difference'. The "
                    "recipes set delta_scale: from the command line, also pass "
                    "--model.algorithm.init_args.delta_scale null."
                )
            self.delta = self.rho = self.delta_scale = None
            self.smoothing_radius: float | None = check_positive(
                "HFMAML smoothing_radius",
                DEFAULT_SMOOTHING_RADIUS if smoothing_radius is None else smoothing_radius,
                "it is the standard deviation mu of the Gaussian perturbation of each parameter, "
                f"e.g. {DEFAULT_SMOOTHING_RADIUS:g}.",
            )
            self.smoothing_samples: int | None = check_int(
                "HFMAML smoothing_samples",
                DEFAULT_SMOOTHING_SAMPLES if smoothing_samples is None else smoothing_samples,
            )
            return
        if (smoothing_radius, smoothing_samples) != (None, None):
            raise ValueError(
                "smoothing_radius and smoothing_samples are used only with "
                f"hvp='gaussian_smoothing' (got hvp={hvp!r}): drop them or set "
                "hvp='gaussian_smoothing'."
            )
        self.smoothing_radius = None
        self.smoothing_samples = None
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
        deltas: list[Tensor] = []
        norms: list[Tensor] = []

        def hvp(point: Params, direction: Params) -> Params:
            # The recursion asks for H (alpha (.) g); the delta rules are stated for the
            # direction g, whose norm is that of alpha (.) g over alpha for one step size.
            if self.hvp in EXACT_HVPS:
                product = EXACT_HVPS[self.hvp](task, point, direction, x_h, y_h)
            elif self.hvp == "gaussian_smoothing":
                # The recursion runs j = k-1 .. 0: this is step k-1 minus the products so far.
                step = self.inner_steps - 1 - len(norms)
                noise = {n: data[NOISE_KEY + n][step] for n in point}
                radius = cast(float, self.smoothing_radius)
                product = gaussian_smoothing_hvp(task, point, direction, noise, radius, x_h, y_h)
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

    # -- the directions of hvp="gaussian_smoothing" ------------------------------------------

    def meta_gradient(
        self, model: nn.Module, loss_fn: LossFn, tasks: TaskBatch, step: int | None = None
    ) -> MetaStep:
        """As :meth:`MetaAlgorithm.meta_gradient`; with Gaussian smoothing and a ``step`` given,
        the directions are drawn from a generator seeded by ``seed``, ``step`` and the rank, so
        that they do not depend on what ran before (a resumed run draws the same)."""
        if self.hvp == "gaussian_smoothing" and step is not None:
            self._generator = None
            self._generator_seed = _mix(self.seed, step, _rank())
        return super().meta_gradient(model, loss_fn, tasks, step)

    def chunk_meta_gradient(
        self, task: TaskModel, params: Params, rates: Params, data: dict[str, Tensor], *args
    ) -> tuple[tuple[Params, Params], dict[str, Tensor]]:
        if self.hvp == "gaussian_smoothing":
            num_tasks = next(iter(data.values())).shape[0]
            data = {**data, **self._draw_directions(params, num_tasks)}
        return super().chunk_meta_gradient(task, params, rates, data, *args)

    @torch.compiler.disable
    def _draw_directions(self, params: Params, num_tasks: int) -> dict[str, Tensor]:
        """``u ~ N(0, I)`` for each task, inner step and sample, by parameter, from the seeded
        generator: drawn here, outside the vmap over tasks, so that every task gets its own."""
        device = next(iter(params.values())).device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._generator_seed)
        samples = cast(int, self.smoothing_samples)
        return {
            NOISE_KEY + n: torch.randn(
                (num_tasks, self.inner_steps, samples, *p.shape),
                generator=self._generator,
                device=device,
                dtype=p.dtype,
            )
            for n, p in params.items()
        }

    def __getstate__(self) -> dict:
        # A torch.Generator does not pickle on every device; each process seeds its own.
        state = super().__getstate__()
        state["_generator"] = None
        return state


def _rank() -> int:
    """This process's rank under torch.distributed, 0 without it."""
    distributed = torch.distributed
    return (
        distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0
    )


def _mix(*numbers: int) -> int:
    """A 63-bit seed from integers, well spread for neighbouring inputs."""
    digest = hashlib.blake2b(",".join(map(str, numbers)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
