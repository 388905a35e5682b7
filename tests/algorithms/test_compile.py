"""``compile=True``: torch.compile gives the eager results, compiles once, and survives pickling."""

from __future__ import annotations

import pickle

import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters

from lightning_maml import FOMAML, HFMAML, MAML, MetaLearner
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.datamodules.base import TrainTaskStream
from lightning_maml.functional import mse_loss
from lightning_maml.models import MLP

pytestmark = pytest.mark.slow  # each case compiles (seconds to tens of seconds on a CPU)


def batch(tasks: int = 6, seed: int = 0):
    data = SinusoidDataModule(meta_batch_size=tasks, hessian_shots=5)
    return TrainTaskStream(data.task_sampler("train"), tasks, seed).batch(0)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "variant",
    [
        lambda **k: MAML(0.01, 2, **k),
        lambda **k: MAML(0.01, 1, hessian_batch="independent", **k),
        lambda **k: FOMAML(0.01, 2, **k),
        lambda **k: HFMAML(0.01, 2, **k),
        lambda **k: MAML(0.01, 2, hessian_batch="independent", backward="recursion", **k),
        lambda **k: HFMAML(0.01, 2, hvp="forward", **k),
    ],
    ids=[
        "MAML-2steps",
        "MAML-independent",
        "FOMAML-2steps",
        "HFMAML-2steps",
        "MAML-recursion",
        "HFMAML-forward",
    ],
)
def test_compiled_meta_gradient_matches_eager(variant):
    torch.manual_seed(0)
    model = MLP(hidden=16)
    tasks = batch()
    eager = variant().meta_gradient(model, mse_loss, tasks)
    compiled_algorithm = variant(compile=True)
    compiled = compiled_algorithm.meta_gradient(model, mse_loss, tasks)
    for name, grad in eager.grads.items():
        # Inductor fuses and reorders float32 sums; HF-MAML's difference quotient divides that
        # rounding by 2 delta, so it gets a looser tolerance.
        finite_difference = getattr(compiled_algorithm, "hvp", None) == "finite_difference"
        rtol = 1e-3 if finite_difference else 1e-4
        torch.testing.assert_close(compiled.grads[name], grad, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(compiled.task_losses, eager.task_losses)
    torch.testing.assert_close(compiled.stats["grad_norm/inner"], eager.stats["grad_norm/inner"])
    assert counters["stats"]["unique_graphs"] >= 1  # it really went through Dynamo

    # A new batch of the same shape reuses the compiled graph.
    graphs = counters["stats"]["unique_graphs"]
    compiled_algorithm.meta_gradient(model, mse_loss, batch(seed=1))
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_trainer_run_follows_eager_and_compiles_once():
    final, graphs = {}, {}
    for compile in (False, True):
        L.seed_everything(0)
        learner = MetaLearner(MLP(hidden=16), HFMAML(0.01, compile=compile), meta_optimizer=sgd)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=12,
            val_check_interval=4,
            limit_val_batches=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        data = SinusoidDataModule(meta_batch_size=4, num_val_tasks=8, eval_meta_batch_size=4)
        trainer.fit(learner, datamodule=data)
        final[compile] = torch.cat([p.detach().flatten() for p in learner.parameters()])
        graphs[compile] = counters["stats"]["unique_graphs"]
        assert torch.isfinite(trainer.callback_metrics["val/loss"])
    torch.testing.assert_close(final[True], final[False], rtol=1e-4, atol=1e-5)
    # One graph for the training step and one for evaluation, built once for 12 steps and 3
    # validations (not one per step).
    assert graphs[True] == 2


def test_compiled_bf16_trainer_runs_and_stays_close_to_float32():
    tasks = batch()
    torch.manual_seed(0)
    model = MLP(hidden=16)
    exact = HFMAML(0.01).meta_gradient(model, mse_loss, tasks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = HFMAML(0.01, compile=True).meta_gradient(model, mse_loss, tasks)
    flat = lambda grads: torch.cat([g.float().flatten() for g in grads.values()])  # noqa: E731
    error = (flat(mixed.grads) - flat(exact.grads)).norm() / flat(exact.grads).norm()
    assert (
        error < 0.05
    )  # the same bound as the eager bf16 test (tests/algorithms/test_precision.py)
    assert all(g.dtype == torch.float32 for g in mixed.grads.values())


def test_compiled_algorithm_pickles_without_its_compiled_functions():
    algorithm = FOMAML(0.01, compile=True)
    model = MLP(hidden=16)
    tasks = batch()
    before = algorithm.meta_gradient(model, mse_loss, tasks)
    copy = pickle.loads(pickle.dumps(algorithm))  # what ddp_spawn does to the LightningModule
    assert "_compiled" not in vars(copy)
    assert copy.hparams() == algorithm.hparams()
    after = copy.meta_gradient(model, mse_loss, tasks)
    for name, grad in before.grads.items():
        torch.testing.assert_close(after.grads[name], grad)
