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
    monkeypatch.chdir(Path(__file__).resolve().parents[2])


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


def plan_error(capsys, *args: str) -> str:
    """Runs ``lightning-maml plan ARGS``, which must refuse them, and returns its last line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


CONSTANTS = ["--L", "4", "--rho", "0", "--sigma", "6", "--sigma_tilde", "20", "--sigma_H", "9"]


def test_plan_from_malformed_json_names_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "estimate.json"
    broken.write_text('{\n  "L": 4.0,\n  "rho": 0.0\n  "sigma": 6.3\n}\n')  # a comma missing
    line = plan_error(capsys, "--from", str(broken), "--eps", "0.5")
    # Before: a JSONDecodeError traceback that named neither the file nor the argument.
    assert f"--from {broken}: not valid JSON at line 4, column 3" in line
    assert "lightning-maml estimate --output" in line
    missing = tmp_path / "nowhere.json"
    assert f"--from {missing}: cannot read it" in plan_error(
        capsys, "--from", str(missing), "--eps", "1"
    )


def test_plan_from_json_with_a_constant_out_of_range(tmp_path, capsys):
    record = tmp_path / "estimate.json"
    record.write_text('{"L": 4, "rho": NaN, "sigma": 6, "sigma_tilde": 20, "sigma_H": 9}')
    line = plan_error(capsys, "--from", str(record), "--inner_lr", "0.025", "--eps", "0.5")
    assert f"--from {record}: rho must be a finite number >= 0, got nan" in line
    assert "give --rho to override it" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Before: "cannot convert float NaN to integer".
        (["--rho", "nan"], "argument --rho: must be a finite number >= 0, got nan"),
        (["--L", "inf"], "argument --L: must be a finite number > 0, got inf"),
        (["--L", "0"], "argument --L: must be a finite number > 0, got 0.0"),
        (["--sigma", "-1"], "argument --sigma: must be a finite number >= 0, got -1.0"),
        (["--inner_lr", "-0.1"], "argument --inner_lr: must be a finite number > 0, got -0.1"),
        (["--eps", "nan"], "argument --eps: must be a finite number > 0, got nan"),
        (["--Delta", "inf"], "argument --Delta: must be a finite number > 0, got inf"),
        (["--sigma_H", "abc"], "argument --sigma_H: must be a finite number >= 0, got 'abc'"),
    ],
    ids=[
        "nan-rho",
        "inf-L",
        "zero-L",
        "negative-sigma",
        "negative-inner-lr",
        "nan-eps",
        "inf-Delta",
        "text-sigma-H",
    ],
)
def test_plan_names_the_argument_and_its_range(args, message, capsys):
    given = dict(zip(CONSTANTS[::2], CONSTANTS[1::2], strict=True))
    given.update({"--inner_lr": "0.025", "--eps": "0.5"})
    given.update(dict(zip(args[::2], args[1::2], strict=True)))
    assert message in plan_error(capsys, *(x for pair in given.items() for x in pair))


def test_the_library_planner_refuses_nan_too():
    from lightning_maml.theory import MAML_CONSTANTS, compute_plan

    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0, got nan\.$"):
        compute_plan(
            MAML_CONSTANTS,
            L=4,
            rho=float("nan"),
            sigma=6,
            sigma_tilde=20,
            sigma_H=9,
            inner_lr=0.025,
            eps=0.5,
        )
    with pytest.raises(ValueError, match=r"^L must be a finite number > 0, got inf\.$"):
        compute_plan(
            MAML_CONSTANTS,
            L=float("inf"),
            rho=0,
            sigma=6,
            sigma_tilde=20,
            sigma_H=9,
            inner_lr=0.025,
            eps=0.5,
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "1"], "argument --tasks: must be an integer >= 2, got 1"),
        (["--rho_radius", "nan"], "argument --rho_radius: must be a finite number > 0, got nan"),
        (["--rho_radius", "-0.001"], "argument --rho_radius: must be a finite number > 0"),
        (["--power_iterations", "0"], "argument --power_iterations: must be an integer >= 1"),
        (["--directions", "-1"], "argument --directions: must be an integer >= 0, got -1"),
        (["--task_chunk_size", "0"], "argument --task_chunk_size: must be an integer >= 1"),
        (["--seed", "-2"], "argument --seed: must be an integer >= 0, got -2"),
    ],
    ids=[
        "one-task",
        "nan-radius",
        "negative-radius",
        "zero-iterations",
        "negative-directions",
        "zero-chunk",
        "negative-seed",
    ],
)
def test_estimate_names_the_argument_and_its_range(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", "--config", RECIPE, *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
