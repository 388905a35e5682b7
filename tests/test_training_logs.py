"""The learner logs its training metrics on the steps a logger writes, and at a fit's ends."""

from __future__ import annotations

import csv

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_maml import FOMAML, MetaLearner
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP


class CountingLearner(MetaLearner):
    """Notes the (0-based) training step of every ``train/loss`` it logs."""

    logged_steps: list[int]

    def log(self, name: str, *args, **kwargs) -> None:
        if name == "train/loss":
            # Logged after the optimizer step, which global_step already counts.
            self.__dict__.setdefault("logged_steps", []).append(self.global_step - 1)
        super().log(name, *args, **kwargs)


def test_training_metrics_are_logged_on_logging_steps_and_at_both_ends(tmp_path):
    L.seed_everything(0)
    learner = CountingLearner(MLP(hidden=8), FOMAML(0.01), "mse")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=8,
        log_every_n_steps=3,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=4))
    # Steps 2 and 5 are logging steps (every third); 0 and 7 are the first and the last.
    assert learner.logged_steps == [0, 2, 5, 7]
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        written = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert written == [2, 5]
    # What a script reads after fit is the last step's loss, not a stale one.
    final = learner.last_meta_step.loss
    assert trainer.callback_metrics["train/loss"] == final
    assert trainer.progress_bar_metrics["train/loss"] == final.item()
