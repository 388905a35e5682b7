"""TaskSetDataModule on a learn2learn-like task source drawing from Python's global ``random``."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lightning_maml.datamodules.base import TrainTaskStream
from lightning_maml.datamodules.taskset import TaskSetDataModule, TaskSetSampler

PER_CLASS = 10


class FakeTaskDataset:
    """Draws tasks the way learn2learn's ``TaskDataset`` does: with the global ``random``.

    Example ``i`` of the underlying data set is the vector ``[i, i, i]`` of class
    ``i // PER_CLASS``; a task is ``ways`` classes with ``k`` examples each, shuffled.
    """

    def __init__(self, classes: range, ways: int = 5, k: int = 6, as_numpy: bool = False) -> None:
        self.classes, self.ways, self.k, self.as_numpy = list(classes), ways, k, as_numpy

    def sample(self):
        chosen = random.sample(self.classes, self.ways)
        index = [c * PER_CLASS + j for c in chosen for j in random.sample(range(PER_CLASS), self.k)]
        random.shuffle(index)
        data = torch.tensor(index, dtype=torch.float32)[:, None].expand(-1, 3)
        labels = torch.tensor(index) // PER_CLASS
        if self.as_numpy:
            return data.numpy(), labels.numpy()
        return data, labels


def make(seed: int = 0, **kwargs) -> TaskSetDataModule:
    sources = {
        "train": FakeTaskDataset(range(0, 10)),
        "val": FakeTaskDataset(range(10, 15)),
        "test": FakeTaskDataset(range(15, 20)),
    }
    sources.update(kwargs.pop("sources", {}))
    kwargs = {"ways": 5, "shots": 2, "query_shots": 3, "meta_batch_size": 4, **kwargs}
    return TaskSetDataModule(**sources, seed=seed, **kwargs)


def test_tasks_are_split_per_class_without_overlap():
    dm = make(hessian_shots=1, sources={"val": FakeTaskDataset(range(12, 18), as_numpy=True)})
    for batch in (next(iter(dm.train_dataloader())), dm.eval_set("val")[0]):
        assert batch.support_x.shape == (4, 10, 3) and batch.query_x.shape == (4, 15, 3)
        assert batch.hessian_x.shape == (4, 5, 3) and batch.support_y.dtype == torch.int64
        for t in range(batch.num_tasks):
            pairs = [
                (batch.support_x[t, :, 0], batch.support_y[t]),
                (batch.query_x[t, :, 0], batch.query_y[t]),
                (batch.hessian_x[t, :, 0], batch.hessian_y[t]),
            ]
            ids = torch.cat([x for x, _ in pairs]).long()
            assert len(ids.unique()) == len(ids)
            origin = {}
            for x, y in pairs:
                assert torch.equal(y, torch.arange(5).repeat_interleave(len(y) // 5))
                for example, label in zip(x.long().tolist(), y.tolist(), strict=True):
                    origin.setdefault(label, set()).add(example // PER_CLASS)
            assert all(len(c) == 1 for c in origin.values()) and len(origin) == 5


def test_labels_are_remapped_in_random_order():
    dm = make()
    first = [
        int(dm.eval_set("test")[i].support_x[t, 0, 0]) // PER_CLASS
        for i in range(5)
        for t in range(4)
    ]
    assert len(set(first)) == 5  # label 0 is each of the 5 test classes at some point


def test_same_seed_same_tasks_and_global_generators_untouched():
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    # The sampler itself (a DataLoader draws its own base seed from torch's generator).
    a = TrainTaskStream(make(seed=3).task_sampler("train"), 4, seed=3).batch(0)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    b = next(iter(make(seed=3).train_dataloader()))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    c = next(iter(make(seed=4).train_dataloader()))
    assert not torch.equal(a.support_x, c.support_x)


def test_ranks_and_workers_draw_different_tasks():
    dm = make(num_workers=2)
    sampler = dm.task_sampler("train")
    ranks = [TrainTaskStream(sampler, 4, 0, rank=r, world_size=2).batch(0) for r in (0, 1)]
    assert not torch.equal(ranks[0].support_x, ranks[1].support_x)
    stream = TrainTaskStream(sampler, 4, 0)
    batches = [b for b, _ in zip(dm.train_dataloader(), range(3), strict=False)]
    for step, batch in enumerate(batches):
        assert torch.equal(batch.support_x, stream.batch(step).support_x)
    assert not torch.equal(batches[0].support_x, batches[1].support_x)


def test_missing_val_and_test_sources():
    dm = TaskSetDataModule(FakeTaskDataset(range(12)), ways=5, shots=1, query_shots=1)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="given no test task source"):
        dm.setup("test")


@pytest.mark.parametrize(
    ("sources", "kwargs", "match"),
    [
        ({"train": FakeTaskDataset(range(10), ways=4)}, {}, r"task of 4 classes, but ways=5"),
        ({"val": FakeTaskDataset(range(10, 15), k=4)}, {}, r"gave 4 examples .* at least 5"),
        ({}, {"hessian_shots": 2}, r"at least 7 per class"),
    ],
)
def test_sources_that_do_not_fit_fail_at_setup(sources, kwargs, match):
    dm = make(sources=sources, **kwargs)
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


def test_bad_sources_and_sizes_fail_at_construction():
    with pytest.raises(ValueError, match=r"needs a sample\(\) method .* list has none"):
        TaskSetDataModule([1, 2, 3])
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        make(shots=0)


def test_sampler_rejects_malformed_tasks():
    sampler = TaskSetSampler(FakeTaskDataset(range(12)), ways=5, shots=1, query_shots=1)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"labels of shape \(n,\)"):
        sampler.split(torch.zeros(4, 3), torch.zeros(4, 1), rng)
