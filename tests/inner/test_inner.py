"""Inner updates as parts: selection is pure, binding records data and never changes a setting.

The meta-gradients of every update are checked against the float64 reference in
``tests/test_family.py``; here, what binding does to an update, the parts' shared contract, and
two new combinations made of the existing parts only, against the same reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_maml import ANIL, BOIL, FOMAML, MAML, InnerUpdate, MetaSGD, PerStepRates
from lightning_maml.inner import HEAD, Fixed, PerElement, PerTensorPerStep
from lightning_maml.models import MLP, ConvNet
from lightning_maml.variants import theory_constants, variant_of
from tests.algorithms.test_family import (
    EXACT_RULES,
    assert_matches,
    convnet,
    mlp,
    reference,
    shuffled_rates,
)

UPDATES = {
    "fixed": lambda: InnerUpdate(),
    "freeze": lambda: InnerUpdate(freeze=["features.0"]),
    "ANIL": lambda: ANIL(),
    "ANIL-named": lambda: ANIL(head=["classifier"]),
    "BOIL": lambda: BOIL(),
    "MetaSGD": lambda: MetaSGD(),
    "PerStepRates": lambda: PerStepRates(),
    "PerStepRates-bn": lambda: PerStepRates(batch_norm=True),
}
#: What an update's user set: its constructor's settings and its parts.
SETTINGS = ("head", "adapt", "freeze", "batch_norm", "select", "step_rule", "per_step_view")


def settings(update: InnerUpdate) -> dict:
    return {
        "hparams": copy.deepcopy(update.hparams()),
        "repr": update.extra_repr(),  # the settings (repr adds the learned submodules)
        **{name: copy.deepcopy(getattr(update, name, None)) for name in SETTINGS},
    }


def outcome(algorithm) -> str:
    try:
        theory_constants(algorithm)
    except ValueError as error:
        return f"ValueError: {error}"
    return variant_of(algorithm).name


@pytest.mark.parametrize("update", list(UPDATES))
def test_binding_changes_no_setting(update):
    inner = UPDATES[update]()
    algorithm = MAML(0.1, 2, inner_update=inner)
    before, algorithm_before = settings(inner), (algorithm.hparams(), repr(algorithm))
    algorithm.bind(ConvNet(1, 5, 8, 28))
    assert settings(inner) == before
    assert (algorithm.hparams(), repr(algorithm)) == algorithm_before
    assert inner.adapted  # what binding records is data beside the settings


@pytest.mark.parametrize("update", list(UPDATES))
def test_the_theory_sees_the_same_variant_before_and_after_binding(update):
    algorithm = MAML(0.1, inner_update=UPDATES[update]())
    before = outcome(algorithm)
    algorithm.bind(ConvNet(1, 5, 8, 28))
    assert outcome(algorithm) == before
    # Only one fixed step size on every parameter is the theory's MAML.
    assert (before == "maml") == (update == "fixed")


def test_anil_is_outside_the_theory_before_and_after_binding():
    algorithm = MAML(0.1, inner_update=ANIL())
    for bound in (False, True):
        with pytest.raises(ValueError, match="pass the step-size constant c explicitly"):
            theory_constants(algorithm)
        if not bound:
            algorithm.bind(ConvNet(1, 5, 8, 28))


def test_selection_is_a_pure_function_of_the_model():
    anil, conv, mlp_model = ANIL(), ConvNet(1, 5, 8, 28), MLP()
    before = settings(anil)
    assert anil.chosen(conv) == ["classifier.weight", "classifier.bias"]
    assert anil.chosen(mlp_model) == ["4.weight", "4.bias"]
    assert anil.chosen(conv) == ["classifier.weight", "classifier.bias"]
    assert settings(anil) == before and anil.adapted == []


def test_the_head_pattern_makes_anil_and_boil_of_any_update():
    model = ConvNet(1, 5, 8, 28)
    assert InnerUpdate(adapt=[HEAD]).chosen(model) == ANIL().chosen(model)
    assert InnerUpdate(freeze=[HEAD]).chosen(model) == BOIL().chosen(model)
    assert MetaSGD(adapt=[HEAD]).chosen(model) == ["classifier.weight", "classifier.bias"]


def test_a_fixed_update_serves_learners_of_one_model_and_settings_only():
    update = InnerUpdate()
    update.bind(MLP(), 0.1, 2)
    update.bind(MLP(), 0.1, 2)  # another learner of the same kind: nothing to keep apart
    with pytest.raises(ValueError, match=r"cannot also serve one with \['features"):
        update.bind(ConvNet(1, 5, 8, 28), 0.1, 2)
    with pytest.raises(ValueError, match=r"inner_lr=0.2, inner_steps=2\): give each learner"):
        update.bind(MLP(), 0.2, 2)
    assert update.inner_lr == 0.1 and update.adapted == [n for n, _ in MLP().named_parameters()]


def test_a_learned_update_is_bound_once():
    update = MetaSGD()
    update.bind(MLP(), 0.1, 2)
    values = {n: p.detach().clone() for n, p in update.named_parameters()}
    with pytest.raises(ValueError, match="already holds the learned step sizes"):
        update.bind(MLP(), 0.1, 2)
    assert all(torch.equal(values[n], p) for n, p in update.named_parameters())


def test_state_dict_keys_are_the_checkpoints_names():
    model = ConvNet(1, 5, 8, 28)
    update = PerStepRates(batch_norm=True)
    update.bind(model, 0.4, 3)
    names = [n for n, _ in model.named_parameters()]
    bn = [
        f"{module}.{name}"
        for module, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for name, _ in m.named_parameters()
    ]
    assert bn and update.normalized == bn
    assert set(update.state_dict()) == {
        *(f"lr.{n.replace('.', '__')}" for n in names if n not in bn),
        *(f"bn.{n.replace('.', '__')}" for n in bn),
    }
    assert update.state_dict()["bn.features__1__weight"].shape == (3, 8)
    assert update.state_dict()["lr.classifier__weight"].shape == (3,)
    fixed = InnerUpdate()
    fixed.bind(model, 0.4, 3)
    assert fixed.state_dict() == {}


@pytest.mark.parametrize("rule", [Fixed(), PerElement(), PerTensorPerStep()])
def test_every_step_size_rule_keeps_the_contract(rule):
    like = {n: p.detach() for n, p in nn.Linear(3, 2).named_parameters()}
    rates = rule.init(like, 0.1, 4)
    assert bool(rates) == rule.learned and set(rates) <= set(like)
    sizes = rule(rates, list(like), 0.1, 4)
    assert len(sizes) == 4
    for step in sizes:
        assert list(step) == list(like)
        for n, size in step.items():
            # Each step size broadcasts against its parameter and starts at inner_lr.
            assert torch.broadcast_to(torch.as_tensor(size), like[n].shape).eq(0.1).all()
    distinct = {id(s[n]) for s in sizes for n in s if isinstance(s[n], torch.Tensor)}
    if rule.per_step:
        assert len(distinct) == 4 * len(like)
    assert set(rule.summary(rates, list(like))) == (
        {f"inner_lr/{n}" for n in like} if rule.learned else set()
    )


@pytest.mark.parametrize("rule", ["graph", "recursion-reverse"])
def test_meta_sgd_on_the_head_matches_the_reference(rule):
    # A combination no class names: ANIL's selection with Meta-SGD's step sizes.
    inner = shuffled_rates(MetaSGD(adapt=[HEAD]), mlp(), 2)
    assert inner.adapted == ["2.weight", "2.bias"]
    model, tasks, loss_fn, expected_p, expected_r = reference("mlp", inner, 2)
    step = EXACT_RULES[rule](inner, 2, "inner").meta_gradient(model, loss_fn, tasks)
    assert_matches(step, expected_p, expected_r, rtol=1e-9)
    first = reference("mlp", inner, 2, order="first")
    step = FOMAML(0.3, 2, inner_update=inner).meta_gradient(model, loss_fn, tasks)
    assert_matches(step, first[3], first[4], rtol=1e-10)


def test_maml_plus_plus_updates_on_the_body_match_the_reference():
    # BOIL's selection with MAML++'s per-step step sizes and BatchNorm weights.
    inner = shuffled_rates(PerStepRates(freeze=[HEAD], batch_norm=True), convnet(), 2)
    assert not any(n.startswith("classifier") for n in inner.adapted)
    model, tasks, loss_fn, expected_p, expected_r = reference("conv", inner, 2)
    step = EXACT_RULES["graph"](inner, 2, "inner").meta_gradient(model, loss_fn, tasks)
    assert_matches(step, expected_p, expected_r, rtol=1e-9)


class PerTensor:
    """A new step-size rule written outside the package: one learned step size per adapted
    tensor, shared by every step."""

    learned, per_step = True, False

    def init(self, like, inner_lr, inner_steps):
        return {n: p.new_tensor(inner_lr) for n, p in like.items()}

    def __call__(self, rates, names, inner_lr, steps):
        return [{n: rates[n] for n in names}] * steps

    def summary(self, rates, names):
        return {f"inner_lr/{n}": rates[n] for n in names}


class PerTensorRate(InnerUpdate):
    step_rule = PerTensor()


@pytest.mark.parametrize("rule", ["graph", "recursion-reverse", "hfmaml-forward"])
def test_a_new_step_size_rule_is_one_small_class(rule):
    inner = shuffled_rates(PerTensorRate(adapt=["2"]), mlp(), 2)
    assert {p.shape for p in inner.parameters()} == {torch.Size([])}
    assert inner.has_rates and set(inner.summary()) == {"inner_lr/2.weight", "inner_lr/2.bias"}
    model, tasks, loss_fn, expected_p, expected_r = reference("mlp", inner, 2)
    step = EXACT_RULES[rule](inner, 2, "inner").meta_gradient(model, loss_fn, tasks)
    assert_matches(step, expected_p, expected_r, rtol=1e-9)
    first = reference("mlp", inner, 2, order="first")
    step = FOMAML(0.3, 2, inner_update=inner).meta_gradient(model, loss_fn, tasks)
    assert_matches(step, first[3], first[4], rtol=1e-10)
