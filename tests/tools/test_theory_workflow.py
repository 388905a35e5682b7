"""The theory as one path: `plan --write_config` -> `fit` -> the monitor's verdict."""

from __future__ import annotations

import json

import pytest
import yaml

from lightning_maml.cli import main
from lightning_maml.theory import MAML_CONSTANTS, compute_plan
from lightning_maml.variants import get

# Small constants and a loose eps: a plan of a few dozen steps on small batches.
CONSTANTS = ["--L", "4", "--rho", "0", "--sigma", "1", "--sigma_tilde", "2", "--sigma_H", "1"]
SMALL = [*CONSTANTS, "--inner_lr", "0.025", "--eps", "8"]


def test_plan_writes_a_config_that_fit_runs_to_a_verdict(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # the config's CSVLogger writes under ./runs
    args = [*SMALL, "--variants", "maml", "--iteration_constant", "500", "--monitor_tasks", "50"]
    assert main(["plan", *args, "--write-config", "P.yaml"]) == 0
    out = capfd.readouterr().out
    assert "O(1) of the iterations: 500 (given: --iteration_constant)" in out
    assert "wrote P.yaml" in out

    config = yaml.safe_load((tmp_path / "P.yaml").read_text())
    plan = compute_plan(
        MAML_CONSTANTS, 4, 0, 1, 2, 1, inner_lr=0.025, eps=8, iteration_constant=500
    )
    data = config["data"]["init_args"]
    assert (data["meta_batch_size"], data["shots"]) == (plan.task_batch, plan.inner_shots)
    assert (data["query_shots"], data["hessian_shots"]) == (plan.query_shots, plan.hessian_shots)
    assert config["trainer"]["max_steps"] == plan.iterations == 32  # ceil(500 * 4 / 8^2)
    step_size, monitor = (c["init_args"] for c in config["trainer"]["callbacks"])
    assert step_size["c"] == pytest.approx(1 / 12)
    assert (monitor["eps"], monitor["planned_steps"], monitor["stop"]) == (8.0, 32, True)

    main(["fit", "--config", "P.yaml", "--trainer.enable_progress_bar=false"])
    verdict = [
        line for line in capfd.readouterr().out.splitlines() if "StationarityMonitor: " in line
    ][-1]
    assert verdict.startswith("StationarityMonitor: reached eps=8 at step ")
    assert verdict.split(" at step ")[1].split(" of the planned 32")[0].isdigit()
    metrics = next((tmp_path / "runs" / "plan-maml").rglob("metrics.csv")).read_text()
    assert "theory/planned_steps" in metrics and "theory/reached_step" in metrics


def test_several_variants_write_one_file_each_and_a_refused_one_none(tmp_path, capsys):
    target = tmp_path / "plan.yaml"
    status = main(["plan", *SMALL, "--eps", "2", "--write_config", str(target)])
    assert status == 2  # FO-MAML's floor at inner_lr 0.025 is above eps = 2
    assert "REFUSED" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan-hfmaml.yaml", "plan-maml.yaml"]
    for name in ("maml", "hfmaml"):
        config = yaml.safe_load((tmp_path / f"plan-{name}.yaml").read_text())
        algorithm = config["model"]["algorithm"]["class_path"]
        assert algorithm == f"lightning_maml.{get(name).algorithm.__name__}"


def test_the_constant_comes_from_a_measurement_file(tmp_path, capsys):
    measured = tmp_path / "constant.json"
    measured.write_text(
        json.dumps({"iteration_constant": 50.0, "per_variant": {"maml": 40.0, "hfmaml": 50.0}})
    )
    assert main(["plan", *SMALL, "--variants", "maml", "--constant-from", str(measured)]) == 0
    out = capsys.readouterr().out
    # 40 * Delta L / eps^2 = 40 * 4 / 64 = 2.5 -> 3
    assert "O(1) = 40" in out and f"measured: {measured}, per_variant.maml" in out
    iterations = next(line for line in out.splitlines() if line.startswith("iterations"))
    assert iterations.split()[1] == "3"

    measured.write_text(json.dumps({"iteration_constant": 50.0}))
    assert main(["plan", *SMALL, "--variants", "hfmaml", "--constant_from", str(measured)]) == 0
    assert "O(1) = 50" in capsys.readouterr().out


def test_without_a_constant_the_plan_says_it_is_not_measured(capsys):
    assert main(["plan", *SMALL, "--variants", "maml"]) == 0
    assert "1 (NOT MEASURED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON at line 1"),
        ('{"iteration_constant": -3}', "iteration_constant must be a number > 0, got -3"),
        ('{"per_variant": {"maml": "x"}}', "per_variant.maml must be a number > 0"),
    ],
)
def test_a_bad_constant_file_is_named(tmp_path, capsys, content, message):
    bad = tmp_path / "constant.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *SMALL, "--variants", "maml", "--constant_from", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--constant_from {bad}" in err and message in err


def test_iteration_constant_and_constant_from_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["plan", *SMALL, "--iteration_constant", "2", "--constant_from", "x.json"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_monitor_gets_enough_tasks_to_resolve_eps(tmp_path):
    from lightning_maml.tools.theory import monitor_tasks_for

    assert monitor_tasks_for(10.0, 0.25) == 6400  # (2 * 10 / 0.25)^2
    assert monitor_tasks_for(1.0, 8.0) == 200 and monitor_tasks_for(100.0, 0.01) == 20000
    assert main(["plan", *SMALL, "--sigma", "10", "--eps", "1", "--variants", "maml",
                 "--write_config", str(tmp_path / "p.yaml")]) == 0  # fmt: skip
    config = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert config["trainer"]["callbacks"][1]["init_args"]["tasks"] == 400  # (2 * 10 / 1)^2
