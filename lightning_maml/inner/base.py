"""The inner update: which parameters adapt to a task, and with which step sizes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import vjp

from lightning_maml.checks import check_int, check_positive

__all__ = ["InnerUpdate", "StepSizes"]

Params = dict[str, Tensor]
#: One inner step's step size for each adapted parameter (a number, or a tensor that
#: broadcasts against the parameter); parameters that do not adapt are absent.
StepSizes = dict[str, Tensor | float]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in patterns)


class InnerUpdate(nn.Module):
    """Gradient descent on the support set, on the parameters chosen, with a fixed step size.

    ``w_{j+1}[n] = w_j[n] - alpha_j[n] * grad_n f_in(w_j)`` for each adapted parameter ``n``;
    the others keep their value through the inner loop and still receive a meta-gradient (the
    adapted parameters depend on them). This class adapts with the algorithm's ``inner_lr`` on
    every step; subclasses learn the step sizes (:class:`~lightning_maml.inner.MetaSGD`,
    :class:`~lightning_maml.inner.PerStepRates`) or choose the parameters
    (:class:`~lightning_maml.inner.ANIL`, :class:`~lightning_maml.inner.BOIL`). Learned step
    sizes are parameters of this module: :class:`~lightning_maml.MetaLearner` owns it beside the
    model, so that the meta-optimizer, checkpoints, DDP and loggers see them.

    Parameters are chosen by name: ``"classifier"`` means every parameter of the module
    ``classifier`` (``classifier.weight``, ``classifier.bias``), a full name just that one.

    Args:
        adapt: The parameters that adapt (default: all that ``freeze`` leaves).
        freeze: The parameters that do not adapt.

    Raises:
        ValueError: At :meth:`bind`, if a name matches no parameter of the model or no
            parameter is left to adapt.
    """

    #: Whether the step sizes are meta-parameters of this module.
    learns_step_sizes: bool = False
    #: Whether :meth:`params_at` changes the parameters the model computes with.
    changes_params: bool = False

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
        self.adapt = None if adapt is None else list(adapt)
        self.freeze = list(freeze)
        self.inner_lr: float | None = None
        self.inner_steps: int | None = None
        self.adapted: list[str] = []

    # -- set-up ----------------------------------------------------------------------------

    def chosen(self, model: nn.Module) -> list[str]:
        """The names of the model's trainable parameters that adapt, in the model's order."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        for label, patterns in (("adapt", self.adapt or []), ("freeze", self.freeze)):
            unknown = [p for p in patterns if not any(_matches(n, [p]) for n in names)]
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}({label}={unknown}) names no parameter of "
                    f"{type(model).__name__}, whose parameters are {names}."
                )
        chosen = [
            n
            for n in names
            if (self.adapt is None or _matches(n, self.adapt)) and not _matches(n, self.freeze)
        ]
        if not chosen:
            raise ValueError(
                f"{type(self).__name__} leaves no parameter of {type(model).__name__} to adapt "
                f"(adapt={self.adapt}, freeze={self.freeze}): the inner loop would do nothing."
            )
        return chosen

    def bind(self, model: nn.Module, inner_lr: float, inner_steps: int) -> None:
        """Chooses the adapted parameters of ``model`` and creates the learned step sizes.

        Called by :class:`~lightning_maml.MetaLearner` when it is built (so that the
        meta-optimizer sees learned step sizes) and by the algorithm on its first use. A bound
        update keeps its learned values; binding it to a model with other parameters, or to
        another number of steps when its step sizes are per step, raises ``ValueError``.
        """
        owner = getattr(self, "_owner", None)
        if self.learns_step_sizes and owner is not None and owner != id(model):
            raise ValueError(
                f"This {type(self).__name__} already holds the learned step sizes of another "
                "model: give each learner its own inner update (a new one, or "
                "copy.deepcopy(algorithm) before the learned values diverge)."
            )
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.inner_steps = check_int("inner_steps", inner_steps)
        chosen = self.chosen(model)
        if self.adapted and chosen != self.adapted:
            raise ValueError(
                f"{type(self).__name__} is bound to a model whose adapted parameters are "
                f"{self.adapted}; it cannot also serve one with {chosen}: give each learner "
                "its own inner update."
            )
        self.adapted = chosen
        self._owner = id(model)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        self.build({n: shapes[n] for n in chosen}, model)

    def build(self, shapes: dict[str, torch.Size], model: nn.Module) -> None:
        """Creates the learned tensors for the adapted parameters' ``shapes`` (none here)."""

    # -- what the algorithms use -----------------------------------------------------------

    def rates(self) -> Params:
        """The learned tensors by name, detached (the algorithms differentiate them functionally)."""
        return {n: p.detach() for n, p in self.named_parameters()}

    def step_sizes(self, rates: Params, steps: int) -> list[StepSizes]:
        """Each inner step's step sizes, as a pure function of ``rates``.

        Args:
            rates: :meth:`rates`, or tensors of the same names and shapes being differentiated.
            steps: The number of inner steps (evaluation may adapt longer than training).
        """
        if self.inner_lr is None:
            raise RuntimeError(f"{type(self).__name__} is used before bind(model, ...).")
        return [dict.fromkeys(self.adapted, self.inner_lr) for _ in range(steps)]

    def rate_gradient(
        self, rates: Params, steps: int, cotangents: Sequence[dict[str, Tensor]]
    ) -> Params:
        """The gradient of the learned tensors, from the gradient of each step's step sizes.

        Args:
            rates: The learned tensors.
            steps: The number of inner steps.
            cotangents: For each step ``j``, the gradient of the meta-objective with respect to
                ``alpha_j[n]`` spread over the parameter's shape: ``-grad_n f_in(w_j) *
                g_{j+1}[n]`` with ``g_{j+1}`` the meta-gradient at ``w_{j+1}``. It is summed down
                to each step size's own shape here (a scalar step size gets the inner product).
        """
        if not rates:
            return {}
        sizes, pull = vjp(lambda r: self.step_sizes(r, steps), rates)  # type: ignore[misc]  # torch.func.vjp's return type ignores has_aux=False
        shaped = [
            {n: c[n].sum_to_size(torch.as_tensor(s[n]).shape) for n in s}
            for s, c in zip(sizes, cotangents, strict=True)
        ]
        return pull(shaped)[0]

    def params_at(self, rates: Params, step: int, params: Params) -> Params:
        """The parameters the model computes with at inner step ``step`` (here: ``params``).

        The query set after the last of ``k`` steps is scored with ``params_at(rates, k - 1, .)``.
        """
        return params

    def summary(self) -> dict[str, Tensor]:
        """Statistics of the learned step sizes to log, by key (none for fixed ones)."""
        return {}

    def hparams(self) -> dict[str, object]:
        """The update's settings, for run configs."""
        return {"adapt": self.adapt, "freeze": self.freeze}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())


def key(name: str) -> str:
    """A parameter name as a key of an ``nn.ParameterDict`` (which refuses dots)."""
    return name.replace(".", "__")
