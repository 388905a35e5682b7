"""Few-shot metrics: the mean over tasks with its 95% CI, by hand and over 2-process CPU DDP."""

from __future__ import annotations

import math
import statistics

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_maml import MAML, MetaLearner
from lightning_maml.datamodules import MetaDataModule, Task
from lightning_maml.metrics import Z_95, MeanWithCI, mean_with_ci, task_accuracy


def test_mean_with_ci_matches_a_hand_computation():
    values = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    # Mean 0.6; squared deviations 0.16 + 0.04 + 0 + 0.04 + 0.16 = 0.4, sample variance
    # 0.4 / 4 = 0.1; half-width 1.96 * sqrt(0.1 / 5).
    mean, ci95 = mean_with_ci(values)
    assert math.isclose(mean, 0.6, rel_tol=1e-12)
    assert math.isclose(ci95, 1.959963984540054 * math.sqrt(0.02), rel_tol=1e-12)
    assert math.isclose(Z_95, statistics.NormalDist().inv_cdf(0.975), rel_tol=1e-12)


def test_metric_accumulated_in_batches_equals_the_statistics_module():
    values = torch.rand(600, generator=torch.Generator().manual_seed(0))
    metric = MeanWithCI()
    for chunk in values.split([250, 1, 349]):
        metric.update(chunk)
    mean, ci95 = metric.compute()
    reference = [float(v) for v in values]
    assert math.isclose(mean, statistics.fmean(reference), rel_tol=1e-12)
    expected = Z_95 * statistics.stdev(reference) / math.sqrt(len(reference))
    assert math.isclose(ci95, expected, rel_tol=1e-9)
    torch.testing.assert_close(torch.stack(mean_with_ci(values)), torch.stack((mean, ci95)))


def test_equal_values_give_a_zero_interval_and_one_value_none():
    metric = MeanWithCI()
    metric.update(torch.full((7,), 0.9))
    mean, ci95 = metric.compute()
    assert math.isclose(mean, 0.9, rel_tol=1e-6)
    assert ci95 == 0
    metric.reset()
    metric.update(torch.tensor([0.5]))
    mean, ci95 = metric.compute()
    assert mean == 0.5 and math.isnan(ci95)
    with pytest.raises(ValueError, match="at least two tasks"):
        mean_with_ci(torch.tensor([0.5]))


def test_update_leaves_the_initial_states_untouched():
    # Under ddp_spawn every rank unpickles the same shared-memory initial states.
    metric = MeanWithCI()
    initial = [metric.total, metric.total_sq, metric.count]
    metric.update(torch.tensor([1.0, 2.0]))
    assert [float(t) for t in initial] == [0.0, 0.0, 0.0]
    assert float(metric.count) == 2


def test_task_accuracy_by_hand():
    # Two tasks, three query examples, two classes.
    logits = torch.tensor(
        [
            [[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]],  # predicts 0, 1, 0
            [[0.0, 1.0], [0.0, 1.0], [5.0, 1.0]],  # predicts 1, 1, 0
        ]
    )
    labels = torch.tensor([[0, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(task_accuracy(logits, labels), torch.tensor([2 / 3, 1.0]))


# -- 2-process CPU DDP --------------------------------------------------------------------

#: Uneven shards: a reduction that averaged per-rank results would be wrong here.
SHARDS = [[torch.arange(3.0), torch.tensor([10.0, -1.0, 0.5, 2.0])], [torch.tensor([7.0, 4.0])]]


def _compute_on_rank(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        metric = MeanWithCI()
        for values in SHARDS[rank]:
            metric.update(values)
        results[rank] = [float(v) for v in metric.compute()]
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ci_reduced_over_two_gloo_processes_equals_one_process(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the ranks start in a fraction of a second instead of re-importing everything.
        mp.start_processes(
            _compute_on_rank,
            args=(str(tmp_path / "rendezvous"), results),
            nprocs=2,
            start_method="fork",
        )
        ranks = [results[0], results[1]]
    expected = [float(v) for v in mean_with_ci(torch.cat([v for s in SHARDS for v in s]))]
    assert ranks[0] == pytest.approx(expected, rel=1e-12)
    assert ranks[1] == ranks[0]


class LabelledBlobs:
    """3-way classification tasks: each class a Gaussian blob around a random centre in R^4."""

    def __call__(self, rng: np.random.Generator, split: str) -> Task:
        centres = rng.normal(size=(3, 1, 4)) * 2
        x = torch.from_numpy((centres + rng.normal(size=(3, 6, 4))).astype("float32"))
        y = torch.arange(3).repeat_interleave(6).view(3, 6)
        return Task(
            x[:, :2].reshape(-1, 4),
            y[:, :2].reshape(-1),
            x[:, 2:].reshape(-1, 4),
            y[:, 2:].reshape(-1),
        )


class BlobData(MetaDataModule):
    def __init__(self) -> None:
        # 9 validation tasks over 2 ranks: 5 and 4 tasks, in batches of at most 3.
        super().__init__(meta_batch_size=2, num_val_tasks=9, eval_meta_batch_size=3)

    def task_sampler(self, split: str) -> LabelledBlobs:
        return LabelledBlobs()


def _validate(devices: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    learner = MetaLearner(model, MAML(0.5), "cross_entropy", eval_inner_steps=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer.validate(learner, datamodule=BlobData(), verbose=False)[0]


@pytest.mark.slow
@pytest.mark.ddp
def test_learner_val_metrics_under_ddp_spawn_equal_one_process():
    single = _validate(devices=1)
    ddp = _validate(devices=2)
    keys = ["val/loss", "val/loss_ci95", "val/accuracy", "val/accuracy_ci95", "val/loss_before"]
    assert set(keys) <= set(single)
    assert single["val/accuracy_ci95"] > 0
    for key in keys:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
