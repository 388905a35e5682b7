"""Bad input is named before anything trains: shapes, dtypes, labels, settings, files.

Each case reproduces what a user met, through the CLI where they met it there, and checks the
message says what arrived, what was expected and what to change.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_maml import HFMAML, MAML, MetaLearner, TaskBatch
from lightning_maml.cli import main
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP, ConvNet
from tests.recipes.test_recipes import write_omniglot

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SINUSOID = str(RECIPES / "sinusoid" / "maml.yaml")
CSV = [
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def sinusoid_tasks(tasks: int = 3, shots: int = 5) -> TaskBatch:
    x = torch.rand(tasks, 2 * shots, 1) * 10 - 5
    y = torch.sin(x)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def fit_one_step(learner: MetaLearner, batch: TaskBatch) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))


# -- TaskBatch -----------------------------------------------------------------------------


def test_one_task_without_its_task_dimension_is_refused():
    batch = sinusoid_tasks()
    one = [t[0] for t in batch.named_tensors().values()]  # (shots, 1): K tasks of one example
    with pytest.raises(ValueError, match=r"support_x has shape \(5, 1\).*x\.unsqueeze\(0\)"):
        TaskBatch(*one)


def test_empty_sets_and_no_tasks_are_refused():
    batch = sinusoid_tasks()
    with pytest.raises(ValueError, match="support_x has no examples"):
        TaskBatch(batch.support_x[:, :0], batch.support_y[:, :0], batch.query_x, batch.query_y)
    with pytest.raises(ValueError, match="query_x has no examples"):
        TaskBatch(batch.support_x, batch.support_y, batch.query_x[:, :0], batch.query_y[:, :0])
    with pytest.raises(ValueError, match="TaskBatch has no tasks"):
        TaskBatch(*(t[:0] for t in batch.named_tensors().values()))


# -- targets against the model and the loss, at the first batch ---------------------------


def test_mse_targets_that_would_broadcast_are_refused_before_training():
    batch = sinusoid_tasks()
    flat = TaskBatch(batch.support_x, batch.support_y[..., 0], batch.query_x, batch.query_y[..., 0])
    learner = MetaLearner(MLP(hidden=8), MAML(0.01), loss="mse")
    before = [p.detach().clone() for p in learner.parameters()]
    with pytest.raises(
        ValueError,
        match=r"predicts \(1,\) per example and the support targets are \(\) per.*unsqueeze",
    ):
        fit_one_step(learner, flat)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters(), strict=True))


def image_tasks(labels: torch.Tensor, tasks: int = 2) -> TaskBatch:
    x = torch.rand(tasks, len(labels), 1, 28, 28)
    y = labels.expand(tasks, -1)
    return TaskBatch(x, y, x, y)


def test_float_labels_with_cross_entropy_are_refused():
    learner = MetaLearner(ConvNet(1, 5, 8, 28), MAML(0.4), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"needs integer class labels.*float32"):
        fit_one_step(learner, image_tasks(torch.arange(5).float()))


def test_more_ways_than_model_outputs_are_refused():
    learner = MetaLearner(ConvNet(1, 5, 8, 28), MAML(0.4), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"go from 0 to 19, but the model has 5 outputs"):
        fit_one_step(learner, image_tasks(torch.arange(20)))


def test_inputs_the_model_cannot_take_are_named():
    learner = MetaLearner(ConvNet(3, 5, 8, 28), MAML(0.4), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"cannot take this batch's inputs.*\(5, 1, 28, 28\)"):
        fit_one_step(learner, image_tasks(torch.arange(5)))


def test_evaluation_batches_are_checked_too():
    learner = MetaLearner(MLP(hidden=8), MAML(0.01), loss="mse")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    batch = sinusoid_tasks()
    flat = TaskBatch(batch.support_x, batch.support_y[..., 0], batch.query_x, batch.query_y[..., 0])
    with pytest.raises(ValueError, match="element by element"):
        trainer.test(learner, torch.utils.data.DataLoader([flat], batch_size=None), verbose=False)


def test_infinite_inner_lr_is_refused():
    for algorithm in (MAML, HFMAML):
        with pytest.raises(ValueError, match="positive finite number, got inf"):
            algorithm(inner_lr=math.inf)


# -- through the CLI -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    write_omniglot(root)
    return root


def test_cli_more_ways_in_the_data_than_in_the_model(omniglot_root, tmp_path, capsys):
    args = [
        "fit",
        "--config",
        str(RECIPES / "omniglot" / "maml_5w1s.yaml"),
        *CSV,
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=1",
        f"--data.init_args.root={omniglot_root}",
        "--data.init_args.download=false",
        "--data.init_args.ways=20",
        "--data.init_args.val_characters=20",
        "--data.init_args.test_characters=20",
        "--data.init_args.meta_batch_size=2",
        "--data.init_args.num_workers=0",
    ]
    assert main(args) == 1
    line = last_line(capsys)
    assert line.startswith("lightning-maml: error: ValueError: The support labels go from 0 to 19")
    assert "--model.model.init_args.ways 20" in line


def test_cli_missing_data_names_the_folder_last(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = str(RECIPES / "omniglot" / "maml_5w1s.yaml")
    assert main(["fit", "--config", recipe, *CSV, "--data.init_args.download=false"]) == 1
    line = last_line(capsys)
    assert line.startswith("lightning-maml: error: FileNotFoundError: no Omniglot data under")
    assert "Given value" not in line and "Union" not in line


def test_cli_hfmaml_delta_on_a_recipe_that_sets_delta_scale(tmp_path, capsys):
    recipe = str(RECIPES / "sinusoid" / "hfmaml.yaml")
    args = ["fit", "--config", recipe, *CSV, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main([*args, "--model.algorithm.init_args.delta=0.001"]) == 1
    assert "--model.algorithm.init_args.delta_scale null" in last_line(capsys)


@pytest.fixture(scope="module")
def sinusoid_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sinusoid")
    done = main(
        [
            "fit",
            "--config",
            SINUSOID,
            *CSV,
            f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.max_steps=5",
            "--trainer.val_check_interval=5",
            "--data.init_args.num_val_tasks=4",
        ]
    )
    assert done is None, "the command failed; its error is printed above"
    (last,) = root.rglob("last.ckpt")
    return last


def cli_test(ckpt: Path, tmp_path: Path, *extra: str) -> int | None:
    return main(
        [
            "test",
            "--config",
            SINUSOID,
            *CSV,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.init_args.num_test_tasks=4",
            f"--ckpt_path={ckpt}",
            *extra,
        ]
    )


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_cli_unreadable_checkpoint_is_named(sinusoid_checkpoint, tmp_path, capsys, damage):
    broken = tmp_path / "broken.ckpt"
    data = sinusoid_checkpoint.read_bytes()
    broken.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    assert cli_test(broken, tmp_path) == 1
    line = last_line(capsys)
    assert line.startswith(f"lightning-maml: error: ValueError: cannot read checkpoint {broken}")
    assert "truncated" in line and "other .ckpt files" in line


def test_cli_missing_checkpoint_is_named(tmp_path, capsys):
    assert cli_test(tmp_path / "nowhere.ckpt", tmp_path) == 1
    assert "nowhere.ckpt: no such file" in last_line(capsys)


def test_cli_checkpoint_of_another_model_is_refused(sinusoid_checkpoint, tmp_path, capsys):
    assert cli_test(sinusoid_checkpoint, tmp_path, "--model.model.init_args.hidden=20") == 1
    line = last_line(capsys)
    assert "was trained with a different model" in line
    assert "model.init_args.hidden: 20 here, 40 in it" in line


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_estimate_names_an_unreadable_checkpoint(sinusoid_checkpoint, tmp_path, capsys, damage):
    broken = tmp_path / "broken.ckpt"
    if damage == "truncated":
        data = sinusoid_checkpoint.read_bytes()
        broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as exit_:
        main(["estimate", "--config", SINUSOID, f"--ckpt_path={broken}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lightning-maml estimate: error: ")
    if damage == "missing":
        assert f"ckpt_path {broken}: no such file" in line
    else:
        assert f"cannot read checkpoint {broken}" in line and "truncated" in line


def test_estimate_names_a_checkpoint_of_another_model(sinusoid_checkpoint, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "estimate",
                "--config",
                SINUSOID,
                f"--ckpt_path={sinusoid_checkpoint}",
                "--model.model.init_args.hidden=20",
            ]
        )
    assert "was trained with a different model" in last_line(capsys)


@pytest.fixture
def diverged_checkpoint(sinusoid_checkpoint, tmp_path) -> Path:
    checkpoint = torch.load(sinusoid_checkpoint, weights_only=True)
    checkpoint["state_dict"]["model.2.weight"][0, 0] = float("nan")
    path = tmp_path / "diverged.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("command", ["fit", "test"])
def test_cli_non_finite_weights_in_a_checkpoint_are_named(
    command, diverged_checkpoint, tmp_path, capsys
):
    # Before, testing it warned that val/test loss was not finite and blamed inner_lr.
    args = [command, "--config", SINUSOID, *CSV, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    small = ["--trainer.max_steps=6", "--data.init_args.num_test_tasks=4"]
    assert main([*args, *small, f"--ckpt_path={diverged_checkpoint}"]) == 1
    line = last_line(capsys)
    assert (
        f"the checkpoint {diverged_checkpoint} holds non-finite values in model.2.weight: it "
        "was saved after training diverged; resume or test from an earlier checkpoint"
    ) in line


def test_python_non_finite_weights_in_a_checkpoint_are_named(diverged_checkpoint):
    with pytest.raises(ValueError, match=r"holds non-finite values in model\.2\.weight"):
        MetaLearner.load_from_checkpoint(diverged_checkpoint)


@pytest.mark.parametrize(
    ("command", "name"), [("test", "best"), ("validate", "best"), ("fit", "last")]
)
def test_cli_best_and_last_say_to_give_the_file(command, name, tmp_path, capsys):
    # Before, `test --ckpt_path best` said ModelCheckpoint was not configured (the recipe
    # configures one), and `fit --ckpt_path last` trained from scratch after a warning.
    args = [command, "--config", SINUSOID, *CSV, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    small = ["--trainer.max_steps=2", "--data.init_args.num_val_tasks=4"]
    assert main([*args, *small, "--data.init_args.num_test_tasks=4", f"--ckpt_path={name}"]) == 1
    line = last_line(capsys)
    assert f"--ckpt_path {name} names" in line
    assert "a fit run earlier in the same Python process" in line
    assert "RUN/checkpoints/last.ckpt" in line and "the best one's file" in line
    assert not list(tmp_path.rglob("metrics.csv")), "nothing ran"


def test_cli_non_finite_validation_is_logged_and_named(tmp_path, capsys):
    # inner_lr 0.3 trains (one inner step) but diverges over the 10 evaluation steps. Before,
    # val/loss vanished from the logs, or the run died on the checkpoint's missing monitor key.
    args = [
        "fit",
        "--config",
        SINUSOID,
        *CSV,
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--model.algorithm.init_args.inner_lr=0.3",
        "--trainer.max_steps=20",
        "--trainer.val_check_interval=10",
        "--trainer.num_sanity_val_steps=0",
        "--data.init_args.num_val_tasks=20",
    ]
    with pytest.warns(UserWarning, match=r"val/loss is not finite at global step 10.*inner_lr"):
        assert main(args) is None
    (metrics,) = tmp_path.rglob("metrics.csv")
    losses = [r["val/loss"] for r in csv.DictReader(metrics.open()) if r.get("val/loss")]
    assert len(losses) == 2 and all(not math.isfinite(float(v)) for v in losses)
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 20


def test_python_data_and_model_mismatch_before_any_step():
    learner = MetaLearner(MLP(in_features=2, hidden=8), MAML(0.01), loss="mse")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="cannot take this batch's inputs"):
        trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2))


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: SinusoidDataModule(meta_batch_size=True), "meta_batch_size"),
        (lambda: SinusoidDataModule(shots=2.0), "shots"),
        (lambda: SinusoidDataModule(hessian_shots=-1), "hessian_shots"),
        (lambda: MAML(0.1, inner_steps=True), "inner_steps"),
        (lambda: MetaLearner(MLP(), MAML(0.1), eval_inner_steps=0), "eval_inner_steps"),
    ],
    ids=["bool-meta-batch", "float-shots", "negative-hessian", "bool-steps", "zero-eval-steps"],
)
def test_counts_are_checked_alike_everywhere(build, name):
    # One check: before, meta_batch_size=True was accepted where inner_steps=True was refused.
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= "):
        build()


# -- what the command line says (each case as a user met it) -------------------------------


def test_cli_test_without_a_checkpoint_says_it_tested_the_initialisation(tmp_path, capsys):
    args = ["test", "--config", SINUSOID, *CSV, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    with pytest.warns(
        UserWarning,
        match=r"no --ckpt_path: `lightning-maml test` evaluates the "
        r"model's initialisation.*--ckpt_path .*checkpoints/last\.ckpt",
    ):
        assert main([*args, "--data.init_args.num_test_tasks=4"]) is None
    # Before: a paper-style line for random weights, no word about it.
    (summary,) = [line for line in capsys.readouterr().out.splitlines() if "test loss" in line]
    assert summary.endswith("over 4 tasks -- UNTRAINED: the initialisation, no --ckpt_path given")


def test_cli_test_of_a_checkpoint_is_not_labelled_untrained(sinusoid_checkpoint, tmp_path, capsys):
    assert cli_test(sinusoid_checkpoint, tmp_path) is None
    (summary,) = [line for line in capsys.readouterr().out.splitlines() if "test loss" in line]
    assert summary.endswith("over 4 tasks")


def test_cli_help_lists_every_subcommand(capsys):
    from lightning_maml.cli import TOOLS
    from lightning_maml.subcommands import TOOL_DESCRIPTIONS, TRAINER_DESCRIPTIONS

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the descriptions
    assert set(TOOL_DESCRIPTIONS) == set(TOOLS)
    for name, description in {**TRAINER_DESCRIPTIONS, **TOOL_DESCRIPTIONS}.items():
        assert f"{name} {description}" in out
    assert "predict" not in out


def test_cli_predict_is_refused_with_what_to_use(capsys):
    # Before: Lightning's "`predict_dataloader` must be implemented" from deep in the loop.
    assert main(["predict", "--config", SINUSOID]) == 2
    line = last_line(capsys)
    assert line.startswith("lightning-maml: error: predict is not available: a meta-learner")
    assert "lightning-maml test --config RECIPE.yaml --ckpt_path CKPT" in line


def test_cli_yaml_error_in_a_second_config_names_the_file_and_line(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("trainer:\n  max_steps: 3\n  limit_val_batches: [1, 2\n")
    assert main(["fit", "--config", SINUSOID, "--config", str(override)]) == 2
    line = last_line(capsys)
    assert line.startswith(f"lightning-maml: error: --config {override}: not valid YAML, line 4, ")
    assert "flow sequence at line 3, column 22" in line


def test_cli_negative_data_seed_names_the_argument(tmp_path, capsys):
    args = ["fit", "--config", SINUSOID, *CSV, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main([*args, "--data.init_args.seed=-1"]) == 1
    assert last_line(capsys) == (
        "lightning-maml: error: ValueError: seed must be an integer >= 0, got -1."
    )


def test_cli_non_finite_meta_loss_advises_the_option_that_works(tmp_path, capsys):
    args = [
        "fit",
        "--config",
        SINUSOID,
        *CSV,
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=2",
        "--trainer.num_sanity_val_steps=0",
    ]
    assert main([*args, "--model.algorithm.init_args.inner_lr=1e30"]) == 1
    line = last_line(capsys)
    assert "FloatingPointError: Non-finite meta-loss at global step 0" in line
    assert "--model.gradient_clip_val" in line
    # The advised option is accepted by the command line (the Trainer's is refused under
    # manual optimization).
    assert main([*args, "--model.gradient_clip_val=1.0"]) is None


# -- one run per run directory -------------------------------------------------------------


def locked_fit(save_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        SINUSOID,
        *CSV,
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.logger.init_args.version=7",
        "--data.init_args.num_val_tasks=4",
        *extra,
    ]


@pytest.mark.slow
def test_cli_second_run_into_a_run_directory_in_use_is_refused(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(RECIPES.parent), "WANDB_MODE": "disabled"}
    long_run = locked_fit(
        tmp_path,
        "--trainer.max_steps=1000000",
        "--trainer.log_every_n_steps=1",
        "--trainer.logger.init_args.flush_logs_every_n_steps=1",
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "lightning_maml.cli", *long_run],
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "lightning_logs" / "version_7" / "metrics.csv"
    try:
        deadline = time.monotonic() + 180
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 2):
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "the first run logged nothing in 180 s"
            time.sleep(0.5)
        assert main(locked_fit(tmp_path, "--trainer.max_steps=1")) == 1
        line = last_line(capsys)
        assert line.startswith(
            "lightning-maml: error: RunDirectoryInUse: the run directory "
            f"{metrics.parent.resolve()} is in use by another run"
        )
        assert "--trainer.logger.init_args.version" in line
        # Refused before Lightning's CSVLogger emptied the first run's metrics.csv.
        rows = list(csv.DictReader(metrics.open()))
        assert rows and rows[0]["step"] == "0"
    finally:
        first.kill()
        first.wait()
    # Killed, the first run holds nothing: the directory is free again.
    assert main(locked_fit(tmp_path, "--trainer.max_steps=1")) is None


def test_python_trainer_with_the_lock_callback(tmp_path):
    from filelock import FileLock
    from lightning.pytorch.loggers import CSVLogger

    from lightning_maml.callbacks.run_lock import RunDirectoryInUse, RunDirectoryLock

    def fit() -> None:
        trainer = L.Trainer(
            max_steps=1,
            logger=CSVLogger(tmp_path, version=3),
            callbacks=[RunDirectoryLock()],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(MetaLearner(MLP(hidden=8), MAML(0.01)), SinusoidDataModule(meta_batch_size=2))

    fit()
    fit()  # the first released its lock at teardown
    held = FileLock(tmp_path / "lightning_logs" / ".version_3.lock")  # another holder
    with held, pytest.raises(RunDirectoryInUse, match=r"version_3 is in use by another run"):
        fit()
    fit()  # and a refused run holds nothing either
