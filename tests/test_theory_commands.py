"""`lightning-maml estimate` on a recipe, with and without a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_maml.cli import MetaCLI, main

RECIPE = "recipes/theory/maml.yaml"
SMALL = ["--tasks", "6", "--power_iterations", "5", "--directions", "1"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def test_estimate_prints_a_table_and_writes_json(tmp_path, capsys):
    output = tmp_path / "estimate.json"
    assert main(["estimate", "--config", RECIPE, *SMALL, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    for name in ("L", "rho", "sigma", "sigma_tilde", "sigma_H", "ESTIMATE"):
        assert name in out
    record = json.loads(output.read_text())
    assert record["tasks"] == 6 and record["examples"] == 150  # 50 + 50 + 50 per task
    assert record["inner_lr"] == 0.025 and record["variant"] == "MAML"
    # Quadratic tasks: rho = 0, and the Hessian 2 diag(a) has its top eigenvalue near 2 * 2.
    assert record["rho"] < 1e-6
    assert 2.0 < record["L"] < 6.0
    # The JSON feeds the planner directly.
    assert main(["plan", "--from", str(output), "--eps", "100", "--variants", "maml"]) == 0


def test_recipe_overrides_and_checkpoint(tmp_path):
    cli = MetaCLI(
        args=[
            "--config",
            RECIPE,
            "--trainer.max_steps=3",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = tmp_path / "trained.ckpt"
    cli.trainer.save_checkpoint(checkpoint)

    results = {}
    for name, extra in [("init", []), ("trained", ["--ckpt_path", str(checkpoint)])]:
        output = tmp_path / f"{name}.json"
        args = [*SMALL, "--output", str(output), "--data.init_args.query_shots", "10", *extra]
        assert main(["estimate", "--config", RECIPE, *args]) == 0
        results[name] = json.loads(output.read_text())
    assert results["init"]["examples"] == 110  # the override reached the datamodule
    assert results["trained"]["ckpt_path"] == str(checkpoint)
    assert results["trained"]["grad_norm"] != results["init"]["grad_norm"]
