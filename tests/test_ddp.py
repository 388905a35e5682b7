"""Real 2-process CPU DDP (gloo): ranks stay identical and match one process on the same tasks."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from lightning_maml import FOMAML, HFMAML, MAML, MetaLearner, MetaSGD, PerStepRates
from lightning_maml.callbacks import ModelCheckpoint
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


class SaveParameters(L.Callback):
    """Each rank writes its final parameters, so the test can compare the ranks."""

    def __init__(self, directory) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        state = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


class SaveFirstBatch(L.Callback):
    """Each rank writes the first support batch it trained on."""

    def __init__(self, directory) -> None:
        self.directory = directory

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            torch.save(batch.support_x, self.directory / f"batch{trainer.global_rank}.pt")


def fit(algorithm, directory, devices: int, max_steps: int = 8, ckpt_path=None, callbacks=()):
    L.seed_everything(0)
    learner = MetaLearner(MLP(hidden=16), algorithm, "mse")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveParameters(directory), SaveFirstBatch(directory), *callbacks],
    )
    data = SinusoidDataModule(meta_batch_size=6, hessian_shots=5)
    trainer.fit(learner, datamodule=data, ckpt_path=ckpt_path)


@pytest.mark.parametrize(
    "algorithm",
    [
        MAML(0.05, 2),
        MAML(0.05, 2, hessian_batch="independent", backward="recursion"),
        FOMAML(0.05),
        HFMAML(0.05, hessian_batch="independent"),
        # Each process compiles its own copy (compiled functions are not pickled by ddp_spawn).
        FOMAML(0.05, 2, compile=True),
        # Learned step sizes are meta-parameters: all-reduced with the model's.
        MAML(0.05, 2, inner_update=MetaSGD()),
        HFMAML(0.05, 2, inner_update=PerStepRates()),
    ],
    ids=[
        "MAML",
        "MAML-recursion",
        "FOMAML",
        "HFMAML",
        "FOMAML-compiled",
        "MAML-MetaSGD",
        "HFMAML-PerStepRates",
    ],
)
def test_two_ranks_match_one_process(algorithm, tmp_path):
    if algorithm.compile:
        # Compiled before ddp_spawn pickles it, as after an earlier fit in the same process.
        data = SinusoidDataModule(meta_batch_size=2)
        algorithm.meta_gradient(
            MLP(hidden=16), torch.nn.functional.mse_loss, next(iter(data.train_dataloader()))
        )
        assert algorithm._compiled
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    # Learned step sizes belong to one learner: each run its own copy. The others run the one
    # object (the compiled one as ddp_spawn pickles it).
    own = copy.deepcopy if algorithm.inner_update.has_rates else (lambda a: a)
    fit(own(algorithm), tmp_path / "ddp", devices=2)
    fit(own(algorithm), tmp_path / "single", devices=1)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    L.seed_everything(0)
    initial = {f"model.{n}": p for n, p in MLP(hidden=16).named_parameters()}
    assert set(rank0) == set(single)
    if algorithm.inner_update.has_rates:
        assert any(name.startswith("inner_update.lr.") for name in rank0)
    for name, value in rank0.items():
        torch.testing.assert_close(rank1[name], value, rtol=0, atol=0)
        torch.testing.assert_close(value, single[name], rtol=0, atol=1e-5)
    # Training moved the parameters well beyond the tolerance used above.
    assert max((single[n] - p).abs().max() for n, p in initial.items()) > 1e-3


def test_ranks_draw_different_tasks(tmp_path):
    fit(FOMAML(0.05), tmp_path, devices=2, max_steps=1)
    first, second = (torch.load(tmp_path / f"batch{r}.pt") for r in range(2))
    assert first.shape == second.shape == (3, 10, 1)
    assert not torch.equal(first, second)


def test_checkpoint_taken_under_ddp_resumes_on_one_and_two_processes(tmp_path):
    algorithm = HFMAML(0.05, 2)
    for name in ["ddp", "two", "one"]:
        (tmp_path / name).mkdir()
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True
    )
    fit(algorithm, tmp_path / "ddp", devices=2, max_steps=6, callbacks=[checkpoint])
    middle = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    # Written by rank 0 beside their names and renamed, while rank 1 waits: whole, none left over.
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert not list((tmp_path / "ckpt").glob("*.partial"))
    fit(algorithm, tmp_path / "two", devices=2, max_steps=6, ckpt_path=middle)
    fit(algorithm, tmp_path / "one", devices=1, max_steps=6, ckpt_path=middle)
    uninterrupted = torch.load(tmp_path / "ddp" / "rank0.pt")
    for name in ["two", "one"]:
        resumed = torch.load(tmp_path / name / "rank0.pt")
        for key, value in uninterrupted.items():
            # One process sees the union of the two ranks' tasks: equal up to rounding.
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


class LogUnreducedValue(L.Callback):
    """Logs a plain tensor at the end of validation: Lightning's sync_dist advice must remain."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("control/unreduced", torch.tensor(1.0))


@pytest.mark.parametrize("num_val_tasks", [10, 3], ids=["uneven", "one-batch"])
def test_validation_metrics_reduce_over_ranks_without_duplicates(num_val_tasks, capfd):
    results = {}
    for devices in [1, 2]:
        L.seed_everything(0)
        learner = MetaLearner(MLP(hidden=16), MAML(0.05), "mse", eval_inner_steps=3)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[LogUnreducedValue()],
        )
        data = SinusoidDataModule(num_val_tasks=num_val_tasks, eval_meta_batch_size=4)
        results[devices] = trainer.validate(learner, datamodule=data, verbose=False)[0]
    # 10 tasks give each rank 5 (batches of 4 and 1); 3 tasks give the ranks 2 and 1, fewer
    # than one batch. Either way the reduced mean and interval are one process's over all tasks.
    for key in ["val/loss", "val/loss_ci95", "val/loss_before"]:
        assert results[2][key] == pytest.approx(results[1][key], rel=1e-5)
    # The ranks' warnings reach this process's stderr: the advice for a value that is not
    # reduced is printed, and none for the metrics that torchmetrics reduced before logging.
    err = capfd.readouterr().err
    assert "self.log('control/unreduced', ..., sync_dist=True)" in err
    assert "self.log('val/" not in err
