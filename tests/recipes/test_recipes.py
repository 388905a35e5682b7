"""Every recipe under recipes/ parses, trains two steps and tests from its checkpoint.

The image recipes read tiny data generated here in each benchmark's real on-disk layout (the
recipe's ``data.init_args.root`` is the one override that points them at it); their model and
image sizes stay the recipe's own. The ``_ddp`` recipes run on one CPU process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import tests.datamodules.test_image_datamodules as image_data
from lightning_maml.cli import MetaCLI, main
from lightning_maml.cli import test_summary as summarize

ROOT = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(ROOT.rglob("*.yaml"))
SMALL = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=1",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.num_val_tasks=2",
    "--data.init_args.num_test_tasks=2",
]
# The image recipes on tiny data: two tasks per step, one query image per class, one
# adaptation step at evaluation, one validation (after the last step), no workers.
IMAGE_SMALL = [
    "--trainer.val_check_interval=2",
    "--trainer.num_sanity_val_steps=0",
    "--model.eval_inner_steps=1",
    "--data.init_args.meta_batch_size=2",
    "--data.init_args.query_shots=1",
    "--data.init_args.num_workers=0",
]
# Omniglot fixture: 40 background and 20 evaluation characters of 6 drawers; the split keeps 20
# characters for validation and 20 for test, enough for 20-way tasks.
OMNIGLOT_SMALL = ["--data.init_args.val_characters=20", "--data.init_args.test_characters=20"]
DDP_ON_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]
DISTRIBUTION = ("accelerator", "devices", "strategy", "num_nodes")
TEST_LINE = re.compile(r"^test (accuracy|loss): \S+ \+/- \S+( %)? over \d+ tasks$", re.M)


def name(recipe: Path) -> str:
    return recipe.relative_to(ROOT).as_posix()


def load(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())


def write_omniglot(root: Path) -> None:
    """The official folders: images_{background,evaluation}/<alphabet>/characterNN/NNNN_DD.png."""
    rng = np.random.default_rng(0)
    number = 0
    for part, count in (("images_background", 40), ("images_evaluation", 20)):
        for c in range(count):
            number += 1
            folder = root / part / f"Alphabet_{c // 10}" / f"character{c % 10 + 1:02d}"
            folder.mkdir(parents=True)
            for drawer in range(1, 7):
                ink = rng.random((35, 35)) < 0.2
                Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(
                    folder / f"{number:04d}_{drawer:02d}.png"
                )


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, Path]:
    """Tiny data in each benchmark's real layout, by datamodule class name."""
    base = tmp_path_factory.mktemp("recipe-data")
    write_omniglot(base / "omniglot")
    # learn2learn's pickles, with at least 5 classes in every split (5-way tasks).
    mini = base / "miniimagenet"
    mini.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setattr(image_data, "MINI_CLASSES", {"train": 6, "val": 5, "test": 5})
    image_data.mini_pickles(mini)
    mp.undo()
    image_data.write_cifar(base / "cifar100" / "cifar-100-python")
    return {
        "OmniglotDataModule": base / "omniglot",
        "MiniImageNetDataModule": mini,
        "CIFARFSDataModule": base / "cifar100",
        "FC100DataModule": base / "cifar100",
    }


def small_args(recipe: Path, roots: dict[str, Path]) -> list[str]:
    """The overrides that make ``recipe`` tiny and fast."""
    config = load(recipe)
    args = list(SMALL)
    datamodule = config["data"]["class_path"].rsplit(".", 1)[-1]
    if datamodule in roots:
        args += [*IMAGE_SMALL, f"--data.init_args.root={roots[datamodule]}"]
        if datamodule == "OmniglotDataModule":
            args += OMNIGLOT_SMALL
        if recipe.stem.startswith("mamlpp"):
            # Per-step parameters fix the number of steps: one, in training and evaluation.
            args += ["--model.algorithm.init_args.inner_steps=1"]
    if recipe.stem.endswith("_ddp"):
        args += DDP_ON_CPU
    return args


def fit_and_test(recipe: Path, tmp_path: Path, roots: dict[str, Path], capsys) -> None:
    args = [*small_args(recipe, roots), f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main(["fit", "--config", str(recipe), *args]) is None, "fit failed"
    assert list(tmp_path.rglob("offline-run-*")), "the W&B run is written offline"
    checkpoints = sorted(tmp_path.rglob("last.ckpt"))
    if "ModelCheckpoint" in recipe.read_text():
        assert len(checkpoints) == 1
    ckpt = [f"--ckpt_path={checkpoints[0]}"] if checkpoints else []
    capsys.readouterr()
    assert main(["test", "--config", str(recipe), *args, *ckpt]) is None, "test failed"
    printed = capsys.readouterr().out
    assert TEST_LINE.search(printed), f"no test result line in:\n{printed}"


def test_recipes_exist():
    assert {"maml.yaml", "fomaml.yaml", "hfmaml.yaml"} <= {r.name for r in RECIPES}
    for benchmark in ("omniglot", "miniimagenet"):
        for variant in ("anil", "metasgd", "mamlpp"):
            for suffix in ("", "_ddp"):
                assert (ROOT / benchmark / f"{variant}_5w1s{suffix}.yaml").is_file()
    for variant in ("boil", "reptile"):
        for suffix in ("", "_ddp"):
            assert (ROOT / "omniglot" / f"{variant}_5w1s{suffix}.yaml").is_file()
    for benchmark, shapes in {
        "omniglot": ["5w1s", "5w5s", "20w1s", "20w5s"],
        "miniimagenet": ["5w1s", "5w5s"],
        "cifarfs": ["5w1s", "5w5s"],
        "fc100": ["5w1s", "5w5s"],
    }.items():
        for variant in ("maml", "fomaml", "hfmaml"):
            for shape in shapes:
                for suffix in ("", "_ddp"):
                    assert (ROOT / benchmark / f"{variant}_{shape}{suffix}.yaml").is_file()


def test_generated_recipes_are_up_to_date():
    check = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, f"{check.stdout}{check.stderr}run: python recipes/generate.py"


def test_every_recipe_has_a_row_in_the_table():
    table = (ROOT / "README.md").read_text()
    missing = [name(r) for r in RECIPES if f"`{name(r)}`" not in table]
    assert not missing, f"recipes/README.md has no row for {missing}"


@pytest.mark.parametrize("recipe", RECIPES, ids=name)
def test_recipe_parses_and_builds(recipe, data_roots, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("# "), "a recipe opens with a comment that says what it is"
    config = load(recipe)
    assert config["trainer"]["logger"]["class_path"].endswith("WandbLogger")
    if recipe.parent.name != "theory":  # another developer's recipes, checked in their tests
        callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
        assert {"ModelCheckpoint", "GradNormMonitor"} <= set(callbacks)
        if recipe.parent.name != "sinusoid":
            data = config["data"]["init_args"]
            assert not Path(data["root"]).is_absolute(), "data roots are relative to the cwd"
            assert config["model"]["model"]["init_args"]["ways"] == data["ways"]
    cli = MetaCLI(
        args=[
            "--config",
            str(recipe),
            *small_args(recipe, data_roots),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.model is not None and cli.datamodule is not None


DDP = [r for r in RECIPES if r.stem.endswith("_ddp")]


@pytest.mark.parametrize("recipe", DDP, ids=name)
def test_ddp_recipe_equals_its_base_but_for_distribution(recipe):
    ddp, base = load(recipe), load(recipe.with_name(recipe.stem.removesuffix("_ddp") + ".yaml"))
    assert ddp["trainer"]["strategy"] == "ddp" and ddp["trainer"]["accelerator"] == "gpu"
    devices = ddp["trainer"]["devices"]
    assert ddp["data"]["init_args"]["meta_batch_size"] % devices == 0, "meta_batch_size is global"
    for key in DISTRIBUTION:
        ddp["trainer"].pop(key, None)
        base["trainer"].pop(key, None)
    assert ddp == base


@pytest.mark.parametrize("recipe", RECIPES, ids=name)
def test_recipe_trains_and_tests(recipe, data_roots, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fit_and_test(recipe, tmp_path, data_roots, capsys)


def summary_of(metrics: dict, num_test_tasks: int = 600, batches: int = 150) -> str | None:
    trainer = SimpleNamespace(
        callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
        datamodule=SimpleNamespace(num_test_tasks=num_test_tasks, eval_meta_batch_size=4),
        num_test_batches=[batches],
        world_size=1,
    )
    return summarize(trainer)


def test_test_summary_reads_like_a_paper():
    accuracy = {"test/accuracy": 0.97981, "test/accuracy_ci95": 0.00262, "test/loss": 0.1}
    assert summary_of(accuracy) == "test accuracy: 97.98 +/- 0.26 % over 600 tasks"
    loss = {"test/loss": 0.012345, "test/loss_ci95": 0.001123}
    assert summary_of(loss) == "test loss: 0.0123 +/- 0.0011 over 600 tasks"
    # limit_test_batches=1 with 4 tasks a batch: 4 of the 600 tasks were tested.
    assert summary_of(loss, batches=1).endswith("over 4 tasks")
    assert summary_of({}) is None
