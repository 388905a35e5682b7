"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018), both cut from CIFAR-100.

Both read CIFAR-100's Python version, https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz
(or what ``torchvision.datasets.CIFAR100(root, download=True)`` leaves): the folder
``cifar-100-python/`` with the pickles ``train`` (50,000 images), ``test`` (10,000) and ``meta``.
``root`` is that folder or the one above it. Each class's 500 training and 100 test images are
pooled into one class of 600, and the few-shot splits are made of whole classes:

- CIFAR-FS: 64 / 16 / 20 fine classes, the split of Bertinetto et al.'s R2-D2 code
  (``data/cifar-fs/splits/bertinetto``).
- FC100: 12 / 4 / 4 superclasses, i.e. 60 / 20 / 20 fine classes, the split of Oreshkin et al.'s
  TADAM, chosen so that the splits share no superclass.

Images are ``float32`` ``(3, 32, 32)`` in ``[0, 1]``. Unpickling runs code from the file: read
only files from a source you trust. ``lightning-maml download cifar100 --root ROOT``, or
``download=True`` on the datamodules, fetches the official tarball, checks its pinned MD5 and
unpacks it into ``ROOT/cifar-100-python/`` (see :mod:`lightning_maml.datamodules.download`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lightning_maml.datamodules.download import download
from lightning_maml.datamodules.episodes import EpisodicDataModule
from lightning_maml.datamodules.safe_pickle import load_data_pickle

__all__ = [
    "CIFARFS_CLASSES",
    "FC100_SUPERCLASSES",
    "CIFAR100Data",
    "CIFARFSDataModule",
    "FC100DataModule",
    "read_cifar100",
]

CIFARFS_CLASSES = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus",
        "can", "castle", "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup",
        "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster", "house", "kangaroo",
        "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain", "mouse", "mushroom",
        "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine",
        "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper",
        "snake", "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train",
        "trout", "tulip", "turtle", "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain",
        "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe",
        "whale", "woman", "worm",
    ),
}  # fmt: skip

FC100_SUPERCLASSES = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "val": (
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip

FILES = ("train", "test", "meta")
LAYOUTS = "cifar-100-python/{train,test,meta} under root, or {train,test,meta} in root itself"


class CIFAR100Data(NamedTuple):
    """CIFAR-100, training and test images pooled.

    Attributes:
        images: ``uint8`` ``(60000, 3, 32, 32)``.
        fine: The fine label of each image.
        coarse: The superclass of each image.
        fine_names: The 100 fine class names, by label.
        coarse_names: The 20 superclass names, by label.
    """

    images: Tensor
    fine: np.ndarray
    coarse: np.ndarray
    fine_names: list[str]
    coarse_names: list[str]


def _locate(root: Path) -> Path:
    for folder in (root / "cifar-100-python", root):
        if all((folder / name).is_file() for name in FILES):
            return folder
    raise FileNotFoundError(
        f"no CIFAR-100 data under {root}: looked for {LAYOUTS}. To download it: lightning-maml "
        f"download cifar100 --root {root}, or download=True (in a recipe: "
        "data.init_args.download: true)."
    )


def _unpickle(path: Path, keys: tuple[bytes, ...]) -> dict:
    fix = f"replace {path} with a fresh copy of cifar-100-python."
    data = load_data_pickle(path, fix, encoding="bytes")
    if not isinstance(data, dict) or not set(keys) <= data.keys():
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} must be a dict with the keys {list(keys)}, got {found}; {fix}")
    return data


def _names(values: list, count: int, path: Path, key: str) -> list[str]:
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    if len(names) != count:
        raise ValueError(f"{path}: {key} lists {len(names)} names, expected {count}.")
    return names


def read_cifar100(root: str | Path) -> CIFAR100Data:
    """Reads CIFAR-100's Python pickles (see the module docstring).

    Args:
        root: ``cifar-100-python/`` or the folder that holds it.

    Raises:
        FileNotFoundError: If the pickles are not found.
        ValueError: If a pickle is corrupt or malformed.
    """
    folder = _locate(Path(root))
    meta = _unpickle(folder / "meta", (b"fine_label_names", b"coarse_label_names"))
    fine_names = _names(meta[b"fine_label_names"], 100, folder / "meta", "fine_label_names")
    coarse_names = _names(meta[b"coarse_label_names"], 20, folder / "meta", "coarse_label_names")
    images, fine, coarse = [], [], []
    for name in ("train", "test"):
        path = folder / name
        part = _unpickle(path, (b"data", b"fine_labels", b"coarse_labels"))
        data = np.asarray(part[b"data"])
        labels = np.asarray(part[b"fine_labels"]), np.asarray(part[b"coarse_labels"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: data must be uint8 (N, 3072), got {data.dtype} {data.shape}; the file "
                "is corrupt or not CIFAR-100."
            )
        for label, key, count in zip(
            labels, ("fine_labels", "coarse_labels"), (100, 20), strict=True
        ):
            if label.shape != (len(data),) or label.min() < 0 or label.max() >= count:
                raise ValueError(
                    f"{path}: {key} must hold one label in [0, {count}) per image; the file is "
                    "corrupt or not CIFAR-100."
                )
        images.append(torch.from_numpy(data).view(-1, 3, 32, 32))
        fine.append(labels[0])
        coarse.append(labels[1])
    return CIFAR100Data(
        torch.cat(images), np.concatenate(fine), np.concatenate(coarse), fine_names, coarse_names
    )


def _label_ids(wanted: tuple[str, ...], names: list[str], what: str) -> list[int]:
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise ValueError(
            f"CIFAR-100's meta lists no {what} {missing}: the meta file is not CIFAR-100's."
        )
    return [names.index(name) for name in wanted]


class _CIFAR100Episodes(EpisodicDataModule):
    """What CIFAR-FS and FC100 share: the reader, the arguments, one class per fine label."""

    def __init__(
        self,
        root: str | Path,
        ways: int,
        shots: int,
        query_shots: int,
        hessian_shots: int,
        meta_batch_size: int,
        seed: int,
        num_val_tasks: int,
        num_test_tasks: int,
        eval_meta_batch_size: int | None,
        num_workers: int,
        device_tensors: bool | Literal["auto"],
        download: bool,
    ) -> None:
        super().__init__(
            ways,
            shots,
            query_shots,
            hessian_shots,
            meta_batch_size,
            seed,
            num_val_tasks,
            num_test_tasks,
            eval_meta_batch_size,
            num_workers,
            device_tensors,
        )
        self.root = Path(root)
        self.download = download
        if not download:
            _locate(self.root)  # a missing root fails here, not when the Trainer starts

    def prepare_data(self) -> None:
        # Lightning calls this once per node before any process reads the data.
        if not self.download:
            return
        try:
            _locate(self.root)
        except FileNotFoundError:
            download("cifar100", self.root)

    def fine_classes(self, data: CIFAR100Data) -> dict[str, list[int]]:
        """The fine labels of each split."""
        raise NotImplementedError

    def load(self) -> tuple[Tensor, dict[str, list[np.ndarray]]]:
        data = read_cifar100(self.root)
        members = [np.flatnonzero(data.fine == label) for label in range(100)]
        splits = self.fine_classes(data)
        return data.images, {
            s: [members[label] for label in labels] for s, labels in splits.items()
        }


class CIFARFSDataModule(_CIFAR100Episodes):
    """CIFAR-FS N-way K-shot tasks: 64 / 16 / 20 CIFAR-100 classes of 600 images.

    References:
        Bertinetto, Henriques, Torr, Vedaldi. Meta-learning with differentiable closed-form
        solvers. ICLR 2019.

    Args:
        root: ``cifar-100-python/`` or the folder that holds it (see :mod:`lightning_maml.datamodules.cifar`).
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
        device_tensors: Keep the images on the training device; ``"auto"`` (default) does on an
            accelerator (see :class:`~lightning_maml.datamodules.episodes.EpisodicDataModule`).
        download: Download CIFAR-100 into ``root`` in :meth:`prepare_data` when the pickles are
            not found (see :mod:`lightning_maml.datamodules.download`).

    Raises:
        FileNotFoundError: If the pickles are not found (at construction, unless ``download``).
        DownloadError: In ``prepare_data``, if the download fails.
        ValueError: For a bad argument (at construction) or, at ``setup``, corrupt files, a
            split with fewer classes than ``ways`` or too few images per class.
    """

    def __init__(
        self,
        root: str | Path,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        hessian_shots: int = 0,
        meta_batch_size: int = 4,
        seed: int = 0,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        num_workers: int = 0,
        device_tensors: bool | Literal["auto"] = "auto",
        download: bool = False,
    ) -> None:
        super().__init__(
            root,
            ways,
            shots,
            query_shots,
            hessian_shots,
            meta_batch_size,
            seed,
            num_val_tasks,
            num_test_tasks,
            eval_meta_batch_size,
            num_workers,
            device_tensors,
            download,
        )
        self.save_hyperparameters()

    def fine_classes(self, data: CIFAR100Data) -> dict[str, list[int]]:
        return {
            split: _label_ids(names, data.fine_names, "class")
            for split, names in CIFARFS_CLASSES.items()
        }


class FC100DataModule(_CIFAR100Episodes):
    """FC100 N-way K-shot tasks: the fine classes of 12 / 4 / 4 CIFAR-100 superclasses.

    References:
        Oreshkin, Rodríguez López, Lacoste. TADAM: Task dependent adaptive metric for improved
        few-shot learning. NeurIPS 2018.

    Args:
        root: ``cifar-100-python/`` or the folder that holds it (see :mod:`lightning_maml.datamodules.cifar`).
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
        device_tensors: Keep the images on the training device; ``"auto"`` (default) does on an
            accelerator (see :class:`~lightning_maml.datamodules.episodes.EpisodicDataModule`).
        download: Download CIFAR-100 into ``root`` in :meth:`prepare_data` when the pickles are
            not found (see :mod:`lightning_maml.datamodules.download`).

    Raises:
        FileNotFoundError: If the pickles are not found (at construction, unless ``download``).
        DownloadError: In ``prepare_data``, if the download fails.
        ValueError: For a bad argument (at construction) or, at ``setup``, corrupt files, a
            split with fewer classes than ``ways`` or too few images per class.
    """

    def __init__(
        self,
        root: str | Path,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        hessian_shots: int = 0,
        meta_batch_size: int = 4,
        seed: int = 0,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        num_workers: int = 0,
        device_tensors: bool | Literal["auto"] = "auto",
        download: bool = False,
    ) -> None:
        super().__init__(
            root,
            ways,
            shots,
            query_shots,
            hessian_shots,
            meta_batch_size,
            seed,
            num_val_tasks,
            num_test_tasks,
            eval_meta_batch_size,
            num_workers,
            device_tensors,
            download,
        )
        self.save_hyperparameters()

    def fine_classes(self, data: CIFAR100Data) -> dict[str, list[int]]:
        splits = {}
        for split, names in FC100_SUPERCLASSES.items():
            wanted = _label_ids(names, data.coarse_names, "superclass")
            splits[split] = sorted(set(data.fine[np.isin(data.coarse, wanted)].tolist()))
        return splits
