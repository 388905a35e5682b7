"""MetaLearner under real Lightning Trainers: training, evaluation, resume and failure modes."""

from __future__ import annotations

import functools
import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_maml import FOMAML, HFMAML, MAML, MetaLearner
from lightning_maml.datamodules import MetaDataModule, SinusoidDataModule, Task
from lightning_maml.models import MLP


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def sinusoids(**kwargs) -> SinusoidDataModule:
    return SinusoidDataModule(**{"num_val_tasks": 20, "num_test_tasks": 100, **kwargs})


class BlobTasks:
    """Few-shot classification: each class is a Gaussian blob around a random centre."""

    def __init__(self, ways: int = 3, shots: int = 2, query_shots: int = 4) -> None:
        self.ways, self.shots, self.query_shots = ways, shots, query_shots

    def __call__(self, rng: np.random.Generator, split: str) -> Task:
        centres = rng.normal(size=(self.ways, 1, 4)) * 3
        per_class = self.shots + self.query_shots
        x = torch.from_numpy(
            (centres + rng.normal(size=(self.ways, per_class, 4))).astype("float32")
        )
        y = torch.arange(self.ways).repeat_interleave(per_class).view(self.ways, per_class)
        s, q = slice(0, self.shots), slice(self.shots, None)
        return Task(
            x[:, s].reshape(-1, 4), y[:, s].reshape(-1), x[:, q].reshape(-1, 4), y[:, q].reshape(-1)
        )


class BlobDataModule(MetaDataModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(meta_batch_size=4, num_val_tasks=8, num_test_tasks=8, **kwargs)

    def task_sampler(self, split: str) -> BlobTasks:
        return BlobTasks()


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [MAML(0.01), FOMAML(0.01), HFMAML(0.01)], ids=repr)
def test_sinusoid_really_learns(algorithm):
    L.seed_everything(0)
    learner = MetaLearner(MLP(), algorithm, "mse", eval_inner_steps=10)
    data = sinusoids()
    fit = trainer(max_steps=500)
    untrained = fit.test(learner, datamodule=data, verbose=False)[0]["test/loss"]
    fit.fit(learner, datamodule=data)
    trained = fit.test(learner, datamodule=data, verbose=False)[0]["test/loss"]
    # An untrained net adapted for 10 steps still predicts roughly the mean, so its MSE is near
    # the variance of the sinusoids (E[A^2]/2, about 4.2). Measured after 500 meta-steps: about
    # 1.4 for every variant (seed 0); half of the untrained MSE leaves room for seed noise while
    # a model that learned nothing cannot reach it.
    assert untrained > 3.0
    assert trained < 0.5 * untrained


def test_resume_from_checkpoint_ends_at_same_parameters(tmp_path):
    def run(max_steps: int, ckpt_path=None, callbacks=()):
        L.seed_everything(0)
        learner = MetaLearner(
            MLP(hidden=8),
            HFMAML(0.05, inner_steps=2),
            meta_optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5),
        )
        fit = trainer(
            max_steps=max_steps, callbacks=list(callbacks), enable_checkpointing=bool(callbacks)
        )
        fit.fit(learner, datamodule=sinusoids(meta_batch_size=4), ckpt_path=ckpt_path)
        return learner

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    uninterrupted = run(10, callbacks=[checkpoint])
    middle = tmp_path / "epoch=0-step=5.ckpt"
    assert middle.exists()
    resumed = run(10, ckpt_path=middle)
    fresh = run(5)
    for name, value in params(uninterrupted).items():
        torch.testing.assert_close(params(resumed)[name], value, rtol=0, atol=0)
    # The resumed run really continued: it differs from the state it was resumed from.
    assert any(not torch.equal(params(fresh)[n], v) for n, v in params(uninterrupted).items())


def test_non_finite_meta_loss_stops_before_the_update():
    calls = {"n": 0}

    def exploding(prediction, target):
        calls["n"] += 1
        loss = nn.functional.mse_loss(prediction, target)
        return loss * math.inf if calls["n"] > 5 else loss

    class AtBatchStart(L.Callback):
        """The weights as each training step begins."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.step = trainer.global_step

    learner = MetaLearner(MLP(hidden=8), FOMAML(0.01), exploding)
    start = AtBatchStart()
    fit = trainer(max_steps=10, callbacks=[start])
    with pytest.raises(FloatingPointError, match=r"Non-finite meta-loss at global step \d+"):
        fit.fit(learner, datamodule=sinusoids(meta_batch_size=2))
    # The failing step ran its forward passes (the loss was called) but made no update: the
    # weights are those it started with, and no optimizer step was counted for it.
    assert start.step >= 1 and fit.global_step == start.step
    for name, value in params(learner).items():
        torch.testing.assert_close(value, start.weights[name], rtol=0, atol=0)


def test_independent_hessian_without_hessian_shots_fails_before_training():
    learner = MetaLearner(MLP(hidden=8), MAML(0.01, hessian_batch="independent"))
    with pytest.raises(ValueError, match="hessian_shots=0"):
        trainer(max_steps=1).fit(learner, datamodule=sinusoids(hessian_shots=0))
    assert learner.last_meta_step is None


def test_independent_hessian_trains_with_hessian_shots():
    learner = MetaLearner(MLP(hidden=8), MAML(0.01, hessian_batch="independent"))
    trainer(max_steps=2).fit(learner, datamodule=sinusoids(hessian_shots=5, meta_batch_size=2))
    assert learner.last_meta_step is not None


def test_classification_logs_accuracy_with_confidence_interval(tmp_path):
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    learner = MetaLearner(model, MAML(0.5), "cross_entropy", eval_inner_steps=3)
    fit = trainer(
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=None,
        logger=CSVLogger(tmp_path),
    )
    fit.fit(learner, datamodule=BlobDataModule())
    logged = fit.callback_metrics
    for key in [
        "train/loss",
        "train/grad_norm",
        "train/accuracy",
        "val/accuracy",
        "val/accuracy_ci95",
    ]:
        assert key in logged, key
    assert 0.0 <= float(logged["val/accuracy"]) <= 1.0
    assert float(logged["val/accuracy_ci95"]) > 0
    shown = fit.progress_bar_metrics
    assert {"train/loss", "train/grad_norm", "train/accuracy"} <= set(shown)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_evaluation_adapts_under_inference_mode(inference_mode):
    L.seed_everything(0)
    learner = MetaLearner(MLP(hidden=8), MAML(0.1), eval_inner_steps=5)
    data = sinusoids(num_val_tasks=10)
    result = trainer(inference_mode=inference_mode, limit_val_batches=None).validate(
        learner, datamodule=data, verbose=False
    )[0]
    # Adaptation happened: the query loss after 5 steps differs from the one before.
    assert result["val/loss"] < result["val/loss_before"]


def test_scheduler_steps_per_meta_step_and_clipping_bounds_the_update():
    model = MLP(hidden=8)
    learner = MetaLearner(
        model,
        FOMAML(0.01),
        meta_optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        gradient_clip_val=1e-3,
    )
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    fit = trainer(max_steps=1)
    fit.fit(learner, datamodule=sinusoids(meta_batch_size=2))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # SGD with lr 1 moves by exactly the clipped meta-gradient, of norm 1e-3.
    torch.testing.assert_close((after - before).norm(), torch.tensor(1e-3), rtol=1e-4, atol=0)
    assert fit.optimizers[0].param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "hinge"}, "Unknown loss 'hinge'"),
        ({"gradient_clip_val": 0.0}, "gradient_clip_val must be > 0"),
        ({"gradient_clip_algorithm": "l1"}, "gradient_clip_algorithm"),
        ({"eval_inner_steps": 0}, "eval_inner_steps must be an integer >= 1"),
        ({"algorithm": "maml"}, "algorithm must be a MetaAlgorithm"),
    ],
)
def test_bad_learner_arguments_raise(kwargs, match):
    arguments = {"model": MLP(), "algorithm": MAML(0.01), **kwargs}
    with pytest.raises(ValueError, match=match):
        MetaLearner(**arguments)


def test_hyperparameters_are_plain_and_describe_the_variant():
    learner = MetaLearner(
        MLP(), HFMAML(0.01, delta=0.001), meta_optimizer=lambda p: torch.optim.SGD(p, 0.1)
    )
    algorithm = learner.hparams["algorithm"]
    assert algorithm["class_path"] == "lightning_maml.algorithms.hfmaml.HFMAML"
    assert algorithm["init_args"]["delta"] == 0.001
    assert learner.hparams["model"] == {"class_path": "lightning_maml.models.MLP"}
    assert isinstance(learner.hparams["meta_optimizer"], str)
