"""Real 2-process CPU DDP (gloo): ranks stay identical and match one process on the same tasks."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules import SinusoidDataModule
from lightning_maml import FOMAML, HFMAML, MAML, MetaLearner
from lightning_maml.models import MLP

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


class SaveParameters(L.Callback):
    """Each rank writes its final parameters, so the test can compare the ranks."""

    def __init__(self, directory) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        state = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def fit(algorithm, directory, devices: int) -> None:
    L.seed_everything(0)
    learner = MetaLearner(MLP(hidden=16), algorithm, "mse")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=8,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveParameters(directory)],
    )
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=6, hessian_shots=5))


@pytest.mark.parametrize(
    "algorithm",
    [MAML(0.05, 2), FOMAML(0.05), HFMAML(0.05, hessian_batch="independent")],
    ids=lambda a: type(a).__name__,
)
def test_two_ranks_match_one_process(algorithm, tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    fit(algorithm, tmp_path / "ddp", devices=2)
    fit(algorithm, tmp_path / "single", devices=1)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    L.seed_everything(0)
    initial = {f"model.{n}": p for n, p in MLP(hidden=16).named_parameters()}
    for name, value in rank0.items():
        torch.testing.assert_close(rank1[name], value, rtol=0, atol=0)
        torch.testing.assert_close(value, single[name], rtol=0, atol=1e-5)
    # Training moved the parameters well beyond the tolerance used above.
    assert max((single[n] - p).abs().max() for n, p in initial.items()) > 1e-3
