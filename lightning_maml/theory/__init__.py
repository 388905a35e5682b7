"""Fallah et al. 2020's convergence theory as tools: step size, constant estimates, planner.

A library of arithmetic on a variant's constants (:class:`VariantConstants`); which constants
belong to which variant is the variant registry's (:mod:`lightning_maml.variants`). The
conditions for N inner steps (after Ji, Yang, Liang 2022) are in
:mod:`lightning_maml.theory.multistep`. The callbacks that use them during training are in
:mod:`lightning_maml.callbacks`; the command-line tools are ``lightning-maml estimate`` and
``lightning-maml plan``.
"""

from lightning_maml.theory.constants import (
    FOMAML_CONSTANTS,
    HFMAML_CONSTANTS,
    MAML_CONSTANTS,
    SHARED,
    SharedConstants,
    VariantConstants,
)
from lightning_maml.theory.estimate import ConstantEstimates, estimate_constants, pooled_examples
from lightning_maml.theory.linear import LinearTaskFamily
from lightning_maml.theory.multistep import (
    curvature_factor,
    hessian_chain_factor,
    inner_lr_bound,
)
from lightning_maml.theory.plan import (
    Unreachable,
    VariantPlan,
    compute_plan,
    explain_plan,
    explain_refusal,
    format_plan,
)
from lightning_maml.theory.step_size import (
    local_smoothness,
    task_gradient_norms,
    theory_step_size,
)

__all__ = [
    "FOMAML_CONSTANTS",
    "HFMAML_CONSTANTS",
    "MAML_CONSTANTS",
    "SHARED",
    "ConstantEstimates",
    "LinearTaskFamily",
    "SharedConstants",
    "Unreachable",
    "VariantConstants",
    "VariantPlan",
    "compute_plan",
    "curvature_factor",
    "estimate_constants",
    "explain_plan",
    "explain_refusal",
    "format_plan",
    "hessian_chain_factor",
    "inner_lr_bound",
    "local_smoothness",
    "pooled_examples",
    "task_gradient_norms",
    "theory_step_size",
]
