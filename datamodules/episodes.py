"""N-way K-shot episodes over a labelled image set: the sampler every image datamodule shares.

A task of ``ways`` classes draws, from each class and without overlap, ``shots`` support images
(``D_in``), ``query_shots`` query images (``D_o``) and ``hessian_shots`` images of the Hessian set
(``D_h``). The classes come in a random order per task and are labelled ``0 .. ways - 1`` in that
order, so a label says nothing about the class across tasks. Examples are class-major: the
support set is ``shots`` images of label 0, then ``shots`` of label 1, and so on.

Images live in one ``uint8`` tensor ``(N, C, H, W)`` shared by all splits; each split is a list
of classes, each class an array of indices into that tensor. The sampler gathers the images of a
task on the CPU, or, with ``device_tensors`` on (by default on an accelerator), returns the
indices and the datamodule gathers the whole meta-batch on the training device in
:meth:`EpisodicDataModule.on_after_batch_transfer`, so that a GPU run reads its images from GPU
memory and the loader only moves a few integers. Only the loaders do this:
:meth:`EpisodicDataModule.task_sampler` always gives tasks with their images, for callbacks and
other users that take tasks outside the Trainer's batch hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_maml.checks import check_int
from lightning_maml.datamodules.base import MetaDataModule, Task
from lightning_maml.tasks import TaskBatch

__all__ = ["EpisodeSampler", "EpisodicDataModule", "check_episode", "gather_images"]

# The splits that a Trainer stage reads: the ones to check before that stage starts.
STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": (),
}


def gather_images(images: Tensor, index: Tensor) -> Tensor:
    """``images[index]`` as float32; ``uint8`` pixels are scaled to ``[0, 1]``.

    Args:
        images: All images, ``(N, C, H, W)``, ``uint8`` or floating point.
        index: Integer indices of any shape ``S`` (on the device of ``images``).

    Returns:
        The images, shaped ``S + (C, H, W)``.
    """
    picked = images[index]
    if picked.dtype == torch.uint8:
        return picked.float().div_(255.0)
    return picked.float()


def check_episode(
    classes: Sequence[np.ndarray],
    ways: int,
    shots: int,
    query_shots: int,
    hessian_shots: int = 0,
    split: str = "this split",
) -> None:
    """Raises a :class:`ValueError` if ``classes`` cannot give tasks of the requested size.

    Args:
        classes: The index arrays of the split's classes.
        ways: Classes per task.
        shots: Support images per class.
        query_shots: Query images per class.
        hessian_shots: Hessian-set images per class.
        split: The split's name, for the message.
    """
    if ways > len(classes):
        raise ValueError(
            f"ways={ways} but {split} has only {len(classes)} classes; use ways <= {len(classes)}."
        )
    needed = shots + query_shots + hessian_shots
    smallest = min(len(c) for c in classes)
    if needed > smallest:
        raise ValueError(
            f"shots + query_shots + hessian_shots = {shots} + {query_shots} + {hessian_shots} = "
            f"{needed} images per class, but the smallest class of {split} has {smallest}; the "
            "three sets are drawn without overlap, so lower them to a total of at most "
            f"{smallest}."
        )


def _check_sizes(ways: int, shots: int, query_shots: int, hessian_shots: int) -> None:
    for name, value, low in [
        ("ways", ways, 1),
        ("shots", shots, 1),
        ("query_shots", query_shots, 1),
        ("hessian_shots", hessian_shots, 0),
    ]:
        check_int(name, value, low)


class EpisodeSampler:
    """Draws one N-way task from a split's classes (a :class:`~lightning_maml.datamodules.base.TaskSampler`).

    Args:
        classes: One array of image indices per class of the split.
        ways: Classes per task (N).
        shots: Support images per class (K; ``D_in``).
        query_shots: Query images per class (``D_o``).
        hessian_shots: Hessian-set images per class (``D_h``); 0 for none.
        images: All images, ``(N, C, H, W)``. ``None`` makes the task's ``*_x`` fields the
            ``int64`` indices of its images, for a gather on the training device.
        split: The split's name, for error messages.

    Raises:
        ValueError: If a size is not a positive integer, ``ways`` exceeds the number of
            classes, or a class has fewer than ``shots + query_shots + hessian_shots`` images.
    """

    def __init__(
        self,
        classes: Sequence[np.ndarray | Sequence[int]],
        ways: int,
        shots: int,
        query_shots: int,
        hessian_shots: int = 0,
        images: Tensor | None = None,
        split: str = "this split",
    ) -> None:
        _check_sizes(ways, shots, query_shots, hessian_shots)
        self.classes = [np.asarray(c, dtype=np.int64) for c in classes]
        check_episode(self.classes, ways, shots, query_shots, hessian_shots, split)
        self.ways = ways
        self.counts = (shots, query_shots, hessian_shots)
        self.images = images

    def indices(self, rng: np.random.Generator) -> np.ndarray:
        """The image indices of one task, ``(ways, shots + query_shots + hessian_shots)``.

        Row ``i`` holds the images of the class labelled ``i``.
        """
        total = sum(self.counts)
        chosen = rng.choice(len(self.classes), size=self.ways, replace=False)
        return np.stack(
            [
                self.classes[c][rng.choice(len(self.classes[c]), size=total, replace=False)]
                for c in chosen
            ]
        )

    def __call__(self, rng: np.random.Generator, split: str) -> Task:
        index = torch.from_numpy(self.indices(rng))
        parts: list[Tensor | None] = []
        start = 0
        for count in self.counts:
            if count == 0:
                parts += [None, None]
                continue
            x = index[:, start : start + count].reshape(-1)
            y = torch.arange(self.ways).repeat_interleave(count)
            parts += [x if self.images is None else gather_images(self.images, x), y]
            start += count
        return Task._make(parts)


class EpisodicDataModule(MetaDataModule):
    """Base of the image datamodules: one image tensor, the classes of each split, N-way tasks.

    Subclasses implement :meth:`load`; the data is read once, on the first :meth:`setup` (or the
    first request for a sampler), so that a datamodule is cheap to build and to send to other
    processes. ``setup`` checks ``ways`` and the per-class sizes against each split the stage will
    read, so that a bad setting stops the run before its first step.

    Args:
        ways: Classes per task (N).
        shots: Support images per class (K; ``D_in``).
        query_shots: Query images per class (``D_o``).
        hessian_shots: Hessian-set images per class (``D_h``); 0 for none.
        meta_batch_size: Tasks per training step, over all devices together.
        seed: The data seed; the same seed gives the same tasks.
        num_val_tasks: The size of the fixed validation task set.
        num_test_tasks: The size of the fixed test task set.
        eval_meta_batch_size: Tasks per validation/test batch (default: ``meta_batch_size``).
        num_workers: DataLoader workers.
        device_tensors: Keep the images on the training device: the loader yields image indices
            (``int64`` ``*_x`` fields) and :meth:`on_after_batch_transfer` gathers them there.
            Only a :class:`~lightning.pytorch.Trainer` given this datamodule calls that hook; to
            use the loaders by hand, call it yourself. ``"auto"`` (default) does so when the
            Trainer runs on an accelerator, and gathers in the loader on a CPU or without one.
    """

    def __init__(
        self,
        ways: int,
        shots: int,
        query_shots: int,
        hessian_shots: int,
        meta_batch_size: int,
        seed: int = 0,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        num_workers: int = 0,
        device_tensors: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(
            meta_batch_size, seed, num_val_tasks, num_test_tasks, eval_meta_batch_size, num_workers
        )
        _check_sizes(ways, shots, query_shots, hessian_shots)
        self.ways = ways
        self.shots = shots
        self.query_shots = query_shots
        self.hessian_shots = hessian_shots
        if not (isinstance(device_tensors, bool) or device_tensors == "auto"):
            raise ValueError(
                f"device_tensors must be true, false or 'auto', got {device_tensors!r}."
            )
        self.device_tensors = device_tensors
        self.images: Tensor | None = None
        self.classes: dict[str, list[np.ndarray]] | None = None
        self._device_images: Tensor | None = None

    def load(self) -> tuple[Tensor, dict[str, list[np.ndarray]]]:
        """Reads the data set: all images ``(N, C, H, W)`` and, per split, its classes.

        Subclasses implement this; it raises on missing or malformed files.
        """
        raise NotImplementedError

    def _load(self) -> tuple[Tensor, dict[str, list[np.ndarray]]]:
        if self.images is None or self.classes is None:
            self.images, self.classes = self.load()
        return self.images, self.classes

    def check(self, split: str) -> None:
        """Raises a :class:`ValueError` if ``split`` cannot give tasks of this size."""
        _, classes = self._load()
        check_episode(
            classes[split],
            self.ways,
            self.shots,
            self.query_shots,
            self.hessian_shots,
            f"the {split} split of {type(self).__name__}",
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        for split in STAGE_SPLITS.get(stage, ("train", "val", "test")):
            self.check(split)

    @property
    def on_device(self) -> bool:
        """Whether batches carry image indices that are gathered on the training device."""
        if self.device_tensors != "auto":
            return self.device_tensors
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type != "cpu"

    def task_sampler(self, split: str) -> EpisodeSampler:
        """A sampler of ready tasks (images, on the CPU), whatever ``device_tensors`` says."""
        return self._sampler(split, with_images=True)

    def loader_sampler(self, split: str) -> EpisodeSampler:
        """The loaders' sampler: image indices when :attr:`on_device`, else ready tasks."""
        return self._sampler(split, with_images=not self.on_device)

    def _sampler(self, split: str, with_images: bool) -> EpisodeSampler:
        self.check(split)
        images, classes = self._load()
        return EpisodeSampler(
            classes[split],
            self.ways,
            self.shots,
            self.query_shots,
            self.hessian_shots,
            images=images if with_images else None,
            split=f"the {split} split of {type(self).__name__}",
        )

    def gather(self, batch: TaskBatch) -> TaskBatch:
        """Replaces the image indices of a ``device_tensors`` batch by the images, on its device."""
        images, _ = self._load()
        device = batch.support_y.device
        if self._device_images is None or self._device_images.device != device:
            # Made outside inference mode even when the first batch is a validation batch, so
            # that training batches gathered from it later are ordinary tensors.
            with torch.inference_mode(False):
                self._device_images = images.to(device)
        fields = batch.named_tensors()
        for name, tensor in fields.items():
            if name.endswith("_x"):
                fields[name] = gather_images(self._device_images, tensor)
        return TaskBatch(**fields)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.on_device and isinstance(batch, TaskBatch):
            batch = self.gather(batch)
        trainer = self.trainer
        module = None if trainer is None else trainer.lightning_module
        if module is not None:
            # Lightning calls only the datamodule's hook when both define it; keep the model's.
            batch = module.on_after_batch_transfer(batch, dataloader_idx)
        return batch
