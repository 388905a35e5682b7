"""Checkpoints a user can trust: ``last.ckpt`` is the newest state, given settings take effect.

Each case first reproduces what a user met (through the CLI where they met it there).
"""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from lightning_maml import MAML, MetaLearner
from lightning_maml.callbacks import ModelCheckpoint
from lightning_maml.cli import main
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SINUSOID = str(RECIPES / "sinusoid" / "maml.yaml")
# A short CPU run of the shipped recipe: CSV logs instead of W&B, few evaluation tasks.
QUICK = [
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.num_val_tasks=10",
    "--data.init_args.num_test_tasks=50",
    "--data.init_args.eval_meta_batch_size=50",
]
TEST_LOSS = re.compile(r"^test loss: \S+ \+/- \S+ over 50 tasks$", re.M)


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def fit(tmp_path: Path, *args: str, recipe: str = SINUSOID) -> Path:
    """Runs ``lightning-maml fit`` on the recipe; returns the run's checkpoint folder."""
    done = main(
        [
            "fit",
            "--config",
            recipe,
            *QUICK,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *args,
        ]
    )
    assert done is None, "the command failed; its error is printed above"
    (folder,) = {p.parent for p in tmp_path.rglob("*.ckpt")}
    return folder


def cli_test(tmp_path: Path, capsys, *args: str) -> float:
    """``lightning-maml test`` on the recipe; returns the test loss it logged.

    The printed line rounds the mean to the precision of its interval; the CSV log has it all.
    """
    save_dir = tmp_path / f"test-{len(list(tmp_path.glob('test-*')))}"
    capsys.readouterr()
    done = main(
        [
            "test",
            "--config",
            SINUSOID,
            *QUICK,
            f"--trainer.logger.init_args.save_dir={save_dir}",
            *args,
        ]
    )
    assert done is None, "the command failed; its error is printed above"
    assert TEST_LOSS.search(capsys.readouterr().out)
    (metrics,) = save_dir.rglob("metrics.csv")
    (row,) = [r for r in csv.DictReader(metrics.open()) if r.get("test/loss")]
    return float(row["test/loss"])


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory) -> Path:
    """A 120-step run of the sinusoid recipe validated every 50 steps: its checkpoint folder."""
    root = tmp_path_factory.mktemp("sinusoid-run")
    return fit(root, "--trainer.max_steps=120", "--trainer.val_check_interval=50")


def test_last_checkpoint_holds_the_end_of_fit(sinusoid_run):
    # Lightning's ModelCheckpoint(monitor=..., save_last=True) left last.ckpt at step 100 here.
    assert step_of(sinusoid_run / "last.ckpt") == 120
    assert step_of(sinusoid_run / "epoch=0-step=100.ckpt") == 100


class ConstantMetric(Callback):
    """Logs a validation metric that never improves after its first value, and records, before
    each training step, the global step that ``last.ckpt`` holds."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[tuple[int, int]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("val/constant", 1.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = self.folder / "last.ckpt"
        if last.exists():
            self.seen.append((trainer.global_step, step_of(last)))


def run_with(checkpoint_class, tmp_path: Path) -> tuple[list[tuple[int, int]], int]:
    L.seed_everything(0)
    folder = tmp_path / checkpoint_class.__module__
    recorder = ConstantMetric(folder)
    checkpoint = checkpoint_class(
        dirpath=folder, monitor="val/constant", mode="max", save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=25,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[recorder, checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    learner = MetaLearner(MLP(hidden=8), MAML(0.01))
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2, num_val_tasks=2))
    return recorder.seen, step_of(folder / "last.ckpt")


def test_last_checkpoint_follows_every_validation_when_the_metric_stops_improving(tmp_path):
    # Lightning's own callback: last.ckpt stays at the first validation (step 10) for the run.
    seen, final = run_with(LightningModelCheckpoint, tmp_path)
    assert {held for _, held in seen} == {10} and final == 10
    seen, final = run_with(ModelCheckpoint, tmp_path)
    # Before step 21, last.ckpt holds step 20 (the second validation); at the end, step 25.
    assert (21, 20) in seen and (11, 10) in seen
    assert final == 25


def test_step_checkpoints_save_the_meta_updated_weights_without_a_warning(tmp_path):
    def fit(checkpoint_class) -> tuple[list[str], Path]:
        folder = tmp_path / checkpoint_class.__module__
        checkpoint = checkpoint_class(
            dirpath=folder, every_n_train_steps=2, save_top_k=-1, filename="{step}"
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=4,
            limit_val_batches=0,
            logger=False,
            callbacks=[checkpoint],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        learner = MetaLearner(MLP(hidden=8), MAML(0.01))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2, num_val_tasks=2))
        said = [str(w.message) for w in caught if "pre-optimization state" in str(w.message)]
        saved = torch.load(folder / "step=4.ckpt", weights_only=True)["state_dict"]
        assert all(torch.equal(saved[k], v) for k, v in learner.state_dict().items())
        return said, folder

    said, _ = fit(LightningModelCheckpoint)
    assert said, "Lightning's callback warns at each save (the check below would pass vacuously)"
    said, folder = fit(ModelCheckpoint)
    assert not said
    assert sorted(p.name for p in folder.iterdir()) == ["step=2.ckpt", "step=4.ckpt"]


def evaluate_in_python(ckpt: Path, steps: int, inner_lr: float) -> float:
    """The reference: the checkpoint adapted in Python on the CLI run's test tasks."""
    learner = MetaLearner.load_from_checkpoint(ckpt)
    learner.algorithm = MAML(inner_lr)
    data = SinusoidDataModule(
        shots=10, query_shots=10, meta_batch_size=25, num_test_tasks=50, eval_meta_batch_size=50
    )
    (batch,) = list(data.test_dataloader())
    return learner.evaluate(batch, inner_steps=steps).loss.item()


@pytest.mark.parametrize(
    ("args", "steps", "inner_lr", "named"),
    [
        ([], 10, 0.01, None),
        (["--model.eval_inner_steps=1"], 1, 0.01, "eval_inner_steps: 1 (the checkpoint has 10)"),
        (
            ["--model.algorithm.init_args.inner_lr=0.05"],
            10,
            0.05,
            "algorithm.init_args.inner_lr: 0.05 (the checkpoint has 0.01)",
        ),
    ],
    ids=["as-trained", "eval_inner_steps", "inner_lr"],
)
def test_settings_given_with_ckpt_path_take_effect(
    sinusoid_run, tmp_path, capsys, args, steps, inner_lr, named
):
    # Before: LightningCLI loaded the checkpoint's settings over the command line, so the
    # 1-step test printed the 10-step loss.
    ckpt = sinusoid_run / "last.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        printed = cli_test(tmp_path, capsys, f"--ckpt_path={ckpt}", *args)
    differ = [str(w.message) for w in caught if "differ from those saved" in str(w.message)]
    if named is None:
        assert not differ
    else:
        assert len(differ) == 1 and named in differ[0]
    assert printed == pytest.approx(evaluate_in_python(ckpt, steps, inner_lr), rel=1e-4)


def test_one_and_ten_test_time_steps_differ(sinusoid_run, tmp_path, capsys):
    ckpt = f"--ckpt_path={sinusoid_run / 'last.ckpt'}"
    one = cli_test(tmp_path, capsys, ckpt, "--model.eval_inner_steps=1")
    ten = cli_test(tmp_path, capsys, ckpt, "--model.eval_inner_steps=10")
    assert one != ten


def test_a_checkpoint_of_another_model_built_in_python_is_refused_by_name(tmp_path):
    # Built in Python, the model is not among the saved settings: its weights must tell.
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        MetaLearner(MLP(hidden=8), MAML(0.01)), datamodule=SinusoidDataModule(meta_batch_size=2)
    )
    (ckpt,) = tmp_path.rglob("*.ckpt")
    other = MetaLearner(MLP(hidden=16), MAML(0.01))
    data = SinusoidDataModule(meta_batch_size=2, num_test_tasks=4)
    with pytest.raises(
        ValueError, match=r"different model \(model\.0\.weight: \(8, 1\) in it, \(16, 1\) here"
    ):
        trainer.test(other, datamodule=data, ckpt_path=ckpt)
    with pytest.raises(ValueError, match="different model"):
        MetaLearner.load_from_checkpoint(ckpt, model=MLP(hidden=16), algorithm=MAML(0.01))
    # The same model loads.
    assert trainer.test(MetaLearner(MLP(hidden=8), MAML(0.01)), datamodule=data, ckpt_path=ckpt)
