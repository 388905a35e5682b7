"""The constants of Fallah et al. 2020's theorems, in one place and each one a parameter.

They come from a secondary summary of the paper and could not be checked against its text, so
every one of them is a dataclass field with the published value as its default: a user who reads
a different value in the paper passes it (``dataclasses.replace(MAML_CONSTANTS, step_size=...)``)
rather than editing code. Which variant each theorem belongs to is the variant registry's
(:mod:`lightning_maml.variants`): the theory library knows constants, not variant names.

References:
    A. Fallah, A. Mokhtari, A. Ozdaglar. On the Convergence Theory of Gradient-Based
    Model-Agnostic Meta-Learning Algorithms. AISTATS 2020.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "FOMAML_CONSTANTS",
    "HFMAML_CONSTANTS",
    "MAML_CONSTANTS",
    "SHARED",
    "SharedConstants",
    "VariantConstants",
]


@dataclass(frozen=True)
class VariantConstants:
    """The constants of one variant's convergence theorem (Fallah et al. 2020).

    Attributes:
        step_size: c of the step size ``beta_k = c / L~(w_k)``.
        inner_lr_factor: The theorem needs ``inner_lr <= inner_lr_factor / L``.
        error_sqrt: a of the error term ``sqrt(a (1 + rho alpha sigma / L) S)``.
        error_linear: b of the error term ``b rho alpha S / L``.
        hessian_batch: h of ``D_h >= ceil(h (alpha sigma_H)^2)``; ``None`` for a variant that
            takes no Hessian term.
        bias: FO-MAML's ``S`` gains ``bias * alpha^2 L^2 sigma^2``, which no batch size
            removes; 0 for the variants whose estimate of grad F is unbiased.
        finite_difference: Whether the Hessian-vector products are finite differences whose
            step the theorem sets, ``delta_i = 1 / (delta_denominator rho alpha ||v_i||)``
            (HF-MAML).
    """

    step_size: float
    inner_lr_factor: float
    error_sqrt: float
    error_linear: float
    hessian_batch: float | None = None
    bias: float = 0.0
    finite_difference: bool = False


@dataclass(frozen=True)
class SharedConstants:
    """The batch-size and delta constants that all variants share (Fallah et al. 2020).

    Attributes:
        min_task_batch: ``B >= min_task_batch`` tasks per step.
        step_task_batch: ``B' >= ceil(step_task_batch * (rho alpha sigma / L)^2)``, the tasks of
            the step-size estimate.
        step_data_batch: ``D_beta >= ceil((step_data_batch * rho alpha sigma_tilde / L)^2)``, the
            examples per task of the step-size estimate.
        delta_denominator: HF-MAML's ``delta_i = 1 / (delta_denominator * rho alpha ||v_i||)``.
    """

    min_task_batch: int = 20
    step_task_batch: float = 0.5
    step_data_batch: float = 2.0
    delta_denominator: float = 6.0


#: MAML's theorem (Fallah et al. 2020).
MAML_CONSTANTS = VariantConstants(
    step_size=1 / 12, inner_lr_factor=1.0, error_sqrt=61.0, error_linear=61.0, hessian_batch=2.0
)
#: FO-MAML's theorem. The summary gives its error bound only as MAML's with S enlarged by the
#: bias term, so it reuses MAML's 61 and 61.
FOMAML_CONSTANTS = VariantConstants(
    step_size=1 / 18, inner_lr_factor=1 / 10, error_sqrt=61.0, error_linear=61.0, bias=20.0
)
#: HF-MAML's theorem.
HFMAML_CONSTANTS = VariantConstants(
    step_size=1 / 25,
    inner_lr_factor=1 / 6,
    error_sqrt=6.0,
    error_linear=36.0,
    hessian_batch=36.0,
    finite_difference=True,
)

#: The shared constants with the published values.
SHARED = SharedConstants()
