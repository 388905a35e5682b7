"""The shared N-way K-shot sampler and the image datamodule base, on a small synthetic image set."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_maml.datamodules.base import TrainTaskStream
from lightning_maml.datamodules.episodes import EpisodeSampler, EpisodicDataModule, gather_images
from lightning_maml.tasks import TaskBatch

PER_CLASS = 12
SPLIT_CLASSES = {"train": range(0, 10), "val": range(10, 16), "test": range(16, 24)}


class ToyImages(EpisodicDataModule):
    """24 classes of 12 images; image ``i`` is filled with ``i % 256`` and is 2x3 in size."""

    def __init__(self, **kwargs) -> None:
        kwargs = {"ways": 5, "shots": 2, "query_shots": 3, "meta_batch_size": 4, **kwargs}
        kwargs.setdefault("hessian_shots", 0)
        super().__init__(**kwargs)
        self.loads = 0

    def load(self):
        self.loads += 1
        count = PER_CLASS * 24
        images = torch.arange(count).remainder(256).to(torch.uint8).view(-1, 1, 1, 1)
        classes = {
            split: [np.arange(c * PER_CLASS, (c + 1) * PER_CLASS) for c in ids]
            for split, ids in SPLIT_CLASSES.items()
        }
        return images.expand(-1, 1, 2, 3).contiguous(), classes


def index_batch(dm: EpisodicDataModule, step: int, split: str = "train") -> TaskBatch:
    """The image indices of a batch (device_tensors mode leaves them in the ``*_x`` fields)."""
    if split == "train":
        return TrainTaskStream(dm.loader_sampler("train"), dm.meta_batch_size, dm.seed).batch(step)
    return dm.eval_set(split)[step]


def same(a: TaskBatch, b: TaskBatch) -> bool:
    ta, tb = a.named_tensors(), b.named_tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_batch_shapes_and_dtypes():
    dm = ToyImages(hessian_shots=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (4, 5 * 2, 1, 2, 3)
    assert batch.query_x.shape == (4, 5 * 3, 1, 2, 3)
    assert batch.hessian_x.shape == (4, 5 * 4, 1, 2, 3)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    assert batch.support_x.min() >= 0.0 and batch.support_x.max() <= 1.0
    assert ToyImages().task_sampler("train")(np.random.default_rng(0), "train").hessian_x is None


def test_sets_are_disjoint_within_one_class_per_label_and_inside_the_split():
    dm = ToyImages(hessian_shots=4, device_tensors=True)
    for split, step in [("train", 0), ("train", 7), ("val", 0), ("test", 1)]:
        batch = index_batch(dm, step, split)
        for t in range(batch.num_tasks):
            sets = [(batch.support_x[t], batch.support_y[t]), (batch.query_x[t], batch.query_y[t])]
            sets.append((batch.hessian_x[t], batch.hessian_y[t]))
            images = torch.cat([x for x, _ in sets])
            assert len(images.unique()) == len(images)  # no image twice in a task
            for _, y in sets:
                assert torch.equal(y, torch.arange(5).repeat_interleave(len(y) // 5))
            classes = {label: set() for label in range(5)}
            for x, y in sets:
                for image, label in zip(x.tolist(), y.tolist(), strict=True):
                    classes[label].add(image // PER_CLASS)
            assert all(len(c) == 1 for c in classes.values())  # one class per label
            used = set().union(*classes.values())
            assert len(used) == 5 and used <= set(SPLIT_CLASSES[split])


def test_label_order_is_random_per_task():
    dm = ToyImages(device_tensors=True)
    first_class = [
        int(index_batch(dm, s).support_x[t, 0]) // PER_CLASS for s in range(5) for t in range(4)
    ]
    assert len(set(first_class)) > 3


def test_cpu_gather_matches_device_gather():
    cpu, dev = ToyImages(hessian_shots=1), ToyImages(hessian_shots=1, device_tensors=True)
    for split in ("train", "val"):
        a = index_batch(cpu, 3, split)
        b = dev.on_after_batch_transfer(index_batch(dev, 3, split), 0)
        assert same(a, b)


def test_gather_images_scales_uint8_only():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    assert torch.allclose(
        gather_images(images, torch.tensor([[2, 1]])).flatten(), torch.tensor([1.0, 0.2])
    )
    assert gather_images(images.float(), torch.tensor([1])).item() == 51.0


def test_same_seed_same_tasks_other_seed_other_tasks():
    a, b, c = ToyImages(seed=3), ToyImages(seed=3), ToyImages(seed=4)
    assert same(index_batch(a, 5), index_batch(b, 5))
    assert same(index_batch(a, 0, "test"), index_batch(b, 0, "test"))
    assert not same(index_batch(a, 5), index_batch(c, 5))
    assert not same(index_batch(a, 5), index_batch(a, 6))


def test_ranks_share_the_global_meta_batch():
    dm = ToyImages(device_tensors=True, meta_batch_size=8)
    sampler = dm.task_sampler("train")
    whole = TrainTaskStream(sampler, 8, seed=1).batch(2)
    ranks = [TrainTaskStream(sampler, 8, seed=1, rank=r, world_size=2).batch(2) for r in (0, 1)]
    assert not same(ranks[0], ranks[1])
    assert same(TaskBatch.stack(ranks), whole)


def test_loader_workers_draw_different_steps_and_resume_continues():
    dm = ToyImages(device_tensors=True, num_workers=2)
    loader = dm.train_dataloader()
    batches = [b for b, _ in zip(loader, range(4), strict=False)]
    stream = TrainTaskStream(dm.loader_sampler("train"), 4, dm.seed)
    for step, batch in enumerate(batches):
        assert same(batch, stream.batch(step))
    assert not same(batches[0], batches[1])
    resumed = TrainTaskStream(dm.loader_sampler("train"), 4, dm.seed, start_step=2)
    assert same(next(iter(DataLoader(resumed, batch_size=None))), batches[2])


def test_data_is_read_once():
    dm = ToyImages()
    dm.setup("fit")
    dm.train_dataloader()
    dm.test_dataloader()
    assert dm.loads == 1


@pytest.mark.parametrize(
    ("kwargs", "stage", "match"),
    [
        ({"ways": 7}, "fit", r"ways=7 but the val split of ToyImages has only 6 classes"),
        ({"ways": 11}, "test", r"ways=11 but the test split .* only 8 classes"),
        ({"shots": 5, "query_shots": 5, "hessian_shots": 3}, "fit", r"13 images per class"),
    ],
)
def test_setup_rejects_tasks_the_split_cannot_give(kwargs, stage, match):
    with pytest.raises(ValueError, match=match):
        ToyImages(**kwargs).setup(stage)


def test_setup_checks_only_the_splits_of_its_stage():
    dm = ToyImages(ways=7)
    dm.setup("test")  # the 6-class val split is not checked when testing
    assert index_batch(dm, 0, "test").support_x.shape[1] == 7 * 2
    with pytest.raises(ValueError, match=r"ways=7 but the val split of ToyImages has only 6"):
        dm.setup("validate")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shots": 0}, r"shots must be an integer >= 1, got 0"),
        ({"query_shots": 1.5}, r"query_shots must be an integer"),
        ({"hessian_shots": -1}, r"hessian_shots must be an integer >= 0"),
        ({"ways": True}, r"ways must be an integer"),
    ],
)
def test_bad_sizes_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyImages(**kwargs)


def test_sampler_checks_its_classes():
    classes = [np.arange(4), np.arange(4, 7)]
    with pytest.raises(ValueError, match=r"ways=3 but train has only 2 classes"):
        EpisodeSampler(classes, ways=3, shots=1, query_shots=1, split="train")
    with pytest.raises(ValueError, match=r"smallest class of train has 3"):
        EpisodeSampler(classes, ways=2, shots=2, query_shots=2, split="train")


class ImageCheck(L.LightningModule):
    """Records what reaches the training step; its own batch hook must still run."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[TaskBatch] = []
        self.hooked = 0

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.hooked += 1
        return batch

    def training_step(self, batch, batch_idx):
        self.seen.append(batch)
        return self.weight.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You have overridden `on_after_batch_transfer` in both")
@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no")
@pytest.mark.parametrize("device_tensors", [False, True, "auto"])
def test_trainer_receives_images(device_tensors):
    dm = ToyImages(device_tensors=device_tensors)
    module = ImageCheck()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    assert module.hooked == 2
    assert [b.support_x.shape for b in module.seen] == [(4, 10, 1, 2, 3)] * 2
    assert all(b.support_x.dtype == torch.float32 for b in module.seen)


def test_device_tensors_auto_gathers_on_accelerators_only():
    assert ToyImages().device_tensors == "auto"
    # Without a Trainer, or with one on a CPU, the loader gathers the images itself.
    dm = ToyImages()
    assert not dm.on_device
    assert next(iter(dm.train_dataloader())).support_x.dtype == torch.float32
    dm.trainer = L.Trainer(accelerator="cpu", logger=False)
    assert not dm.on_device
    assert ToyImages(device_tensors=True).on_device
    assert not ToyImages(device_tensors=False).on_device
    # On an accelerator "auto" turns it on. No GPU here: a stand-in for the one attribute read.
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert dm.on_device
    assert (
        dm.loader_sampler("train")(np.random.default_rng(0), "train").support_x.dtype == torch.int64
    )
    with pytest.raises(ValueError, match="device_tensors must be true, false or 'auto'"):
        ToyImages(device_tensors="gpu")


@pytest.mark.parametrize("device_tensors", [True, False])
def test_task_sampler_always_gives_images(device_tensors):
    # Callbacks (StationarityMonitor, TheoryStepSize) draw tasks with task_sampler outside the
    # Trainer's batch hooks, so they must get images even when the loaders move indices.
    dm = ToyImages(device_tensors=device_tensors, hessian_shots=1)
    task = dm.task_sampler("val")(np.random.default_rng(0), "val")
    assert task.support_x.dtype == torch.float32 and task.support_x.shape == (10, 1, 2, 3)
    assert task.hessian_x.dtype == torch.float32
    loader_task = dm.loader_sampler("val")(np.random.default_rng(0), "val")
    assert (loader_task.support_x.dtype == torch.int64) == device_tensors
