"""The variant registry: the family's entries, and a new member registered with one call is found
by the planner, the recipe generator, the speed benchmark, the theory step size and the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys

import pytest
import yaml

from lightning_maml import ANIL, BOIL, FOMAML, HFMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile
from lightning_maml.cli import main
from lightning_maml.inner import InnerUpdate
from lightning_maml.theory import FOMAML_CONSTANTS
from lightning_maml.variants import (
    Recipe,
    Variant,
    get,
    names,
    register,
    theory_constants,
    unregister,
    variant_of,
)
from tests.conftest import REPO
from tests.recipes.test_recipes import data_roots, fit_and_test  # noqa: F401 (data_roots is a fixture)


def load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generate = load("generate", "recipes/generate.py")
speed = load("speed", "benchmarks/speed.py")

FAMILY = ["maml", "fomaml", "hfmaml", "anil", "boil", "metasgd", "mamlpp", "reptile"]
PLAN = ["--L", "1", "--rho", "10", "--sigma", "2", "--sigma_tilde", "5", "--sigma_H", "20"]


class ToyMAML(FOMAML):
    """FO-MAML under a name of its own: what a new member of the family needs is one class."""


#: ... and one entry.
TOY = Variant(
    name="toy",
    title="Toy-MAML",
    algorithm=ToyMAML,
    description="Toy-MAML (first order, this test)",
    theory=dataclasses.replace(FOMAML_CONSTANTS, step_size=1 / 20),
    color="tab:cyan",
    recipes={"omniglot/5w1s": Recipe()},
)


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister("toy")


def test_the_family_is_registered_in_order():
    assert names() == FAMILY
    assert names(theory=True) == ["maml", "fomaml", "hfmaml"]
    assert [get(n).title for n in FAMILY[:3]] == ["MAML", "FO-MAML", "HF-MAML"]
    with pytest.raises(ValueError, match=r"Unknown variant 'nope': use one of \['maml'"):
        get("nope")


@pytest.mark.parametrize(
    ("algorithm", "name"),
    [
        (MAML(0.4), "maml"),
        (MAML(0.4, inner_update=ANIL()), "anil"),
        (MAML(0.4, inner_update=BOIL()), "boil"),
        (MAML(0.4, inner_update=MetaSGD()), "metasgd"),
        (MAMLPlusPlus(0.1), "mamlpp"),
        (Reptile(0.1), "reptile"),
        (HFMAML(0.4), "hfmaml"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_an_algorithm_object_is_found_by_its_class_and_inner_update(algorithm, name):
    assert variant_of(algorithm) is get(name)


@pytest.mark.parametrize(
    "algorithm",
    [
        MAML(0.4, inner_update=ANIL()),
        MAML(0.4, inner_update=MetaSGD()),
        MAML(0.4, inner_update=InnerUpdate(freeze=["classifier"])),
        Reptile(0.1),
    ],
    ids=["anil", "metasgd", "frozen-head", "reptile"],
)
def test_the_theory_refuses_what_it_does_not_cover(algorithm):
    with pytest.raises(ValueError, match=r"covers MAML, FOMAML and HFMAML .*pass the step-size"):
        theory_constants(algorithm)


def test_bad_entries_are_refused_with_the_fix(toy):
    with pytest.raises(ValueError, match=r"'toy' is registered already: .*replace=True"):
        register(TOY)
    with pytest.raises(ValueError, match="lower case letters"):
        Variant(name="Toy MAML", title="T", algorithm=ToyMAML)
    with pytest.raises(ValueError, match=r"MetaAlgorithm subclass .*not an instance"):
        Variant(name="toy2", title="T", algorithm=ToyMAML(0.1))
    with pytest.raises(ValueError, match="speed row 'FOMAML' is variant 'fomaml'"):
        register(Variant(name="toy2", title="FOMAML", algorithm=ToyMAML))
    assert "toy2" not in names()


def test_a_registered_variant_is_planned(toy, capsys):
    assert main(["plan", *PLAN, "--inner_lr", "0.001", "--eps", "2", "--variants", "toy"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2] == "Toy-MAML"
    assert re.search(r"^c +0\.05 ", out, re.M), "the toy's own step-size constant"
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "maml,fomaml,hfmaml,toy" in capsys.readouterr().out


def test_the_planner_does_not_know_an_unregistered_variant(capsys):
    with pytest.raises(SystemExit):
        main(["plan", *PLAN, "--inner_lr", "0.001", "--eps", "2", "--variants", "toy"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_the_generator_writes_its_recipe_on_its_settings(toy):
    written = generate.recipes()
    assert {"omniglot/toy_5w1s.yaml", "omniglot/toy_5w1s_ddp.yaml"} <= set(written)
    assert not [path for path in written if "toy" in path and "5w1s" not in path]
    text = written["omniglot/toy_5w1s.yaml"]
    assert text.startswith("# Omniglot 5-way 1-shot classification with Toy-MAML (first order")
    config = yaml.safe_load(text)
    assert config["model"]["algorithm"] == {
        "class_path": f"{ToyMAML.__module__}.ToyMAML",
        "init_args": {"inner_lr": 0.4, "inner_steps": 1},
    }
    # Everything else is the benchmark's setting, as FO-MAML's recipe has it.
    fomaml = yaml.safe_load(written["omniglot/fomaml_5w1s.yaml"])
    fomaml["model"]["algorithm"] = config["model"]["algorithm"]
    assert config == fomaml


def test_the_speed_benchmark_measures_its_row(toy):
    assert "Toy-MAML" in speed.choices() and "Toy-MAML" in speed.family()
    args = speed.parse_args(["--variants", "Toy-MAML", "--meta-batch-size", "2", "--device", "cpu"])
    args.repeats, args.warmup = 1, 0
    (row,) = speed.measure_block(args, args.variants, 1)
    assert row["variant"] == "Toy-MAML" and row["ms"] > 0


def test_the_speed_benchmark_does_not_know_an_unregistered_variant(capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(["--variants", "Toy-MAML"])
    assert "invalid choice: 'Toy-MAML'" in capsys.readouterr().err


def test_the_theory_step_size_takes_its_constant(toy):
    assert theory_constants(ToyMAML(0.1)).step_size == pytest.approx(1 / 20)


@pytest.mark.slow
def test_the_cli_trains_and_tests_its_recipe(toy, data_roots, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    path, text = generate.recipe(generate.omniglot(5, 1), "toy", ddp=False)
    recipe = tmp_path / path
    recipe.parent.mkdir(parents=True)
    recipe.write_text(text)
    fit_and_test(recipe, tmp_path, data_roots, capsys)
