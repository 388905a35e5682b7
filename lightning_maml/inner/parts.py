"""The parts an inner update is made of: which parameters adapt, how the step sizes are
parametrised, and an optional per-step view of the parameters.

Each part is a small immutable value with one job, in the spirit of optax's ``chain`` and
``multi_transform``: selecting parameters is a pure function of the model, creating learned
tensors a pure function of the adapted parameters, and using them a pure function of the tensors
(which the meta-gradients differentiate). :class:`~lightning_maml.inner.InnerUpdate` combines
one of each; a new inner update is a new part, or a new combination of these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "HEAD",
    "Fixed",
    "Names",
    "PerElement",
    "PerStepBatchNorm",
    "PerStepView",
    "PerTensorPerStep",
    "StepSizeRule",
    "StepSizes",
    "head_of",
    "key",
]

Params = dict[str, Tensor]
#: One inner step's step size for each adapted parameter (a number, or a tensor that
#: broadcasts against the parameter); parameters that do not adapt are absent.
StepSizes = dict[str, Tensor | float]

#: A name pattern that stands for the model's head: its last module that owns parameters.
HEAD = "<head>"


def key(name: str) -> str:
    """A parameter name as a key of an ``nn.ParameterDict`` (which refuses dots)."""
    return name.replace(".", "__")


def head_of(model: nn.Module) -> str:
    """The name of the model's last module that owns parameters (its classifier, say)."""
    owners = [
        n for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None
    ]
    if not owners or owners[-1] == "":
        raise ValueError(
            f"{type(model).__name__} has no submodule owning parameters to call its head: name "
            "the head's parameters with head=[...]."
        )
    return owners[-1]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in patterns)


# -- which parameters adapt ----------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """Selects the model's trainable parameters by name: those ``adapt`` names, less ``freeze``.

    ``"classifier"`` means every parameter of the module ``classifier``, a full name just that
    one, and :data:`HEAD` the model's head. ``Names()`` selects all; ``Names(adapt=(HEAD,))``
    is ANIL's choice, ``Names(freeze=(HEAD,))`` BOIL's.

    Attributes:
        adapt: The patterns that adapt (``None``: all that ``freeze`` leaves).
        freeze: The patterns that do not adapt.
    """

    adapt: tuple[str, ...] | None = None
    freeze: tuple[str, ...] = ()

    def __call__(self, model: nn.Module, owner: str = "InnerUpdate") -> list[str]:
        """The selected names, in the model's order; ``owner`` names the update in errors.

        Raises:
            ValueError: If a pattern matches no trainable parameter.
        """
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        patterns = {}
        for label, given in (("adapt", self.adapt or ()), ("freeze", self.freeze)):
            resolved = [head_of(model) if p == HEAD else p for p in given]
            unknown = [p for p in resolved if not any(_matches(n, [p]) for n in names)]
            if unknown:
                raise ValueError(
                    f"{owner}({label}={unknown}) names no parameter of {type(model).__name__}, "
                    f"whose parameters are {names}."
                )
            patterns[label] = resolved
        return [
            n
            for n in names
            if (self.adapt is None or _matches(n, patterns["adapt"]))
            and not _matches(n, patterns["freeze"])
        ]


# -- how the step sizes are parametrised -----------------------------------------------------


class StepSizeRule(Protocol):
    """How the step sizes of the adapted parameters are made from learned tensors.

    ``init`` creates the learned tensors from the adapted parameters (by parameter name; none
    for fixed step sizes) and ``__call__`` maps them to each step's step sizes, as a pure
    function that every meta-gradient differentiates.
    """

    #: Whether the step sizes are learned (``init`` creates tensors).
    learned: ClassVar[bool]
    #: Whether the rule has one step size per inner step (which fixes the number of steps).
    per_step: ClassVar[bool]

    def init(self, like: Params, inner_lr: float, inner_steps: int) -> Params: ...

    def __call__(
        self, rates: Params, names: Sequence[str], inner_lr: float, steps: int
    ) -> list[StepSizes]: ...

    def summary(self, rates: Params, names: Sequence[str]) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class Fixed:
    """The algorithm's ``inner_lr`` for every adapted parameter on every step; nothing learned."""

    learned: ClassVar[bool] = False
    per_step: ClassVar[bool] = False

    def init(self, like: Params, inner_lr: float, inner_steps: int) -> Params:
        return {}

    def __call__(
        self, rates: Params, names: Sequence[str], inner_lr: float, steps: int
    ) -> list[StepSizes]:
        return [dict.fromkeys(names, inner_lr) for _ in range(steps)]

    def summary(self, rates: Params, names: Sequence[str]) -> dict[str, Tensor]:
        return {}


@dataclass(frozen=True)
class PerElement:
    """A learned step size for every element of every adapted parameter, the same on every
    step, starting at ``inner_lr`` (Meta-SGD)."""

    learned: ClassVar[bool] = True
    per_step: ClassVar[bool] = False

    def init(self, like: Params, inner_lr: float, inner_steps: int) -> Params:
        return {n: torch.full_like(p, inner_lr) for n, p in like.items()}

    def __call__(
        self, rates: Params, names: Sequence[str], inner_lr: float, steps: int
    ) -> list[StepSizes]:
        return [{n: rates[n] for n in names}] * steps

    def summary(self, rates: Params, names: Sequence[str]) -> dict[str, Tensor]:
        return {f"inner_lr/{n}": rates[n].mean() for n in names}


@dataclass(frozen=True)
class PerTensorPerStep:
    """A learned scalar step size per adapted parameter tensor and per inner step, starting at
    ``inner_lr`` (MAML++'s LSLR)."""

    learned: ClassVar[bool] = True
    per_step: ClassVar[bool] = True

    def init(self, like: Params, inner_lr: float, inner_steps: int) -> Params:
        return {n: p.new_full((inner_steps,), inner_lr) for n, p in like.items()}

    def __call__(
        self, rates: Params, names: Sequence[str], inner_lr: float, steps: int
    ) -> list[StepSizes]:
        return [{n: rates[n][j] for n in names} for j in range(steps)]

    def summary(self, rates: Params, names: Sequence[str]) -> dict[str, Tensor]:
        return {f"inner_lr/{n}": rates[n] for n in names}


# -- an optional per-step view ---------------------------------------------------------------


class PerStepView(Protocol):
    """Per-step parameters that the model computes with at each inner step, in place of some
    of its own; those parameters then do not adapt. It fixes the number of inner steps."""

    #: What the view is, for messages (``"per-step BatchNorm weights (batch_norm=True)"``).
    description: ClassVar[str]

    def select(self, model: nn.Module, owner: str) -> list[str]: ...

    def init(self, like: Params, inner_steps: int) -> Params: ...

    def __call__(self, offsets: Params, step: int, params: Params) -> Params: ...


def batch_norm_parameters(model: nn.Module) -> list[str]:
    """The names of the affine parameters of the model's BatchNorm layers."""
    return [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]


@dataclass(frozen=True)
class PerStepBatchNorm:
    """Per-step BatchNorm weights and biases ``b_j = b + delta_j``: the model's own plus a
    learned offset per step, starting at 0 (MAML++'s BNWB, written so that the model keeps its
    parameters)."""

    description: ClassVar[str] = "per-step BatchNorm weights (batch_norm=True)"

    def select(self, model: nn.Module, owner: str) -> list[str]:
        names = batch_norm_parameters(model)
        if not names:
            raise ValueError(
                f"{owner}(batch_norm=True): {type(model).__name__} has no BatchNorm layer with "
                "affine parameters; set batch_norm=False."
            )
        return names

    def init(self, like: Params, inner_steps: int) -> Params:
        return {n: p.new_zeros(inner_steps, *p.shape) for n, p in like.items()}

    def __call__(self, offsets: Params, step: int, params: Params) -> Params:
        return {**params, **{n: params[n] + offsets[n][step] for n in offsets}}
