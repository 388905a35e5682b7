"""The inner update: which parameters adapt to a task, and with which step sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from lightning_maml.checks import check_int, check_positive
from lightning_maml.functional import pullback
from lightning_maml.inner.parts import (
    Fixed,
    Names,
    PerStepView,
    StepSizeRule,
    StepSizes,
    key,
)

__all__ = ["InnerUpdate", "StepSizes", "key"]

Params = dict[str, Tensor]


class InnerUpdate(nn.Module):
    """Gradient descent on the support set, on the parameters chosen, with a fixed step size.

    ``w_{j+1}[n] = w_j[n] - alpha_j[n] * grad_n f_in(w_j)`` for each adapted parameter ``n``;
    the others keep their value through the inner loop and still receive a meta-gradient (the
    adapted parameters depend on them). This class adapts with the algorithm's ``inner_lr`` on
    every step.

    An update is three parts (:mod:`lightning_maml.inner.parts`): ``select``, which parameters
    adapt (a pure function of the model); ``step_rule``, how the step sizes are parametrised
    (fixed here, learned per element by :class:`~lightning_maml.inner.MetaSGD`, per tensor and
    step by :class:`~lightning_maml.inner.PerStepRates`); and ``per_step_view``, optional
    parameters the model computes with at each step (per-step BatchNorm weights). Binding to a
    model never changes them: it records the adapted names and creates the learned tensors, as
    parameters of this module (``lr.<name>``, ``bn.<name>``), so that
    :class:`~lightning_maml.MetaLearner`, which owns it beside the model, gives them to the
    meta-optimizer, checkpoints, DDP and loggers.

    Parameters are chosen by name: ``"classifier"`` means every parameter of the module
    ``classifier`` (``classifier.weight``, ``classifier.bias``), a full name just that one,
    and ``"<head>"`` the model's last module that owns parameters (so ``freeze=["<head>"]`` is
    :class:`~lightning_maml.inner.BOIL`).

    Args:
        adapt: The parameters that adapt (default: all that ``freeze`` leaves).
        freeze: The parameters that do not adapt.

    Raises:
        ValueError: At :meth:`bind`, if a name matches no parameter of the model or no
            parameter is left to adapt.
    """

    #: Which parameters adapt, as a pure function of the model.
    select: Names
    #: How the step sizes are parametrised.
    step_rule: StepSizeRule = Fixed()
    #: Per-step parameters the model computes with at each inner step, or ``None``.
    per_step_view: PerStepView | None = None

    def __init__(self, adapt: Sequence[str] | None = None, freeze: Sequence[str] = ()) -> None:
        super().__init__()
        for name, value in (("adapt", adapt), ("freeze", freeze)):
            if value is not None and (
                isinstance(value, str) or not all(isinstance(v, str) for v in value)
            ):
                raise ValueError(
                    f"{type(self).__name__}({name}=...) takes a list of parameter or module "
                    f"names, got {value!r}."
                )
        self.select = Names(None if adapt is None else tuple(adapt), tuple(freeze))
        # What binding records (data, not settings).
        self.inner_lr: float | None = None
        self.inner_steps: int | None = None
        self.adapted: list[str] = []
        self.normalized: list[str] = []

    # -- what the parts declare ------------------------------------------------------------

    @property
    def adapt(self) -> list[str] | None:
        """The patterns that adapt (``None``: all that ``freeze`` leaves)."""
        return None if self.select.adapt is None else list(self.select.adapt)

    @property
    def freeze(self) -> list[str]:
        """The patterns that do not adapt."""
        return list(self.select.freeze)

    @property
    def has_rates(self) -> bool:
        """Whether the update has learned tensors (a subclass's own count once it is bound)."""
        return (
            self.step_rule.learned
            or self.per_step_view is not None
            or next(self.parameters(), None) is not None
        )

    # -- set-up ----------------------------------------------------------------------------

    def viewed(self, model: nn.Module) -> list[str]:
        """The names of the parameters that the per-step view replaces (none without one)."""
        if self.per_step_view is None:
            return []
        return self.per_step_view.select(model, type(self).__name__)

    def chosen(self, model: nn.Module) -> list[str]:
        """The names of the model's trainable parameters that adapt, in the model's order: a
        pure function of the model (the parameters the per-step view replaces do not adapt)."""
        owner = type(self).__name__
        viewed = self.viewed(model)
        chosen = [n for n in self.select(model, owner) if n not in viewed]
        if not chosen:
            raise ValueError(
                f"{owner} leaves no parameter of {type(model).__name__} to adapt "
                f"(adapt={self.adapt}, freeze={self.freeze}): the inner loop would do nothing."
            )
        return chosen

    def bind(self, model: nn.Module, inner_lr: float, inner_steps: int) -> None:
        """Records the adapted parameters of ``model`` and creates the learned tensors.

        Called by :class:`~lightning_maml.MetaLearner` when it is built (so that the
        meta-optimizer sees learned tensors) and by the algorithm on its first use. An update
        with learned tensors serves one learner: binding it again raises ``ValueError``, as
        does binding an update without them to a model with other adapted parameters, or with
        another ``inner_lr`` or ``inner_steps``.
        """
        inner_lr = check_positive("inner_lr", inner_lr)
        inner_steps = check_int("inner_steps", inner_steps)
        owner = type(self).__name__
        if self.adapted and self.has_rates:
            raise ValueError(
                f"This {owner} already holds the learned step sizes of a model: give each "
                "learner its own inner update (a new one, or copy.deepcopy(algorithm) before "
                "the first learner is built)."
            )
        chosen = self.chosen(model)
        bound = (self.adapted, self.inner_lr, self.inner_steps)
        if self.adapted and bound != (chosen, inner_lr, inner_steps):
            raise ValueError(
                f"{owner} is bound to a model whose adapted parameters are {self.adapted} "
                f"(inner_lr={self.inner_lr}, inner_steps={self.inner_steps}); it cannot also "
                f"serve one with {chosen} (inner_lr={inner_lr}, inner_steps={inner_steps}): "
                "give each learner its own inner update."
            )
        self.inner_lr, self.inner_steps, self.adapted = inner_lr, inner_steps, chosen
        self.normalized = self.viewed(model)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        self.build({n: shapes[n] for n in chosen}, model)

    def build(self, shapes: dict[str, torch.Size], model: nn.Module) -> None:
        """Creates the learned tensors of the parts for the adapted parameters' ``shapes``."""
        like = dict(model.named_parameters())
        # bind sets both before it builds.
        inner_lr, inner_steps = cast(float, self.inner_lr), cast(int, self.inner_steps)
        learned = self.step_rule.init({n: like[n].detach() for n in shapes}, inner_lr, inner_steps)
        self.lr = nn.ParameterDict({key(n): nn.Parameter(t) for n, t in learned.items()})
        if self.per_step_view is not None:
            offsets = self.per_step_view.init(
                {n: like[n].detach() for n in self.normalized}, inner_steps
            )
            self.bn = nn.ParameterDict({key(n): nn.Parameter(t) for n, t in offsets.items()})

    # -- what the algorithms use -----------------------------------------------------------

    def rates(self) -> Params:
        """The learned tensors by name, detached (the algorithms differentiate them functionally)."""
        return {n: p.detach() for n, p in self.named_parameters()}

    def step_sizes(self, rates: Params, steps: int) -> list[StepSizes]:
        """Each inner step's step sizes, as a pure function of ``rates``.

        Args:
            rates: :meth:`rates`, or tensors of the same names and shapes being differentiated.
            steps: The number of inner steps (evaluation may adapt longer than training).

        Raises:
            ValueError: If the learned tensors are per step and ``steps`` is another number.
        """
        if self.inner_lr is None:
            raise RuntimeError(f"{type(self).__name__} is used before bind(model, ...).")
        per_step = self.step_rule.per_step or self.per_step_view is not None
        if per_step and steps != self.inner_steps:
            raise ValueError(
                f"{type(self).__name__} learned per-step parameters for {self.inner_steps} "
                f"inner steps and cannot adapt {steps}: evaluate with eval_inner_steps="
                f"{self.inner_steps} (or leave it unset)."
            )
        return self.step_rule(_part(rates, "lr", self.adapted), self.adapted, self.inner_lr, steps)

    def rate_gradient(
        self, rates: Params, steps: int, cotangents: Sequence[dict[str, Tensor]]
    ) -> Params:
        """The gradient of the learned tensors, from the gradient of each step's step sizes.

        Args:
            rates: The learned tensors.
            steps: The number of inner steps.
            cotangents: For each step ``j``, the gradient of the meta-objective with respect to
                ``alpha_j[n]`` spread over the parameter's shape: ``-grad_n f_in(w_j) *
                g_{j+1}[n]`` with ``g_{j+1}`` the meta-gradient at ``w_{j+1}``. Each step size is
                broadcast to that shape, so that its gradient is summed down to its own shape
                (a scalar step size gets the inner product).
        """

        def spread(r: Params) -> list[Params]:
            sizes = self.step_sizes(r, steps)
            return [
                {n: torch.broadcast_to(cast(Tensor, s[n]), c[n].shape) for n in s}
                for s, c in zip(sizes, cotangents, strict=True)
            ]

        return pullback(spread, rates, list(cotangents))

    def params_at(self, rates: Params, step: int, params: Params) -> Params:
        """The parameters the model computes with at inner step ``step``: ``params`` through the
        view, if any. The query set after ``k`` steps is scored with ``params_at(rates, k - 1, .)``.
        """
        if self.per_step_view is None:
            return params
        return self.per_step_view(_part(rates, "bn", self.normalized), step, params)

    def summary(self) -> dict[str, Tensor]:
        """Statistics of the learned step sizes to log, by key (none for fixed ones)."""
        return self.step_rule.summary(_part(self.rates(), "lr", self.adapted), self.adapted)

    def hparams(self) -> dict[str, object]:
        """The update's settings, for run configs."""
        return {"adapt": self.adapt, "freeze": self.freeze}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())


def _part(rates: Params, prefix: str, names: Sequence[str]) -> Params:
    """The learned tensors of one part (``lr``, ``bn``) by parameter name; none when it has none."""
    return {n: rates[f"{prefix}.{key(n)}"] for n in names if f"{prefix}.{key(n)}" in rates}
