"""SinusoidDataModule: shapes, seeding, rank and worker splits, fixed evaluation sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_maml import TaskBatch
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.datamodules.base import EvalTaskSet, TrainTaskStream
from lightning_maml.datamodules.sinusoid import SinusoidTasks
from lightning_maml.tasks import STREAMS, Task


def stream(dm: SinusoidDataModule, rank: int = 0, world_size: int = 1, start: int = 0):
    return TrainTaskStream(
        dm.task_sampler("train"), dm.meta_batch_size, dm.seed, start, rank, world_size
    )


def assert_same(a: TaskBatch, b: TaskBatch) -> None:
    for name, tensor in a.named_tensors().items():
        assert torch.equal(tensor, b.named_tensors()[name]), name


def test_shapes_and_ranges():
    dm = SinusoidDataModule(shots=5, query_shots=7, hessian_shots=3, meta_batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (4, 5, 1) and batch.support_y.shape == (4, 5, 1)
    assert batch.query_x.shape == (4, 7, 1) and batch.hessian_x.shape == (4, 3, 1)
    assert batch.support_x.abs().max() <= 5.0
    assert batch.support_y.abs().max() <= 5.0
    assert not SinusoidDataModule(hessian_shots=0).eval_set("val")[0].has_hessian


def test_each_task_is_one_sinusoid_across_its_sets():
    dm = SinusoidDataModule(shots=4, query_shots=4, hessian_shots=4, meta_batch_size=2)
    batch = stream(dm).batch(0)
    for t in range(2):
        x = torch.cat([batch.support_x[t], batch.query_x[t], batch.hessian_x[t]]).squeeze(-1)
        y = torch.cat([batch.support_y[t], batch.query_y[t], batch.hessian_y[t]]).squeeze(-1)
        # Fit y = a sin x + b cos x by least squares: a single sinusoid fits exactly.
        basis = torch.stack([torch.sin(x), torch.cos(x)], 1).double()
        coef = torch.linalg.lstsq(basis, y.double().unsqueeze(1)).solution
        assert torch.allclose(basis @ coef, y.double().unsqueeze(1), atol=1e-5)
        amplitude = coef.norm().item()
        assert 0.1 <= amplitude <= 5.0


def test_same_seed_same_tasks_other_seed_other_tasks():
    a, b = stream(SinusoidDataModule(seed=3)), stream(SinusoidDataModule(seed=3))
    assert_same(a.batch(7), b.batch(7))
    c = stream(SinusoidDataModule(seed=4))
    assert not torch.equal(a.batch(7).support_x, c.batch(7).support_x)
    assert not torch.equal(a.batch(7).support_x, a.batch(8).support_x)


def test_ranks_draw_disjoint_parts_of_the_global_meta_batch():
    dm = SinusoidDataModule(meta_batch_size=6)
    whole = stream(dm).batch(5)
    parts = [stream(dm, rank=r, world_size=2).batch(5) for r in range(2)]
    assert parts[0].num_tasks == parts[1].num_tasks == 3
    assert not torch.equal(parts[0].support_x, parts[1].support_x)
    assert_same(TaskBatch.stack(parts), whole)


def test_workers_keep_the_stream_order():
    dm = SinusoidDataModule(meta_batch_size=2)
    direct = [stream(dm).batch(s) for s in range(4)]
    loader = DataLoader(stream(dm), batch_size=None, num_workers=2)
    for expected, got in zip(direct, loader, strict=False):
        assert_same(expected, got)


def test_stream_starts_at_the_restored_step():
    dm = SinusoidDataModule(meta_batch_size=2)
    assert_same(next(iter(stream(dm, start=11))), stream(dm).batch(11))


def test_evaluation_sets_are_fixed_and_cover_every_task():
    dm = SinusoidDataModule(meta_batch_size=4, num_test_tasks=10)
    test = dm.eval_set("test")
    assert len(test) == math.ceil(10 / 4)
    assert sum(batch.num_tasks for batch in test) == 10
    again = SinusoidDataModule(meta_batch_size=4, num_test_tasks=10).eval_set("test")
    assert_same(test[1], again[1])
    assert not torch.equal(dm.eval_set("val")[0].support_x, test[0].support_x)
    with pytest.raises(IndexError):
        test[len(test)]


def test_ranks_share_the_evaluation_set_without_duplicates():
    dm = SinusoidDataModule(meta_batch_size=4, num_test_tasks=18)
    whole = torch.cat([b.support_x for b in dm.eval_set("test")])
    shares = [
        list(EvalTaskSet(dm.task_sampler("test"), "test", 18, 4, dm.seed, rank, 2))
        for rank in range(2)
    ]
    assert [len(s) for s in shares] == [3, 3]
    seen = torch.cat([b.support_x for share in shares for b in share])
    assert seen.shape[0] == 18
    # The union is the whole set, each task once.
    assert torch.equal(seen.flatten(1).sort(0).values, whole.flatten(1).sort(0).values)
    assert torch.unique(seen.flatten(1), dim=0).shape[0] == 18
    with pytest.raises(ValueError, match="set num_test_tasks >= 2"):
        EvalTaskSet(dm.task_sampler("test"), "test", 1, 4, dm.seed, 0, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shots": 0}, "shots must be an integer >= 1"),
        ({"query_shots": 0}, "query_shots must be an integer >= 1"),
        ({"hessian_shots": -1}, "hessian_shots must be an integer >= 0"),
        ({"meta_batch_size": 0}, "meta_batch_size must be an integer >= 1"),
        ({"amplitude_range": (5.0, 0.1)}, "amplitude_range must be"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinusoidDataModule(**kwargs)


def test_meta_batch_must_divide_over_processes():
    dm = SinusoidDataModule(meta_batch_size=5)
    with pytest.raises(ValueError, match="must divide evenly over 2 processes"):
        stream(dm, rank=0, world_size=2)


def release_task(rng: np.random.Generator, tasks: SinusoidTasks) -> Task:
    """The sampler as released before meta-batches were drawn together: the reference."""
    amplitude = rng.uniform(*tasks.amplitude_range)
    phase = rng.uniform(*tasks.phase_range)
    counts = [tasks.shots, tasks.query_shots, tasks.hessian_shots]
    x = torch.from_numpy(rng.uniform(*tasks.input_range, size=(sum(counts), 1)).astype(np.float32))
    y = amplitude * torch.sin(x - phase)
    support_x, query_x, hessian_x = torch.split(x, counts)
    support_y, query_y, hessian_y = torch.split(y, counts)
    if not tasks.hessian_shots:
        return Task(support_x, support_y, query_x, query_y)
    return Task(support_x, support_y, query_x, query_y, hessian_x, hessian_y)


@pytest.mark.parametrize("hessian_shots", [0, 3])
def test_batched_draws_are_the_released_tasks_bit_for_bit(hessian_shots):
    dm = SinusoidDataModule(shots=5, query_shots=7, hessian_shots=hessian_shots, meta_batch_size=8)
    sampler = dm.task_sampler("train")
    for rank, world_size in [(0, 1), (1, 2)]:
        train = stream(dm, rank, world_size)
        for step in [0, 1, 17, 9999]:
            local = dm.meta_batch_size // world_size
            first = rank * local
            keys = [[dm.seed, STREAMS["train"], step, t] for t in range(first, first + local)]
            expected = TaskBatch.of([release_task(np.random.default_rng(k), sampler) for k in keys])
            assert_same(train.batch(step), expected)
    val = dm.eval_set("val")[2]
    keys = [[dm.seed, STREAMS["val"], i] for i in range(16, 24)]
    assert_same(val, TaskBatch.of([release_task(np.random.default_rng(k), sampler) for k in keys]))


def test_one_task_at_a_time_equals_the_batch():
    sampler = SinusoidTasks(shots=3, query_shots=4, hessian_shots=2)
    keys = [[5, STREAMS["test"], i] for i in range(6)]
    one_by_one = TaskBatch.of([sampler(np.random.default_rng(k), "test") for k in keys])
    assert_same(sampler.draw_batch("test", keys), one_by_one)
