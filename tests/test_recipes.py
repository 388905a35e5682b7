"""Every recipe under recipes/ parses, trains two steps and tests from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_maml.cli import main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
SMALL = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=1",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.num_val_tasks=2",
    "--data.init_args.num_test_tasks=2",
]


def test_recipes_exist():
    assert {"maml.yaml", "fomaml.yaml", "hfmaml.yaml"} <= {r.name for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_trains_and_tests(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("# "), "a recipe opens with a comment that says what it is"
    config = yaml.safe_load(recipe.read_text())
    assert config["trainer"]["logger"]["class_path"].endswith("WandbLogger")
    main(
        ["fit", "--config", str(recipe), *SMALL, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    )
    checkpoints = sorted(tmp_path.rglob("last.ckpt"))
    assert len(checkpoints) == 1
    assert list(tmp_path.rglob("offline-run-*")), "the W&B run is written offline"
    main(
        [
            "test",
            "--config",
            str(recipe),
            *SMALL,
            f"--ckpt_path={checkpoints[0]}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
