"""`lightning-maml estimate` on a recipe, with and without a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

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


# -- the path on a recipe other than the linear family: estimate -> plan --write_config -> fit --

SINUSOID = "recipes/sinusoid/maml.yaml"
SMALL_BATCHES = [
    "--data.init_args.meta_batch_size=4",
    "--data.init_args.shots=5",
    "--data.init_args.query_shots=5",
    "--data.init_args.hessian_shots=5",
]


@pytest.mark.slow
def test_the_sinusoid_path_plans_and_fits_the_recipe_it_estimated(tmp_path, capfd):
    estimate = tmp_path / "est.json"
    args = [*SMALL, "--data.init_args.query_shots", "20", "--output", str(estimate)]
    assert main(["estimate", "--config", SINUSOID, *args]) == 0
    record = json.loads(estimate.read_text())
    assert record["meta_loss"] > 0 and record["rho"] > 0  # a ReLU MLP: not a quadratic
    assert record["recipe"]["data"]["class_path"] == "lightning_maml.datamodules.SinusoidDataModule"
    assert record["recipe"]["data"]["init_args"]["query_shots"] == 20  # the override is recorded

    target = tmp_path / "plan.yaml"
    plan_args = ["--from", str(estimate), "--eps", "20", "--variants", "maml", "hfmaml"]
    plan_args += ["--iteration_constant", "0.01", "--monitor_tasks", "4", "--monitor_every", "2"]
    assert main(["plan", *plan_args, "--write_config", str(target)]) == 0
    out = capfd.readouterr().out
    # Before: Delta 1 whatever the task family, and the plan silently written for a linear model
    # on linear tasks: a config that ran, on the wrong problem.
    assert f"Delta = {record['meta_loss']:.4g}" in out
    assert f"the meta-loss F(w_0) recorded in {estimate}" in out
    configs = {
        n: yaml.safe_load((tmp_path / f"plan-{n}.yaml").read_text()) for n in ("maml", "hfmaml")
    }
    for config in configs.values():
        assert config["model"]["model"]["class_path"] == "lightning_maml.models.MLP"
        assert config["model"]["model"]["init_args"]["hidden"] == 40
        assert config["data"]["class_path"] == "lightning_maml.datamodules.SinusoidDataModule"
        assert config["threads"] == 1  # the small models run side by side without fighting
        monitor = config["trainer"]["callbacks"][1]["init_args"]
        assert monitor["sampler"]["class_path"] == "lightning_maml.datamodules.SinusoidTasks"
        assert monitor["sampler"]["init_args"]["amplitude_range"] == [0.1, 5.0]
        assert config["model"]["meta_optimizer"]["class_path"] == "torch.optim.SGD"
        assert "lr_scheduler" not in config["model"]
    assert (
        (tmp_path / "plan-maml.yaml")
        .read_text()
        .startswith("# MAML on SinusoidDataModule with MLP")
    )
    hfmaml = configs["hfmaml"]["model"]["algorithm"]["init_args"]
    assert (hfmaml["delta"], hfmaml["rho"]) == ("theory", record["rho"])  # the plan's delta

    steps = configs["maml"]["trainer"]["max_steps"]
    main(["fit", "--config", str(tmp_path / "plan-maml.yaml"), *SMALL_BATCHES,
          "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.max_steps=4"])  # fmt: skip
    verdict = [
        line for line in capfd.readouterr().out.splitlines() if "StationarityMonitor:" in line
    ]
    assert verdict and verdict[-1].startswith("StationarityMonitor: reached eps=20 at step 0 of")
    assert f"of the planned {steps}" in verdict[-1]


def write_estimate(path: Path, **extra) -> Path:
    """An estimate's JSON with small constants (a plan of a few dozen steps) and ``extra``."""
    constants = {"L": 4, "rho": 0, "sigma": 1, "sigma_tilde": 2, "sigma_H": 1, "inner_lr": 0.025}
    path.write_text(json.dumps({**constants, **extra}))
    return path


def iterations(out: str) -> int:
    return int(next(line for line in out.splitlines() if line.startswith("iterations")).split()[1])


def test_delta_defaults_to_the_estimated_meta_loss(tmp_path, capsys):
    # 500 Delta L / eps^2 = 500 * Delta * 4 / 64 = 31.25 Delta.
    base = ["--eps", "8", "--variants", "maml", "--iteration_constant", "500"]
    with_loss = write_estimate(tmp_path / "a.json", meta_loss=2.0)
    assert main(["plan", "--from", str(with_loss), *base]) == 0
    assert iterations(capsys.readouterr().out) == 63  # 62.5 -> 63
    assert main(["plan", "--from", str(with_loss), *base, "--Delta", "3"]) == 0
    out = capsys.readouterr().out
    assert (
        iterations(out) == 94 and "Delta of the iterations: 3 (given: --Delta)" in out
    )  # 93.75 -> 94
    assert main(["plan", "--from", str(write_estimate(tmp_path / "b.json")), *base]) == 0
    out = capsys.readouterr().out
    assert iterations(out) == 32 and "Delta of the iterations: 1 (NOT KNOWN: taken as 1" in out


def test_write_config_refuses_a_recipe_without_a_task_family(tmp_path, capsys):
    recipe = {"model": {"model": {"class_path": "lightning_maml.models.ConvNet"}},
              "data": {"class_path": "lightning_maml.datamodules.OmniglotDataModule"}}  # fmt: skip
    source = write_estimate(tmp_path / "est.json", recipe=recipe)
    args = ["--from", str(source), "--eps", "8", "--variants", "maml"]
    line = plan_error(capsys, *args, "--write_config", str(tmp_path / "p.yaml"))
    assert f"--write_config: the recipe of {source} trains on " in line
    assert "lightning_maml.datamodules.OmniglotDataModule" in line
    assert "LinearTasksDataModule, SinusoidDataModule" in line
    assert not (tmp_path / "p.yaml").exists()
    assert main(["plan", *args]) == 0  # the plan itself is still printed without --write_config


@pytest.mark.parametrize(
    "spelling",
    [
        "lightning_maml.datamodules.SinusoidDataModule",
        "lightning_maml.datamodules.sinusoid.SinusoidDataModule",
        "datamodules.SinusoidDataModule",
    ],
)
def test_a_task_family_is_known_by_each_of_its_class_paths(tmp_path, spelling):
    recipe = {"model": {"model": {"class_path": "lightning_maml.models.MLP"}, "loss": "mse"},
              "data": {"class_path": spelling, "init_args": {"input_range": [-2.0, 2.0]}}}  # fmt: skip
    source = write_estimate(tmp_path / "est.json", recipe=recipe)
    target = tmp_path / "p.yaml"
    args = [
        "--from",
        str(source),
        "--eps",
        "8",
        "--variants",
        "maml",
        "--write_config",
        str(target),
    ]
    assert main(["plan", *args]) == 0
    config = yaml.safe_load(target.read_text())
    assert config["data"]["class_path"] == "lightning_maml.datamodules.SinusoidDataModule"
    sampler = config["trainer"]["callbacks"][1]["init_args"]["sampler"]
    assert sampler["init_args"]["input_range"] == [-2.0, 2.0]  # the family's own inputs


def test_dim_and_spread_do_not_apply_to_an_estimated_recipe(tmp_path, capsys):
    recipe = {"model": {"model": {"class_path": "torch.nn.Linear"}},
              "data": {"class_path": "lightning_maml.datamodules.LinearTasksDataModule"}}  # fmt: skip
    source = write_estimate(tmp_path / "est.json", recipe=recipe)
    line = plan_error(capsys, "--from", str(source), "--eps", "8", "--dim", "5")
    assert f"--from {source} names its recipe" in line and "Leave them out" in line


def test_the_linear_recipe_is_written_as_it_was_estimated(tmp_path, capsys):
    estimate = tmp_path / "est.json"
    args = [*SMALL, "--data.init_args.spread", "2.0", "--output", str(estimate)]
    assert main(["estimate", "--config", RECIPE, *args]) == 0
    target = tmp_path / "p.yaml"
    plan_args = ["--from", str(estimate), "--eps", "100", "--variants", "maml"]
    assert main(["plan", *plan_args, "--write_config", str(target)]) == 0
    config = yaml.safe_load(target.read_text())
    data = config["data"]["init_args"]
    monitor = config["trainer"]["callbacks"][1]["init_args"]["sampler"]
    assert config["model"]["model"]["class_path"] == "torch.nn.Linear"
    assert data["spread"] == monitor["init_args"]["spread"] == 2.0
    assert monitor["class_path"] == "lightning_maml.datamodules.LinearTasks"
