"""Omniglot (Lake et al. 2015) as N-way K-shot tasks, in the protocol of Finn et al. 2017.

Where to get the data (any one of these layouts under ``root``):

- ``images_background.npz`` + ``images_evaluation.npz`` (+ ``SHA256SUMS``): the project's NumPy
  archives, bool ``(characters, 20, 105, 105)`` in official character order, True = background.
- ``images_background/`` + ``images_evaluation/``, or ``images_background.zip`` +
  ``images_evaluation.zip``: the official release, ``python/`` folder of
  https://github.com/brendenlake/omniglot (``<alphabet>/characterNN/NNNN_DD.png``, where NNNN is
  the official character number and DD the drawer). Each ``<alphabet>/<character>`` folder is one
  class, whatever the numbers in its file names (some repackagings restart them per alphabet).
- ``omniglot-py/``: what ``torchvision.datasets.Omniglot(root, download=True)`` leaves, the same
  folders (or zips) one level down.

``lightning-maml download omniglot --root ROOT``, or ``download=True`` on the datamodule, fetches
the official zips, verified (see :mod:`lightning_maml.datamodules.download`).

Every image is inverted (ink = 1; a PNG with an alpha channel is first composited on white, so
that ink held in the alpha channel stays ink) and resized to ``image_size`` with Pillow's Lanczos
filter, which antialiases. Reading and resizing the 32,460 images takes a few seconds, so nothing
is cached on disk.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lightning_maml.checks import check_int
from lightning_maml.datamodules.download import download
from lightning_maml.datamodules.episodes import EpisodicDataModule

__all__ = ["OmniglotData", "OmniglotDataModule", "read_omniglot"]

PARTS = ("images_background", "images_evaluation")
NUM_CHARACTERS = {"images_background": 964, "images_evaluation": 659}
DRAWERS = 20
ORIGINAL_SIZE = 105
LAYOUTS = (
    "images_background.npz + images_evaluation.npz (NumPy archives), "
    "images_background/ + images_evaluation/ (official folders), "
    "images_background.zip + images_evaluation.zip (official zips), "
    "omniglot-py/ holding those folders or zips (torchvision)"
)
_PNG_NAME = re.compile(r"^(\d+)_(\d+)\.png$")


class OmniglotData(NamedTuple):
    """The whole of Omniglot, preprocessed.

    Attributes:
        images: ``uint8`` ``(N, 1, image_size, image_size)``, ink high.
        characters: Per character, in official order, the indices of its images.
        background: Per character, whether it belongs to a background alphabet.
    """

    images: Tensor
    characters: list[np.ndarray]
    background: np.ndarray


def _resize(ink: np.ndarray, image_size: int) -> np.ndarray:
    """Resizes an 8-bit ink image (ink = 255) with Lanczos antialiasing."""
    if ink.shape == (image_size, image_size):
        return ink
    return np.asarray(
        Image.fromarray(ink).resize((image_size, image_size), Image.Resampling.LANCZOS)
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_sums(root: Path) -> dict[str, str]:
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        return {}
    expected = {}
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            expected[name.lstrip("*")] = digest.lower()
    return expected


def _read_npz(path: Path, part: str, expected_sum: str | None) -> np.ndarray:
    """Returns the bool ``(characters, 20, 105, 105)`` array of one archive, checked."""
    fix = f"replace {path} with a fresh copy."
    if expected_sum is not None and _sha256(path) != expected_sum:
        raise ValueError(
            f"{path} does not match its SHA256SUMS entry: the file is corrupt or truncated; {fix}"
        )
    try:
        with np.load(path) as archive:
            images = archive["images"]
    except (zipfile.BadZipFile, zlib.error, KeyError, ValueError, EOFError, OSError) as err:
        raise ValueError(
            f"cannot read {path} ({err}): the file is corrupt or truncated; {fix}"
        ) from err
    shape = (NUM_CHARACTERS[part], DRAWERS, ORIGINAL_SIZE, ORIGINAL_SIZE)
    if images.dtype != np.bool_ or images.shape != shape:
        raise ValueError(
            f"{path} holds images of dtype {images.dtype} and shape {images.shape}, expected bool "
            f"{shape}; {fix}"
        )
    return images


def _png_members(part: str, source: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yields (name, opener) for the PNGs of one part, as a folder or a zip."""
    if source.is_dir():
        for path in source.glob("*/*/*.png"):
            yield path.relative_to(source.parent).as_posix(), path.read_bytes
    else:
        try:
            archive = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as err:
            raise ValueError(
                f"cannot open {source} ({err}): the zip is corrupt or truncated; download it again."
            ) from err
        with archive:
            for name in archive.namelist():
                parts = name.split("/")
                if len(parts) == 4 and parts[0] == part and parts[3].endswith(".png"):
                    yield name, functools.partial(archive.read, name)


def _gray_on_white(image: Image.Image) -> np.ndarray:
    """An 8-bit grayscale array of ``image``, transparent parts read as white paper.

    ``convert("L")`` drops the alpha channel: a PNG whose ink lives in its alpha channel (black
    or any colour, transparent background) would turn all ink. Composited on white first, ink
    stays ink whichever channel holds it.
    """
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(paper, rgba).convert("L"))
    return np.asarray(image.convert("L"))


def _read_pngs(part: str, source: Path, image_size: int) -> list[list[np.ndarray]]:
    """Reads one part's PNGs: the images of each character, in drawer order.

    A character is its ``<alphabet>/<character>/`` folder, not the number in its file names:
    several repackagings restart that number in every alphabet, where the number alone would
    merge characters of different alphabets into one class. Characters come in the order of the
    official numbers (alphabets by their first number, then by name; characters likewise), which
    for the official release is the official character order.
    """
    found: dict[tuple[str, str], list[tuple[int, int, np.ndarray]]] = {}
    for name, read in _png_members(part, source):
        *_, alphabet, character, filename = name.split("/")
        if filename.startswith("."):
            continue
        match = _PNG_NAME.match(filename)
        if match is None:
            raise ValueError(
                f"{source}: {name} is not named NNNN_DD.png (character number, drawer) as in the "
                "official Omniglot release."
            )
        try:
            with Image.open(io.BytesIO(read())) as image:
                gray = _gray_on_white(image)
        except (UnidentifiedImageError, OSError, zipfile.BadZipFile, zlib.error) as err:
            raise ValueError(f"{source}: cannot decode {name} ({err}).") from err
        number, drawer = int(match[1]), int(match[2])
        found.setdefault((alphabet, character), []).append(
            (number, drawer, _resize(255 - gray, image_size))
        )
    if not found:
        raise FileNotFoundError(
            f"{source} holds no <alphabet>/<character>/NNNN_DD.png images under {part}/."
        )
    first_of_alphabet: dict[str, int] = {}
    for (alphabet, _), images in found.items():
        first = min(number for number, _, _ in images)
        first_of_alphabet[alphabet] = min(first_of_alphabet.get(alphabet, first), first)

    def order(key: tuple[str, str]) -> tuple[int, str, int, str]:
        alphabet, character = key
        first = min(number for number, _, _ in found[key])
        return first_of_alphabet[alphabet], alphabet, first, character

    return [
        [image for _, _, image in sorted(found[key], key=lambda d: (d[1], d[0]))]
        for key in sorted(found, key=order)
    ]


def _locate(root: Path) -> tuple[str, dict[str, Path]]:
    """Finds the layout under ``root``: its kind and the source of each part."""
    if all((root / f"{part}.npz").is_file() for part in PARTS):
        return "npz", {part: root / f"{part}.npz" for part in PARTS}
    for base in (root, root / "omniglot-py"):
        for suffix, test in (("", Path.is_dir), (".zip", Path.is_file)):
            sources = {part: base / f"{part}{suffix}" for part in PARTS}
            present = [test(path) for path in sources.values()]
            if all(present):
                return "png", sources
            if any(present):
                missing = [
                    str(p) for p, ok in zip(sources.values(), present, strict=True) if not ok
                ]
                raise FileNotFoundError(
                    f"Omniglot under {root} is incomplete: {', '.join(missing)} is missing; both "
                    "the background and the evaluation alphabets are needed."
                )
    raise FileNotFoundError(
        f"no Omniglot data under {root}: looked for {LAYOUTS}. To download it: lightning-maml "
        f"download omniglot --root {root}, or download=True (in a recipe: "
        "data.init_args.download: true)."
    )


def read_omniglot(root: str | Path, image_size: int = 28) -> OmniglotData:
    """Reads Omniglot from any of the supported layouts (see the module docstring).

    Args:
        root: The folder that holds the data.
        image_size: Side of the square images after resizing.

    Returns:
        Images and characters in official character order.

    Raises:
        FileNotFoundError: If no layout is found under ``root`` or a part is missing.
        ValueError: If a file is corrupt, truncated or of the wrong shape.
    """
    root = Path(root)
    kind, sources = _locate(root)
    per_character: list[list[np.ndarray]] = []
    background: list[bool] = []
    if kind == "npz":
        sums = _expected_sums(root)
        for part, path in sources.items():
            archive = _read_npz(path, part, sums.get(path.name))
            # bool -> 0/255 ink without a wider intermediate array.
            for drawings in archive:
                ink = np.logical_not(drawings).view(np.uint8) * np.uint8(255)
                per_character.append([_resize(image, image_size) for image in ink])
            background += [part == "images_background"] * len(archive)
    else:
        for part, source in sources.items():
            characters = _read_pngs(part, source, image_size)
            per_character += characters
            background += [part == "images_background"] * len(characters)
    sizes = np.array([len(c) for c in per_character])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    images = torch.from_numpy(np.stack([image for c in per_character for image in c]))
    return OmniglotData(
        images.unsqueeze(1),
        [np.arange(s, s + n) for s, n in zip(starts, sizes, strict=True)],
        np.array(background),
    )


class OmniglotDataModule(EpisodicDataModule):
    """Omniglot N-way K-shot tasks, with Finn et al.'s split and training rotations.

    Splits (over the characters found, 1,623 in the full data set):

    - ``"finn"``: a shuffle of all characters, seeded by ``split_seed``, into
      ``N - val_characters - test_characters`` training (1,100), ``val_characters`` validation
      (100) and ``test_characters`` test (423) characters, as in Finn et al. 2017 and learn2learn.
    - ``"background"``: the alphabet split of Lake et al.: training on the background alphabets
      less ``val_characters`` of their characters (seeded) held out for validation, test on the
      evaluation alphabets (``test_characters`` is not used).

    With ``rotations`` every training character also appears rotated by 90, 180 and 270 degrees,
    each rotation a class of its own (4,400 training classes in the ``"finn"`` split).

    Args:
        root: The folder with the data, in one of the layouts of :mod:`lightning_maml.datamodules.omniglot`.
        ways: Classes per task (N).
        shots: Support images per class (K; ``D_in``).
        query_shots: Query images per class (``D_o``).
        hessian_shots: Hessian-set images per class (``D_h``); 0 for none.
        meta_batch_size: Tasks per training step, over all devices together.
        split: ``"finn"`` or ``"background"``.
        rotations: Add the 90-degree rotations of the training characters as classes.
        image_size: Side of the square images (28 in Finn et al.).
        val_characters: Characters in the validation split.
        test_characters: Characters in the test split of ``"finn"``.
        split_seed: Seed of the character split (kept apart from ``seed``, which draws tasks).
        seed: The data seed; the same seed gives the same tasks.
        num_val_tasks: The size of the fixed validation task set.
        num_test_tasks: The size of the fixed test task set (600 in Finn et al.).
        eval_meta_batch_size: Tasks per validation/test batch (default: ``meta_batch_size``).
        num_workers: DataLoader workers.
        device_tensors: Keep the images on the training device; ``"auto"`` (default) does on an
            accelerator (see :class:`~lightning_maml.datamodules.episodes.EpisodicDataModule`).
        download: Download the official zips into ``root`` in :meth:`prepare_data` when ``root``
            holds none of the layouts (see :mod:`lightning_maml.datamodules.download`).

    Raises:
        FileNotFoundError: If ``root`` holds none of the layouts (at construction, unless
            ``download``).
        DownloadError: In ``prepare_data``, if the download fails.
        ValueError: For a bad argument (at construction) or, at ``setup``, corrupt files, a
            split with fewer classes than ``ways``, or too few drawers per character.
    """

    def __init__(
        self,
        root: str | Path,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        hessian_shots: int = 0,
        meta_batch_size: int = 32,
        split: Literal["finn", "background"] = "finn",
        rotations: bool = True,
        image_size: int = 28,
        val_characters: int = 100,
        test_characters: int = 423,
        split_seed: int = 0,
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
        if split not in ("finn", "background"):
            raise ValueError(f"split must be 'finn' or 'background', got {split!r}.")
        check_int("image_size", image_size)
        check_int("val_characters", val_characters)
        check_int("test_characters", test_characters)
        check_int("split_seed", split_seed, 0)
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = download
        if not download:
            _locate(self.root)  # a missing root fails here, not when the Trainer starts
        self.split = split
        self.rotations = rotations
        self.image_size = image_size
        self.val_characters = val_characters
        self.test_characters = test_characters
        self.split_seed = split_seed

    def prepare_data(self) -> None:
        # Lightning calls this once per node before any process reads the data.
        if not self.download:
            return
        try:
            _locate(self.root)
        except FileNotFoundError:
            download("omniglot", self.root)

    def character_split(self, background: np.ndarray) -> dict[str, np.ndarray]:
        """The characters of each split, given the background flag of every character."""
        rng = np.random.default_rng(self.split_seed)
        if self.split == "finn":
            order = rng.permutation(len(background))
            num_train = len(order) - self.val_characters - self.test_characters
            where = f"the {len(order)} characters found"
        else:
            order = rng.permutation(np.flatnonzero(background))
            num_train = len(order) - self.val_characters
            where = f"the {len(order)} background characters found"
        if num_train < 1:
            raise ValueError(
                f"the {self.split!r} split leaves no training characters: {where} minus "
                f"val_characters={self.val_characters}"
                + (f" and test_characters={self.test_characters}" if self.split == "finn" else "")
                + "; lower them."
            )
        train, val = order[:num_train], order[num_train : num_train + self.val_characters]
        test = order[num_train + self.val_characters :]
        if self.split == "background":
            test = np.flatnonzero(~background)
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def load(self) -> tuple[Tensor, dict[str, list[np.ndarray]]]:
        data = read_omniglot(self.root, self.image_size)
        splits = self.character_split(data.background)
        classes = {s: [data.characters[c] for c in chars] for s, chars in splits.items()}
        images = data.images
        if self.rotations:
            # Rotated copies are stored rather than rotated per task: 3 x 1,100 x 20 small images
            # cost ~50 MB and keep the sampler (and the on-device gather) one indexing operation.
            train = np.concatenate(classes["train"])
            position = np.empty(len(images), dtype=np.int64)
            position[train] = np.arange(len(train))
            rotated = [torch.rot90(images[train], k, dims=(2, 3)) for k in (1, 2, 3)]
            offsets = [len(images) + k * len(train) for k in range(3)]
            classes["train"] = [
                rotation
                for c in classes["train"]
                for rotation in [c] + [offset + position[c] for offset in offsets]
            ]
            images = torch.cat([images, *rotated])
        return images.contiguous(), classes
