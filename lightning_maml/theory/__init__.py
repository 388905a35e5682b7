"""Fallah et al. 2020's convergence theory as tools: step size, constant estimates, planner.

The callbacks that use them during training are in :mod:`lightning_maml.callbacks`; the
command-line tools are ``lightning-maml estimate`` and ``lightning-maml plan``.
"""

from lightning_maml.theory.constants import THEORY, VARIANTS, SharedConstants, VariantConstants
from lightning_maml.theory.estimate import ConstantEstimates, estimate_constants, pooled_examples
from lightning_maml.theory.linear import LinearTaskFamily
from lightning_maml.theory.plan import Unreachable, VariantPlan, format_plan, plan_variant
from lightning_maml.theory.step_size import (
    local_smoothness,
    step_size_constant,
    task_gradient_norms,
    theory_step_size,
    variant_name,
)

__all__ = [
    "THEORY",
    "VARIANTS",
    "ConstantEstimates",
    "LinearTaskFamily",
    "SharedConstants",
    "Unreachable",
    "VariantConstants",
    "VariantPlan",
    "estimate_constants",
    "format_plan",
    "local_smoothness",
    "plan_variant",
    "pooled_examples",
    "step_size_constant",
    "task_gradient_norms",
    "theory_step_size",
    "variant_name",
]
