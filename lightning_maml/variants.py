"""The registry of the MAML family: one entry per variant, read by every part that names one.

A variant is an algorithm class, optionally with an inner update, plus what the rest of the
project needs to know of it: a display title and colour, the constants of its convergence theorem
where Fallah et al. 2020 cover it, how the recipe generator writes its recipes, and its rows in
``benchmarks/speed.py``. The planner (``lightning-maml plan``), the theory experiment, the
theory step size, the recipe generator and the speed benchmark all read this registry, so a new
member is one class and one :func:`register` call (higher's optimizer mapping is the model)::

    from lightning_maml.variants import Recipe, Variant, register

    register(
        Variant(
            name="mymaml",
            title="My-MAML",
            algorithm=MyMAML,  # a MetaAlgorithm subclass
            recipes={"omniglot/5w1s": Recipe()},  # recipes/generate.py writes this recipe
        )
    )

This module sits above the algorithms and below the learner: the theory library stays free of
variant names and takes a variant's :class:`~lightning_maml.theory.VariantConstants` instead.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_maml.algorithms import FOMAML, HFMAML, MAML, MAMLPlusPlus, MetaAlgorithm, Reptile
from lightning_maml.inner import ANIL, BOIL, InnerUpdate, MetaSGD, PerStepRates
from lightning_maml.theory.constants import (
    FOMAML_CONSTANTS,
    HFMAML_CONSTANTS,
    MAML_CONSTANTS,
    VariantConstants,
)

__all__ = [
    "Recipe",
    "SpeedRow",
    "Variant",
    "get",
    "has_batch_norm",
    "names",
    "register",
    "theory_constants",
    "unregister",
    "variant_of",
    "variants",
]

#: A variant's name: lower case, as it appears in recipe file names and on command lines.
NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Recipe:
    """How ``recipes/generate.py`` writes a variant's recipe on one benchmark setting.

    The generator starts from the benchmark's setting (Finn et al.'s for Omniglot and
    mini-ImageNet) and applies these changes.

    Attributes:
        source: Header lines on where the settings come from (default: the benchmark's).
        notes: More header lines, after the source.
        setting: Changes to the benchmark's setting, by field name (``inner_lr``,
            ``inner_steps``, ``eval_inner_steps``, ``query_shots``, ``hidden``,
            ``meta_batch_size``, ``ddp_devices``, ``max_steps``).
        algorithm: More ``init_args`` of the algorithm, after ``inner_lr`` and ``inner_steps``.
        meta_optimizer: The learner's ``meta_optimizer`` (default: Adam, lr 1e-3).
        lr_scheduler: The learner's ``lr_scheduler`` (default: none).
        optimizer_text: The header's words for the meta-optimizer and its schedule.
    """

    source: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    setting: Mapping[str, object] = field(default_factory=dict)
    algorithm: Mapping[str, object] = field(default_factory=dict)
    meta_optimizer: Mapping[str, object] | None = None
    lr_scheduler: Mapping[str, object] | None = None
    optimizer_text: str = "Adam 1e-3"


@dataclass(frozen=True)
class SpeedRow:
    """One row of ``benchmarks/speed.py``: the variant built with some changes.

    Attributes:
        label: The row's name (``--variants`` takes it).
        options: More arguments of the algorithm (``backward="recursion"``, say).
        algorithm: Another algorithm class (default: the variant's).
        inner_update: Builds the row's inner update for the benchmark's model (default: the
            variant's own).
        family: Whether ``--variants family`` runs it.
    """

    label: str
    options: Mapping[str, object] = field(default_factory=dict)
    algorithm: type[MetaAlgorithm] | None = None
    inner_update: Callable[[nn.Module], InnerUpdate] | None = None
    family: bool = True


@dataclass(frozen=True)
class Variant:
    """One member of the MAML family and all that the project's parts need to know of it.

    Attributes:
        name: Lower case, as in recipe file names and ``lightning-maml plan --variants``.
        title: Its display name in printed plans and figures (``"FO-MAML"``).
        algorithm: How the meta-gradient is formed (a :class:`MetaAlgorithm` subclass).
        inner_update: What the inner loop does, when the variant is an algorithm plus an inner
            update (ANIL is MAML with :class:`~lightning_maml.inner.ANIL`); ``None`` for the
            algorithm's own default.
        inner_update_args: The inner update's arguments.
        description: What the variant is, with its paper, for recipe headers (default: the
            title).
        theory: The constants of its convergence theorem (Fallah et al. 2020), or ``None``
            where the theory does not cover it.
        color: Its matplotlib colour in figures.
        recipes: Where ``recipes/generate.py`` writes its recipes: a ``"benchmark/shape"``
            pattern (``"omniglot/5w1s"``, ``"*"`` for every setting) to the changes it makes
            there; the first matching pattern wins.
        speed: Its rows in ``benchmarks/speed.py`` (default: one row named by the title).
    """

    name: str
    title: str
    algorithm: type[MetaAlgorithm]
    inner_update: type[InnerUpdate] | None = None
    inner_update_args: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    theory: VariantConstants | None = None
    color: str = "tab:gray"
    recipes: Mapping[str, Recipe] = field(default_factory=dict)
    speed: tuple[SpeedRow, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise ValueError(
                f"Variant name {self.name!r} must be lower case letters, digits and '_', "
                "starting with a letter (it names recipe files and command-line choices)."
            )
        if not isinstance(self.title, str) or not self.title.strip():
            raise ValueError(f"Variant {self.name!r} needs a non-empty title, got {self.title!r}.")
        if not (isinstance(self.algorithm, type) and issubclass(self.algorithm, MetaAlgorithm)):
            raise ValueError(
                f"Variant {self.name!r}: algorithm must be a MetaAlgorithm subclass (the class, "
                f"not an instance), got {self.algorithm!r}."
            )
        if self.inner_update is not None and not (
            isinstance(self.inner_update, type) and issubclass(self.inner_update, InnerUpdate)
        ):
            raise ValueError(
                f"Variant {self.name!r}: inner_update must be an InnerUpdate subclass or None, "
                f"got {self.inner_update!r}."
            )
        if self.theory is not None and not isinstance(self.theory, VariantConstants):
            raise ValueError(
                f"Variant {self.name!r}: theory must be a VariantConstants or None, got "
                f"{type(self.theory).__name__}."
            )
        labels = [row.label for row in self.speed_rows]
        if len(set(labels)) != len(labels):
            raise ValueError(f"Variant {self.name!r} has speed rows of the same label: {labels}.")

    @property
    def constants(self) -> VariantConstants:
        """:attr:`theory`, for a variant the theory covers.

        Raises:
            ValueError: If the theory does not cover this variant.
        """
        if self.theory is None:
            covered = ", ".join(v.name for v in variants(theory=True))
            raise ValueError(
                f"Fallah et al. 2020's theory does not cover {self.title} ({self.name!r}); it "
                f"covers {covered}."
            )
        return self.theory

    @property
    def speed_rows(self) -> tuple[SpeedRow, ...]:
        """Its rows in ``benchmarks/speed.py``: :attr:`speed`, or one row named by the title."""
        return self.speed or (SpeedRow(self.title),)

    def new_inner_update(self) -> InnerUpdate | None:
        """A fresh inner update of this variant (an update is bound to one model), or ``None``."""
        if self.inner_update is None:
            return None
        return self.inner_update(**self.inner_update_args)

    def build(self, inner_lr: float, **options: Any) -> MetaAlgorithm:
        """The variant's algorithm with a fresh inner update; ``options`` go to its class."""
        update = self.new_inner_update()
        if update is not None and "inner_update" not in options:
            options["inner_update"] = update
        return self.algorithm(inner_lr, **options)

    def recipe_for(self, benchmark: str, shape: str) -> Recipe | None:
        """The changes its recipe makes on ``benchmark`` at ``shape`` (``"5w1s"``), or ``None``
        where it has no recipe."""
        setting = f"{benchmark}/{shape}"
        return next(
            (r for pattern, r in self.recipes.items() if fnmatch.fnmatchcase(setting, pattern)),
            None,
        )


_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant, *, replace: bool = False) -> Variant:
    """Adds ``variant`` to the registry, where every part of the project finds it.

    Args:
        variant: The entry.
        replace: Replace an entry of the same name instead of refusing it.

    Returns:
        The entry.

    Raises:
        ValueError: If the name, or a speed row's label, is taken (and ``replace`` is false).
    """
    if not isinstance(variant, Variant):
        raise ValueError(
            f"register() takes a Variant(name=..., title=..., algorithm=...), got "
            f"{type(variant).__name__}."
        )
    if variant.name in _REGISTRY and not replace:
        raise ValueError(
            f"A variant named {variant.name!r} is registered already: choose another name, "
            "unregister it first, or pass replace=True."
        )
    others = {
        row.label: other.name
        for other in _REGISTRY.values()
        if other.name != variant.name
        for row in other.speed_rows
    }
    for row in variant.speed_rows:
        if row.label in others:
            raise ValueError(
                f"Variant {variant.name!r}: the speed row {row.label!r} is variant "
                f"{others[row.label]!r}'s already; give SpeedRow another label."
            )
    _REGISTRY[variant.name] = variant
    return variant


def unregister(name: str) -> Variant:
    """Removes the variant ``name`` from the registry and returns its entry."""
    return _REGISTRY.pop(get(name).name)


def get(name: str) -> Variant:
    """The registered variant ``name``.

    Raises:
        ValueError: For a name that is not registered; the message lists those that are.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown variant {name!r}: use one of {names()}.")
    return _REGISTRY[name]


def variants(*, theory: bool = False) -> list[Variant]:
    """The registered variants in registration order; only those the theory covers with
    ``theory=True``."""
    return [v for v in _REGISTRY.values() if not theory or v.theory is not None]


def names(*, theory: bool = False) -> list[str]:
    """The names of :func:`variants`."""
    return [v.name for v in variants(theory=theory)]


def variant_of(algorithm: MetaAlgorithm) -> Variant | None:
    """The registered variant an algorithm object is, or ``None``.

    An entry with an inner update matches an algorithm of its class with an inner update of
    that class (MAML with ANIL is ``"anil"``); otherwise the entry of the algorithm's class
    without one (MAML with any other update is ``"maml"``).
    """
    update = type(getattr(algorithm, "inner_update", None))
    same_class = [v for v in _REGISTRY.values() if v.algorithm is type(algorithm)]
    return next((v for v in same_class if v.inner_update is update), None) or next(
        (v for v in same_class if v.inner_update is None), None
    )


def theory_constants(algorithm: MetaAlgorithm) -> VariantConstants:
    """The constants of the theorem that covers an algorithm object (Fallah et al. 2020).

    The theorems assume one fixed step size on every parameter: an inner update that learns
    step sizes or adapts only some parameters is outside them, whatever the algorithm.

    Raises:
        ValueError: For an algorithm, or an inner update, that the theory does not cover.
    """
    variant = variant_of(algorithm)
    update = getattr(algorithm, "inner_update", None)
    plain = type(update) is InnerUpdate and update.hparams() == InnerUpdate().hparams()
    if variant is None or variant.theory is None or not plain:
        titles = [v.algorithm.__name__ for v in variants(theory=True)]
        covered = " and ".join([", ".join(titles[:-1]), titles[-1]] if titles[1:] else titles)
        raise ValueError(
            f"The theory covers {covered} with one fixed inner step size on every parameter, "
            f"not {algorithm!r}: pass the step-size constant c explicitly."
        )
    return variant.theory


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer (for per-step BatchNorm weights)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# -- the family ------------------------------------------------------------------------------

#: The settings of the recipes of ANIL, Meta-SGD and MAML++.
FAMILY_SETTINGS = ("omniglot/5w1s", "miniimagenet/5w1s")

HFMAML_NOTES = (
    "delta_scale 0.3: ReLU and max-pool kinks, not rounding or curvature, set the finite",
    "          difference's error on these nets; it was lowest near 0.3 (benchmarks/README.md,",
    "          gradient fidelity).",
)
ANIL_SOURCE = (
    "Settings: Raghu et al. 2020 (ANIL) keep MAML's (Finn et al. 2017), the head adapting alone.",
)
METASGD_SOURCE = (
    "Settings: Li et al. 2017 (Meta-SGD): one inner step with a learned step size per parameter",
    "          element, otherwise MAML's (Finn et al. 2017); the step sizes start at inner_lr here",
    "          (Li et al. draw them in [0.005, 0.1]).",
)
MAMLPP_SOURCE = (
    "Settings: Antoniou et al. 2019 (MAML++), as in the authors' released configuration:",
    "          5 inner steps with learned per-layer per-step step sizes and per-step BatchNorm",
    "          weights, the multi-step loss over the first 10 epochs of 500 steps (at least",
    "          0.01 / k per step), second order throughout.",
)
MAMLPP_STEPS = 50000
MAMLPP_ALGORITHM = {"first_order_steps": 0, "min_step_weight": 0.01}
BOIL_SOURCE = (
    "Settings: Oh et al. 2021 (BOIL), their 4conv ones: the head fixed in the inner loop, the",
    "          body adapting with inner_lr 0.5, 1 inner step in training and test, meta-batch 4,",
    "          15 query images per class, Adam 1e-3, 300 x 100 meta-steps. They report no",
    "          Omniglot figure: these are their settings for mini-ImageNet and the other",
    "          benchmarks, on Omniglot's split and net (as the MAML recipe's).",
)
REPTILE_STEPS = 100000
REPTILE_SOURCE = (
    "Settings: Nichol et al. 2018 (Reptile), their Omniglot 5-way 1-shot run where this",
    "          implementation has it: 5 inner steps (50 at test), meta-batch 5, the meta step",
    "          (SGD's lr) 1.0 annealed linearly to 0 over 100,000 meta-steps. Theirs, not here:",
    "          Adam (beta1 = 0, lr 1e-3) on mini-batches of 10 images in the inner loop, 10-shot",
    "          training tasks, stride-2 convolutions; here plain steps of inner_lr 0.1 (this",
    "          project's choice) on the whole support set, 1-shot training tasks, the MAML net.",
    "Protocol: transductive, as every recipe here (BatchNorm normalises a task's query images",
    "          with their own statistics, scored as one batch): compare with their 'Reptile +",
    "          Transduction', not 'Reptile' (each query image scored alone with the support set).",
)

for _variant in (
    Variant(
        name="maml",
        title="MAML",
        algorithm=MAML,
        description="MAML (second-order meta-gradient, Finn et al. 2017)",
        theory=MAML_CONSTANTS,
        color="tab:blue",
        recipes={"*": Recipe()},
        speed=(
            SpeedRow("MAML"),
            SpeedRow("MAML-recursion", {"backward": "recursion"}, family=False),
            SpeedRow(
                "MAML-recursion-fwd", {"backward": "recursion", "hvp": "forward"}, family=False
            ),
        ),
    ),
    Variant(
        name="fomaml",
        title="FO-MAML",
        algorithm=FOMAML,
        description="first-order MAML (no Hessian terms, Finn et al. 2017)",
        theory=FOMAML_CONSTANTS,
        color="tab:red",
        recipes={"*": Recipe()},
        speed=(SpeedRow("FOMAML"),),
    ),
    Variant(
        name="hfmaml",
        title="HF-MAML",
        algorithm=HFMAML,
        description="Hessian-free MAML (finite-difference Hessian-vector products, "
        "Fallah et al. 2020)",
        theory=HFMAML_CONSTANTS,
        color="tab:green",
        recipes={"*": Recipe(notes=HFMAML_NOTES, algorithm={"delta_scale": 0.3})},
        speed=(
            SpeedRow("HFMAML", family=False),
            SpeedRow("HFMAML-forward", {"hvp": "forward"}, family=False),
            SpeedRow("HFMAML-smoothing", {"hvp": "gaussian_smoothing"}, family=False),
        ),
    ),
    Variant(
        name="anil",
        title="ANIL",
        algorithm=MAML,
        inner_update=ANIL,
        description="ANIL (only the head adapts, Raghu et al. 2020)",
        color="tab:orange",
        recipes=dict.fromkeys(FAMILY_SETTINGS, Recipe(source=ANIL_SOURCE)),
    ),
    Variant(
        name="boil",
        title="BOIL",
        algorithm=MAML,
        inner_update=BOIL,
        description="BOIL (only the body adapts, Oh et al. 2021)",
        color="tab:purple",
        recipes={
            "omniglot/5w1s": Recipe(
                source=BOIL_SOURCE,
                setting={
                    "inner_lr": 0.5,
                    "inner_steps": 1,
                    "eval_inner_steps": 1,
                    "query_shots": 15,
                    "meta_batch_size": 4,
                    "ddp_devices": 4,
                    "max_steps": 30000,
                },
            )
        },
    ),
    Variant(
        name="metasgd",
        title="Meta-SGD",
        algorithm=MAML,
        inner_update=MetaSGD,
        description="Meta-SGD (learned per-parameter step sizes, Li et al. 2017)",
        color="tab:brown",
        recipes=dict.fromkeys(
            FAMILY_SETTINGS,
            Recipe(source=METASGD_SOURCE, setting={"inner_steps": 1, "eval_inner_steps": 1}),
        ),
        speed=(SpeedRow("MetaSGD"),),
    ),
    Variant(
        name="mamlpp",
        title="MAML++",
        algorithm=MAMLPlusPlus,
        inner_update=PerStepRates,
        inner_update_args={"batch_norm": True},
        description="MAML++ (Antoniou et al. 2019)",
        color="tab:pink",
        recipes={
            "omniglot/5w1s": Recipe(
                source=(
                    *MAMLPP_SOURCE,
                    "          Cosine annealing of the meta learning rate to 1e-5.",
                ),
                setting={
                    "query_shots": 1,
                    "hidden": 64,
                    "inner_lr": 0.1,
                    "inner_steps": 5,
                    "eval_inner_steps": 5,
                    "meta_batch_size": 8,
                    "ddp_devices": 8,
                    "max_steps": MAMLPP_STEPS,
                },
                algorithm={"multi_step_loss_steps": 10 * 500, **MAMLPP_ALGORITHM},
                lr_scheduler={
                    "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                    "init_args": {"T_max": MAMLPP_STEPS, "eta_min": 1e-5},
                },
                optimizer_text="Adam 1e-3 (cosine-annealed)",
            ),
            "miniimagenet/5w1s": Recipe(
                source=(
                    *MAMLPP_SOURCE,
                    "          A constant meta learning rate (the configuration's minimum is 1e-3).",
                ),
                setting={
                    "query_shots": 15,
                    "hidden": 48,
                    "inner_lr": 0.01,
                    "inner_steps": 5,
                    "eval_inner_steps": 5,
                    "meta_batch_size": 2,
                    "ddp_devices": 2,
                    "max_steps": MAMLPP_STEPS,
                },
                algorithm={"multi_step_loss_steps": 15 * 500, **MAMLPP_ALGORITHM},
            ),
        },
        speed=(
            # MAML++'s learned per-step step sizes alone, under plain MAML.
            SpeedRow("PerStepRates", algorithm=MAML, inner_update=lambda model: PerStepRates()),
            # The sinusoid MLP has no BatchNorm for per-step BatchNorm weights.
            SpeedRow(
                "MAML++",
                inner_update=lambda model: PerStepRates(batch_norm=has_batch_norm(model)),
            ),
        ),
    ),
    Variant(
        name="reptile",
        title="Reptile",
        algorithm=Reptile,
        description="Reptile (first order: towards each task's adapted weights, "
        "Nichol et al. 2018)",
        color="tab:olive",
        recipes={
            "omniglot/5w1s": Recipe(
                source=REPTILE_SOURCE,
                setting={
                    "inner_lr": 0.1,
                    "inner_steps": 5,
                    "eval_inner_steps": 50,
                    "meta_batch_size": 5,
                    "ddp_devices": 5,
                    "max_steps": REPTILE_STEPS,
                },
                meta_optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
                lr_scheduler={
                    "class_path": "torch.optim.lr_scheduler.LinearLR",
                    "init_args": {
                        "start_factor": 1.0,
                        "end_factor": 0.0,
                        "total_iters": REPTILE_STEPS,
                    },
                },
                optimizer_text="SGD 1.0 annealed linearly to 0",
            )
        },
    ),
):
    register(_variant)
del _variant
