"""mini-ImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle 2017.

64 training, 16 validation and 20 test classes of 600 colour images each, 84x84. The split is the
one the files carry. Two layouts are read, under ``root``:

- ``mini-imagenet-cache-train.pkl``, ``mini-imagenet-cache-validation.pkl``,
  ``mini-imagenet-cache-test.pkl``: the pickles that learn2learn distributes
  (``learn2learn.vision.datasets.MiniImagenet(root, mode=..., download=True)`` downloads them),
  each a dict with ``"image_data"``, ``uint8`` ``(N, 84, 84, 3)``, and ``"class_dict"``,
  ``{class name: [indices into image_data]}``. They are read by an unpickler that builds only
  NumPy arrays and plain containers, so a file that would run code is refused, by name.
- ``images/`` + ``train.csv``, ``val.csv``, ``test.csv``: Ravi & Larochelle's layout
  (https://github.com/twitter-research/meta-learning-lstm, whose script builds ``images/`` from
  ImageNet), CSVs with the header ``filename,label``. Images that are not 84x84 are resized with
  Lanczos antialiasing. Decoding 60,000 JPEGs takes a while: pass ``cache_dir`` to keep the
  decoded tensor as a ``.npy`` file.

Neither is an official redistributable file with a published hash, so ``download=True`` and
``lightning-maml download miniimagenet`` only say how to obtain them.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lightning_maml.datamodules.download import DownloadError, miniimagenet_howto
from lightning_maml.datamodules.episodes import EpisodicDataModule
from lightning_maml.datamodules.safe_pickle import load_data_pickle

__all__ = ["MiniImageNetDataModule", "read_mini_imagenet"]

SPLITS = ("train", "val", "test")
PICKLES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}
CSVS = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
IMAGE_SIZE = 84
LAYOUTS = (
    f"{', '.join(PICKLES.values())} (learn2learn's pickles), "
    f"images/ + {', '.join(CSVS.values())} (Ravi & Larochelle's CSV layout)"
)


def _locate(root: Path) -> str:
    if all((root / name).is_file() for name in PICKLES.values()):
        return "pickle"
    if (root / "images").is_dir() and all((root / name).is_file() for name in CSVS.values()):
        return "csv"
    raise FileNotFoundError(
        f"no mini-ImageNet data under {root}: looked for {LAYOUTS}. {miniimagenet_howto(root)}"
    )


def _read_pickle(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One split's images ``(N, 84, 84, 3)`` and class indices, checked."""
    fix = f"replace {path} with a fresh copy."
    data = load_data_pickle(path, fix)
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= data.keys():
        raise ValueError(f"{path} is not a dict with 'image_data' and 'class_dict'; {fix}")
    images, class_dict = data["image_data"], data["class_dict"]
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[3] != 3
    ):
        raise ValueError(
            f"{path}: 'image_data' must be a uint8 array (N, H, W, 3), got "
            f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}; "
            f"{fix}"
        )
    classes = {name: np.asarray(members, dtype=np.int64) for name, members in class_dict.items()}
    for name, members in classes.items():
        if (
            members.ndim != 1
            or len(members) == 0
            or members.min() < 0
            or members.max() >= len(images)
        ):
            raise ValueError(
                f"{path}: class {name!r} lists indices outside 'image_data' (N={len(images)}); "
                f"{fix}"
            )
    return images, classes


def _read_csv(path: Path) -> dict[str, list[str]]:
    """Class label -> file names, in the CSV's order."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{path} must start with the header 'filename,label'.")
    classes: dict[str, list[str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise ValueError(f"{path}, line {number}: expected 'filename,label', got {row}.")
        classes.setdefault(row[1], []).append(row[0])
    if not classes:
        raise ValueError(f"{path} lists no images.")
    return classes


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} is listed in a CSV but missing from images/.") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot decode {path} ({err}).") from err
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(rgb)


def _read_images(root: Path, files: list[str], cache_dir: Path | None, key: str) -> np.ndarray:
    """Decodes ``root/images/<file>`` for every file, through the cache if there is one."""
    cache = None if cache_dir is None else cache_dir / f"mini-imagenet-{key}.npy"
    shape = (len(files), IMAGE_SIZE, IMAGE_SIZE, 3)
    if cache is not None and cache.is_file():
        try:
            images = np.load(cache)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"cannot read the cache {cache} ({err}); delete it.") from err
        if images.shape != shape or images.dtype != np.uint8:
            raise ValueError(
                f"the cache {cache} holds {images.shape}, expected {shape}; delete it."
            )
        return images
    images = np.empty(shape, dtype=np.uint8)
    for i, name in enumerate(files):
        images[i] = _decode(root / "images" / name)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Written under another name and renamed, so that an interrupted run leaves no
        # half-written cache behind.
        partial = cache.with_suffix(f".{os.getpid()}.partial.npy")
        np.save(partial, images)
        partial.replace(cache)
    return images


def read_mini_imagenet(
    root: str | Path, cache_dir: str | Path | None = None
) -> tuple[Tensor, dict[str, list[np.ndarray]], dict[str, list[str]]]:
    """Reads mini-ImageNet from either layout (see the module docstring).

    Args:
        root: The folder that holds the data.
        cache_dir: Where to keep the decoded images of the CSV layout (``None``: no cache).

    Returns:
        All images ``uint8`` ``(N, 3, 84, 84)``, per split the index arrays of its classes, and per
        split its class names.

    Raises:
        FileNotFoundError: If neither layout is under ``root``, or a listed image is missing.
        ValueError: If a file is corrupt or malformed.
    """
    root = Path(root)
    arrays: list[Tensor] = []
    classes: dict[str, list[np.ndarray]] = {}
    names: dict[str, list[str]] = {}
    offset = 0
    if _locate(root) == "pickle":
        for split in SPLITS:
            images, split_classes = _read_pickle(root / PICKLES[split])
            arrays.append(torch.from_numpy(images).permute(0, 3, 1, 2))
            names[split] = list(split_classes)
            classes[split] = [offset + c for c in split_classes.values()]
            offset += len(images)
        return torch.cat(arrays), classes, names
    files: list[str] = []
    for split in SPLITS:
        listed = _read_csv(root / CSVS[split])
        names[split] = list(listed)
        classes[split] = []
        for members in listed.values():
            classes[split].append(np.arange(len(files), len(files) + len(members)))
            files += members
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update((root / CSVS[split]).read_bytes())
    key = digest.hexdigest()[:16]
    images = _read_images(root, files, None if cache_dir is None else Path(cache_dir), key)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), classes, names


class MiniImageNetDataModule(EpisodicDataModule):
    """mini-ImageNet N-way K-shot tasks (Ravi & Larochelle's 64/16/20 class split).

    Images are ``float32`` ``(3, 84, 84)`` in ``[0, 1]``.

    Args:
        root: The folder with the data, in one of the layouts of :mod:`lightning_maml.datamodules.miniimagenet`.
        ways: Classes per task (N).
        shots: Support images per class (K; ``D_in``).
        query_shots: Query images per class (``D_o``).
        hessian_shots: Hessian-set images per class (``D_h``); 0 for none.
        meta_batch_size: Tasks per training step, over all devices together (4 in Finn et al.).
        cache_dir: Where to keep the decoded images of the CSV layout (``None``: no cache).
        seed: The data seed; the same seed gives the same tasks.
        num_val_tasks: The size of the fixed validation task set.
        num_test_tasks: The size of the fixed test task set.
        eval_meta_batch_size: Tasks per validation/test batch (default: ``meta_batch_size``).
        num_workers: DataLoader workers.
        device_tensors: Keep the images on the training device; ``"auto"`` (default) does on an
            accelerator (see :class:`~lightning_maml.datamodules.episodes.EpisodicDataModule`).
        download: Accepted for the same interface as the other image datamodules; there is no
            official file to download, so where ``root`` holds neither layout,
            :meth:`prepare_data` raises an error that says how to obtain the data.

    Raises:
        FileNotFoundError: If ``root`` holds neither layout (at construction, unless
            ``download``).
        DownloadError: In ``prepare_data``, with ``download`` and no data under ``root``.
        ValueError: For a bad argument (at construction) or, at ``setup``, corrupt files, a
            split with fewer classes than ``ways`` or classes with too few images.
    """

    def __init__(
        self,
        root: str | Path,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        hessian_shots: int = 0,
        meta_batch_size: int = 4,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        num_workers: int = 0,
        device_tensors: bool | Literal["auto"] = "auto",
        download: bool = False,
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
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = download
        if not download:
            _locate(self.root)  # a missing root fails here, not when the Trainer starts
        self.cache_dir = cache_dir
        self.class_names: dict[str, list[str]] | None = None

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            _locate(self.root)
        except FileNotFoundError as err:
            raise DownloadError(miniimagenet_howto(self.root)) from err

    def load(self) -> tuple[Tensor, dict[str, list[np.ndarray]]]:
        images, classes, self.class_names = read_mini_imagenet(self.root, self.cache_dir)
        return images, classes
