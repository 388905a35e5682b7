"""OmniglotDataModule: the real data, generated official, zip and torchvision trees, errors.

The tests on the real Omniglot take it from ``omniglot_root`` (tests/conftest.py), in any layout.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import lightning_maml.datamodules.omniglot as omniglot
from lightning_maml import MAML
from lightning_maml.datamodules.base import TrainTaskStream
from lightning_maml.datamodules.omniglot import OmniglotDataModule, read_omniglot
from lightning_maml.learner import MetaLearner
from lightning_maml.models import ConvNet

# Rows of the archives copied into the generated trees: (part, row, alphabet).
TREE = [
    ("images_background", 0, "Arcadian"),
    ("images_background", 1, "Arcadian"),
    ("images_background", 25, "Arcadian"),
    ("images_background", 30, "Second"),
    ("images_evaluation", 0, "Angelic"),
    ("images_evaluation", 1, "Angelic"),
]


@pytest.fixture(scope="module")
def real(omniglot_root):
    return read_omniglot(omniglot_root)


@pytest.fixture
def cached(real, monkeypatch):
    """Datamodules on the real root reuse the module's one read of the archives."""
    monkeypatch.setattr(omniglot, "read_omniglot", lambda root, image_size: real)


@pytest.fixture(scope="module")
def archives(omniglot_root):
    """The original 105x105 drawings (True = background) of the ``TREE`` characters.

    ``archives[part][row]`` is a bool ``(20, 105, 105)`` array, read from the real data's layout.
    """
    kind, sources = omniglot._locate(omniglot_root)
    drawings = {}
    for part in omniglot.PARTS:
        rows = {row for p, row, _ in TREE if p == part}
        if kind == "npz":
            images = np.load(sources[part])["images"]
            drawings[part] = {row: images[row] for row in rows}
            continue
        first = 1 if part == "images_background" else 965  # official character numbers
        found: dict[int, dict[int, np.ndarray]] = {row: {} for row in rows}
        for name, read in omniglot._png_members(part, sources[part]):
            match = omniglot._PNG_NAME.match(name.rsplit("/", 1)[-1])
            if match and int(match[1]) - first in rows:
                with Image.open(io.BytesIO(read())) as image:
                    found[int(match[1]) - first][int(match[2])] = (
                        np.asarray(image.convert("L")) > 127
                    )
        drawings[part] = {row: np.stack([d[k] for k in sorted(d)]) for row, d in found.items()}
    return drawings


def tree_rows(real) -> list[int]:
    """The characters of ``TREE`` as rows of the full data set."""
    return [row + (0 if part == "images_background" else 964) for part, row, _ in TREE]


def write_tree(base: Path, archives) -> None:
    """The official layout (<part>/<alphabet>/characterNN/NNNN_DD.png) for the ``TREE`` rows."""
    for part, row, alphabet in TREE:
        number = row + 1 + (0 if part == "images_background" else 964)
        folder = base / part / alphabet / f"character{row + 1:02d}"
        folder.mkdir(parents=True)
        for drawer, drawing in enumerate(archives[part][row], start=1):
            Image.fromarray(drawing).save(folder / f"{number:04d}_{drawer:02d}.png")


def zip_tree(tree: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for part in omniglot.PARTS:
        with zipfile.ZipFile(target / f"{part}.zip", "w") as archive:
            for path in sorted((tree / part).rglob("*.png")):
                archive.write(path, path.relative_to(tree).as_posix())


def test_real_archives(real):
    assert real.images.shape == (1623 * 20, 1, 28, 28) and real.images.dtype == torch.uint8
    assert len(real.characters) == 1623 and int(real.background.sum()) == 964
    assert all(len(c) == 20 for c in real.characters)
    assert not real.background[964:].any()
    # Ink is high: the strokes cover a small part of each image and the corners are blank.
    assert real.images.float().mean() < 0.2 * 255
    assert real.images[:, :, 0, 0].float().mean() < 1
    assert real.images.amax(dim=(1, 2, 3)).min() > 100  # every drawing keeps some ink


def test_finn_split_with_rotations(real, cached, omniglot_root):
    dm = OmniglotDataModule(omniglot_root)
    dm.setup("fit")
    assert {s: len(c) for s, c in dm.classes.items()} == {"train": 4400, "val": 100, "test": 423}
    first = 1623 * 20
    characters = {
        split: {int(c[0]) // 20 for c in classes if c[0] < first}
        for split, classes in dm.classes.items()
    }
    assert [len(characters[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert set().union(*characters.values()) == set(range(1623))
    assert not characters["train"] & characters["val"] | characters["val"] & characters["test"]
    assert not characters["train"] & characters["test"]
    # Each training character is followed by its three rotations.
    base, *turned = dm.classes["train"][:4]
    for k, rotated in enumerate(turned, start=1):
        assert torch.equal(dm.images[rotated], torch.rot90(dm.images[base], k, dims=(2, 3)))
    assert all(c.max() < first for c in dm.classes["val"] + dm.classes["test"])


def test_split_seed_and_rotations_option(real, cached, omniglot_root):
    a = OmniglotDataModule(omniglot_root, rotations=False)
    b = OmniglotDataModule(omniglot_root, rotations=False, split_seed=1)
    a.setup("fit")
    b.setup("fit")
    assert len(a.classes["train"]) == 1100 and len(a.images) == 1623 * 20
    assert [c[0] for c in a.classes["val"]] != [c[0] for c in b.classes["val"]]


def test_background_split(real, cached, omniglot_root):
    dm = OmniglotDataModule(omniglot_root, split="background", rotations=False)
    dm.setup("fit")
    chars = {s: {int(c[0]) // 20 for c in cls} for s, cls in dm.classes.items()}
    assert chars["test"] == set(range(964, 1623))
    assert len(chars["val"]) == 100 and len(chars["train"]) == 864
    assert chars["train"] | chars["val"] == set(range(964))


def test_tasks_from_real_data(real, cached, omniglot_root):
    dm = OmniglotDataModule(omniglot_root, ways=5, shots=1, query_shots=15, hessian_shots=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (32, 5, 1, 28, 28)
    assert batch.query_x.shape == (32, 75, 1, 28, 28)
    assert batch.hessian_x.shape == (32, 20, 1, 28, 28)
    assert batch.support_x.max() <= 1 and batch.support_x.min() >= 0
    test = dm.eval_set("test")
    assert len(test) == 19 and len(test.tasks) == 600  # batches of 32 tasks
    again = OmniglotDataModule(omniglot_root, ways=5, shots=1, query_shots=15, hessian_shots=4)
    assert torch.equal(test[3].query_x, again.eval_set("test")[3].query_x)
    ranks = [
        TrainTaskStream(dm.task_sampler("train"), 32, 0, rank=r, world_size=2).batch(0)
        for r in (0, 1)
    ]
    assert not torch.equal(ranks[0].support_x, ranks[1].support_x)


@pytest.mark.parametrize("layout", ["folders", "zips", "omniglot-py", "omniglot-py zips"])
def test_png_layouts_match_the_archives(layout, real, archives, tmp_path):
    tree = tmp_path / "tree"
    write_tree(tree, archives)
    if layout == "folders":
        root = tree
    elif layout == "zips":
        root = tmp_path / "zips"
        zip_tree(tree, root)
    elif layout == "omniglot-py":
        root = tmp_path / "tv"
        shutil.copytree(tree, root / "omniglot-py")
    else:
        root = tmp_path / "tvz"
        zip_tree(tree, root / "omniglot-py")
    data = read_omniglot(root)
    assert data.background.tolist() == [True] * 4 + [False] * 2
    expected = torch.cat([real.images[real.characters[row]] for row in tree_rows(real)])
    assert torch.equal(data.images, expected)

    dm = OmniglotDataModule(root, ways=2, val_characters=2, test_characters=2, meta_batch_size=2)
    dm.setup("fit")
    assert [len(dm.classes[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 2, 1, 28, 28)


def test_missing_root_names_the_layouts_and_the_download(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"looked for .*\.npz.*folders.*zips.*omniglot-py.*To download it: lightning-maml "
        r"download omniglot --root .*nowhere, or download=True",
    ):
        OmniglotDataModule(tmp_path / "nowhere")
    # With download=True an absent root is fine until prepare_data, which fetches it.
    assert OmniglotDataModule(tmp_path / "nowhere", download=True).root == tmp_path / "nowhere"


def test_incomplete_tree(tmp_path):
    (tmp_path / "images_background").mkdir()
    with pytest.raises(FileNotFoundError, match=r"incomplete: .*images_evaluation is missing"):
        OmniglotDataModule(tmp_path)


@pytest.mark.parametrize("with_sums", [True, False])
def test_truncated_archive(tmp_path, with_sums):
    for part in omniglot.PARTS:
        np.savez_compressed(tmp_path / f"{part}.npz", images=np.ones((3, 20, 105, 105), dtype=bool))
    path = tmp_path / "images_background.npz"
    data = path.read_bytes()
    if with_sums:
        digest = hashlib.sha256(data).hexdigest()
        (tmp_path / "SHA256SUMS").write_text(f"{digest}  images_background.npz\n")
    path.write_bytes(data[: len(data) // 2])
    dm = OmniglotDataModule(tmp_path)
    match = "does not match its SHA256SUMS" if with_sums else "corrupt or truncated"
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


def test_archive_of_the_wrong_shape(tmp_path):
    for part in omniglot.PARTS:
        np.savez(tmp_path / f"{part}.npz", images=np.ones((3, 20, 105, 105), dtype=bool))
    with pytest.raises(ValueError, match=r"expected bool \(964, 20, 105, 105\)"):
        OmniglotDataModule(tmp_path).setup("fit")


def test_bad_png(tmp_path, archives):
    write_tree(tmp_path, archives)
    next((tmp_path / "images_evaluation").rglob("*.png")).write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode"):
        read_omniglot(tmp_path)
    (tmp_path / "images_background" / "Arcadian" / "character01" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not named NNNN_DD\.png"):
        read_omniglot(tmp_path)


def test_too_many_ways_or_shots(real, cached, omniglot_root):
    with pytest.raises(ValueError, match=r"ways=101 but the val split .* only 100 classes"):
        OmniglotDataModule(omniglot_root, ways=101).setup("fit")
    with pytest.raises(ValueError, match=r"= 21 images per class, but the smallest class .* 20"):
        OmniglotDataModule(omniglot_root, shots=5, query_shots=15, hessian_shots=1).setup("fit")


def test_split_that_leaves_no_training_characters(tmp_path, archives):
    write_tree(tmp_path, archives)
    dm = OmniglotDataModule(tmp_path, ways=2, val_characters=3, test_characters=3)
    with pytest.raises(ValueError, match="leaves no training characters"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "vinyals"}, "split must be 'finn' or 'background'"),
        ({"image_size": 0}, "image_size must be an integer >= 1"),
        ({"ways": 0}, "ways must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"split_seed": -1}, "split_seed must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):  # before the root is looked at
        OmniglotDataModule(tmp_path, **kwargs)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_device_tensors_give_the_same_run_through_meta_learner(real, cached, omniglot_root):
    results = []
    for device_tensors in (False, True):
        torch.manual_seed(0)
        dm = OmniglotDataModule(
            omniglot_root,
            query_shots=2,
            meta_batch_size=2,
            num_val_tasks=4,
            num_test_tasks=6,
            eval_meta_batch_size=3,
            device_tensors=device_tensors,
        )
        learner = MetaLearner(
            model=ConvNet(in_channels=1, ways=5, hidden=8, image_size=28),
            algorithm=MAML(inner_lr=0.4),
            loss="cross_entropy",
            eval_inner_steps=2,
        )
        options = {
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        }
        L.Trainer(max_steps=3, val_check_interval=2, **options).fit(learner, datamodule=dm)
        results.append(L.Trainer(**options).test(learner, datamodule=dm, verbose=False)[0])
    assert results[0] == results[1]


def drawings(count: int, seed: int = 0) -> np.ndarray:
    """``count`` random 12x12 ink masks (True = ink), each different from the others."""
    return np.random.default_rng(seed).random((count, 12, 12)) < 0.3


def write_png(path: Path, ink: np.ndarray, mode: str = "L") -> None:
    """One drawing as the official PNGs hold it (black ink on white), or with ink in alpha."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        image = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8))
    else:  # RGBA / LA: colour channels all black, the ink only in the alpha channel
        alpha = np.where(ink, 255, 0).astype(np.uint8)
        channels = [np.zeros_like(alpha)] * (3 if mode == "RGBA" else 1) + [alpha]
        image = Image.fromarray(np.stack(channels, axis=-1), mode)
    image.save(path)


def test_numbering_that_restarts_in_each_alphabet_keeps_characters_apart(tmp_path):
    # Two alphabets per part whose file names both start at 0001: before, a character was its
    # number, so both alphabets' character01 became one class of 2 x 3 drawings.
    ink = drawings(8 * 3).reshape(8, 3, 12, 12)
    row = 0
    for part in omniglot.PARTS:
        for alphabet in ("Alpha", "Beta"):
            for character in (1, 2):
                for drawer in (1, 2, 3):
                    name = f"{character:04d}_{drawer:02d}.png"
                    folder = tmp_path / part / alphabet / f"character{character:02d}"
                    write_png(folder / name, ink[row, drawer - 1])
                row += 1
    data = read_omniglot(tmp_path, image_size=12)
    assert len(data.characters) == 8 and all(len(c) == 3 for c in data.characters)
    assert data.background.tolist() == [True] * 4 + [False] * 4
    # Alphabets by name, characters by number, drawers in order: each class is its folder's.
    for row, indices in enumerate(data.characters):
        expected = torch.from_numpy(np.where(ink[row], 255, 0).astype(np.uint8))
        assert torch.equal(data.images[indices, 0], expected.expand(3, -1, -1))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_ink_in_the_alpha_channel_reads_as_ink(tmp_path, mode):
    ink = drawings(2 * 2)
    for root, written in ((tmp_path / "gray", "L"), (tmp_path / "alpha", mode)):
        for index, part in enumerate(omniglot.PARTS):
            for drawer in (1, 2):
                name = f"{index + 1:04d}_{drawer:02d}.png"
                write_png(
                    root / part / "Alpha" / "character01" / name,
                    ink[2 * index + drawer - 1],
                    written,
                )
    with Image.open(next((tmp_path / "alpha").rglob("*.png"))) as image:
        assert image.mode == mode
        # What the reader did before: the alpha dropped, every pixel black, all ink.
        assert np.asarray(image.convert("L")).max() == 0
    alpha, gray = read_omniglot(tmp_path / "alpha", 12), read_omniglot(tmp_path / "gray", 12)
    assert torch.equal(alpha.images, gray.images)
    assert 0 < alpha.images.float().mean() < 0.5 * 255  # ink on a blank ground, not all ink
