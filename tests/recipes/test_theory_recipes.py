"""Every recipe of recipes/theory builds from its YAML and trains two steps with its callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_maml.callbacks import StationarityMonitor, TheoryStepSize
from lightning_maml.cli import MetaCLI
from lightning_maml.variants import get

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "theory").glob("*.yaml"))


def test_the_three_variants_have_recipes():
    assert [p.stem for p in RECIPES] == ["fomaml", "hfmaml", "maml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_with_the_theory_callbacks(recipe, tmp_path):
    cli = MetaCLI(
        args=[
            "--config",
            str(recipe),
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.num_sanity_val_steps=0",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    step_size = next(c for c in cli.trainer.callbacks if isinstance(c, TheoryStepSize))
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, StationarityMonitor))
    # L = 4 and rho = 0 on linear tasks: beta = c / (4 L) with the variant's c.
    assert step_size.beta == pytest.approx(get(recipe.stem).theory.step_size / 16)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == step_size.beta
    assert [s for s, _, _ in monitor.history] == [0]
    assert monitor.held_out.num_tasks == 1000
    assert cli.trainer.global_step == 2
