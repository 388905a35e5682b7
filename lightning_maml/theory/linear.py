"""The MAML objective of the linear-regression task family, in closed form.

The family is ``lightning_maml.datamodules.LinearTasks``: task ``i`` has input variances
``a_i ~ U[low, high]^d``, inputs ``x ~ N(0, diag(a_i))`` and the true weight
``theta_i = center + spread * (a_i - mean) / std`` (mean and standard deviation of
``U[low, high]``). With the model ``x -> w . x`` and the loss ``"mse"`` (no 1/2), each task loss
is the quadratic

    f_i(w) = (w - theta_i)^T diag(a_i) (w - theta_i) + noise_std^2,

so ``hess f_i = 2 diag(a_i)``, ``L = 2 high`` and ``rho = 0``. After k inner steps of size alpha,
``u_i - theta_i = (I - 2 alpha A_i)^k (w - theta_i)``, and, coordinate by coordinate (they are
independent and identically distributed),

    F(w)      = sum_j E_a[ a (1 - 2 alpha a)^(2k) (w_j - theta(a))^2 ] + noise_std^2
    grad F(w) = 2 E_a[ a (1 - 2 alpha a)^(2k) (w - theta(a)) ],

expectations of polynomials in ``a ~ U[low, high]``, computed exactly. First-order MAML's
population update is ``2 E_a[a (1 - 2 alpha a)^k (w - theta(a))]``: its fixed point differs from
MAML's because ``theta`` depends on ``a``, and ``||grad F||`` there is the floor it cannot go below.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import Polynomial
from numpy.typing import ArrayLike

__all__ = ["LinearTaskFamily"]


@dataclass(frozen=True)
class LinearTaskFamily:
    """Exact F, grad F, optima and constants of the linear task family.

    The arguments are those of ``lightning_maml.datamodules.LinearTasks`` of the same name.

    Args:
        dim: Input dimension d.
        spread: Standard deviation s of each coordinate of the true weight.
        curvature_range: ``(low, high)`` of the input variances.
        center: Mean of each coordinate of the true weight.
        noise_std: Standard deviation of the label noise.
    """

    dim: int = 10
    spread: float = 1.0
    curvature_range: tuple[float, float] = (0.2, 2.0)
    center: float = 1.0
    noise_std: float = 0.0

    @property
    def L(self) -> float:
        """The smoothness constant of every task loss: ``2 * high`` (Hessian ``2 diag(a)``)."""
        return 2.0 * self.curvature_range[1]

    @property
    def rho(self) -> float:
        """The Hessian-Lipschitz constant: 0 (quadratic losses)."""
        return 0.0

    def _expect(self, p: Polynomial) -> float:
        """``E[p(a)]`` for ``a ~ U[low, high]``."""
        low, high = self.curvature_range
        if low == high:
            return float(p(low))
        antiderivative = p.integ()
        return float((antiderivative(high) - antiderivative(low)) / (high - low))

    def _theta(self) -> Polynomial:
        """``theta(a) = center + spread (a - mean) / std`` as a polynomial in a."""
        low, high = self.curvature_range
        std = (high - low) / math.sqrt(12.0) or 1.0
        slope = self.spread / std
        return Polynomial([self.center - slope * (low + high) / 2, slope])

    def _adapted_weight(self, inner_lr: float, power: int) -> Polynomial:
        """``a (1 - 2 alpha a)^power``."""
        return Polynomial([0.0, 1.0]) * Polynomial([1.0, -2.0 * inner_lr]) ** power

    def _weighted_mean_theta(self, weight: Polynomial) -> float:
        return self._expect(weight * self._theta()) / self._expect(weight)

    def F(self, w: ArrayLike, inner_lr: float, inner_steps: int = 1) -> float:
        """The MAML objective ``F(w) = E_i[f_i(u_i)]`` after ``inner_steps`` exact inner steps."""
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        m, theta = self._adapted_weight(inner_lr, 2 * inner_steps), self._theta()
        per_coordinate = [self._expect(m * (Polynomial([wj]) - theta) ** 2) for wj in w]
        return float(sum(per_coordinate)) + self.noise_std**2

    @functools.cache  # noqa: B019 (frozen, hashable instances; a handful of inner_lr values)
    def _grad_F_affine(self, inner_lr: float, inner_steps: int) -> tuple[float, float]:
        """``grad F(w) = slope * w - offset``, coordinate-wise: F is a quadratic."""
        m = self._adapted_weight(inner_lr, 2 * inner_steps)
        return 2.0 * self._expect(m), 2.0 * self._expect(m * self._theta())

    def grad_F(self, w: ArrayLike, inner_lr: float, inner_steps: int = 1) -> np.ndarray:
        """The exact gradient of :meth:`F` (what MAML's meta-gradient estimates without bias)."""
        slope, offset = self._grad_F_affine(inner_lr, inner_steps)
        return slope * np.asarray(w, dtype=np.float64).reshape(-1) - offset

    def grad_F_norm(self, w: ArrayLike, inner_lr: float, inner_steps: int = 1) -> float:
        """``||grad F(w)||``, the paper's measure of stationarity."""
        return float(np.linalg.norm(self.grad_F(w, inner_lr, inner_steps)))

    def maml_optimum(self, inner_lr: float, inner_steps: int = 1) -> np.ndarray:
        """The minimiser of F, where ``grad F = 0``."""
        m = self._adapted_weight(inner_lr, 2 * inner_steps)
        return np.full(self.dim, self._weighted_mean_theta(m))

    def fomaml_fixed_point(self, inner_lr: float, inner_steps: int = 1) -> np.ndarray:
        """Where first-order MAML's expected update vanishes: ``E_a[a (1 - 2 alpha a)^k (w - theta)] = 0``.

        Exact for one inner step; with more, the sampled inner gradients make FO-MAML's
        expected update differ slightly from this population value.
        """
        return np.full(
            self.dim, self._weighted_mean_theta(self._adapted_weight(inner_lr, inner_steps))
        )

    def fomaml_floor(self, inner_lr: float, inner_steps: int = 1) -> float:
        """``||grad F||`` at FO-MAML's fixed point: the level it cannot go below."""
        return self.grad_F_norm(
            self.fomaml_fixed_point(inner_lr, inner_steps), inner_lr, inner_steps
        )

    def sigma(self, w: ArrayLike) -> float:
        """The task-gradient spread ``sqrt(E_i ||grad f_i(w) - grad f(w)||^2)`` at ``w`` (A4).

        On this family it grows with ``||w||``, so A4 holds only locally: evaluate it where the
        iterates are (e.g. at :meth:`maml_optimum`).
        """
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        a, theta = Polynomial([0.0, 1.0]), self._theta()
        # grad f_i(w)_j = 2 a (w_j - theta(a)); its variance over a, summed over coordinates.
        return math.sqrt(
            sum(
                self._expect((2 * a * (Polynomial([wj]) - theta)) ** 2)
                - self._expect(2 * a * (Polynomial([wj]) - theta)) ** 2
                for wj in w
            )
        )
