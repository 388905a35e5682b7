"""mini-ImageNet, CIFAR-FS and FC100 on small files generated in exactly the real layouts."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_maml.datamodules.base import TrainTaskStream
from lightning_maml.datamodules.cifar import CIFARFSDataModule, FC100DataModule, read_cifar100
from lightning_maml.datamodules.miniimagenet import MiniImageNetDataModule, read_mini_imagenet

# CIFAR-100's superclasses and their fine classes, as its documentation lists them; the label
# numbers of both follow the alphabetical order of the names, as in the real meta file.
CIFAR100 = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
FINE = sorted(name for names in CIFAR100.values() for name in names)
COARSE = sorted(CIFAR100)
COARSE_OF = {fine: COARSE.index(c) for c, names in CIFAR100.items() for fine in names}
PER_CLASS = {"train": 4, "test": 2}  # 500 and 100 in the real files

# mini-ImageNet: classes per split (64 / 16 / 20 in the real files) and images per class (600).
MINI_CLASSES = {"train": 6, "val": 3, "test": 4}
MINI_PER_CLASS = 8


def pixel_ids(count: int, shape: tuple[int, ...], start: int = 0) -> np.ndarray:
    """Images whose first two pixels spell their number, so a test can find them again."""
    images = np.zeros((count, *shape), dtype=np.uint8)
    numbers = np.arange(start, start + count)
    flat = images.reshape(count, -1)
    flat[:, 0], flat[:, 1] = numbers // 256, numbers % 256
    return images


def write_cifar(folder: Path) -> None:
    """cifar-100-python/{train,test,meta} as the real pickles (bytes keys, Python 2 strings)."""
    folder.mkdir(parents=True)
    start = 0
    for part, per in PER_CLASS.items():
        fine = np.repeat(np.arange(100), per)
        images = pixel_ids(len(fine), (3, 32, 32), start).reshape(len(fine), -1)
        start += len(fine)
        data = {
            b"batch_label": f"{part} batch".encode(),
            b"filenames": [f"{i}.png".encode() for i in range(len(fine))],
            b"fine_labels": fine.tolist(),
            b"coarse_labels": [COARSE_OF[FINE[f]] for f in fine],
            b"data": images,
        }
        (folder / part).write_bytes(pickle.dumps(data))
    meta = {
        b"fine_label_names": [n.encode() for n in FINE],
        b"coarse_label_names": [n.encode() for n in COARSE],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root / "cifar-100-python")
    return root


def mini_pickles(root: Path) -> dict[str, dict]:
    """learn2learn's mini-imagenet-cache-*.pkl: image_data (N, 84, 84, 3) and class_dict."""
    names = {"train": "train", "val": "validation", "test": "test"}
    contents = {}
    start = 0
    for split, classes in MINI_CLASSES.items():
        count = classes * MINI_PER_CLASS
        order = np.random.default_rng(0).permutation(count)  # classes need not be contiguous
        class_dict = {
            f"n{split}{c:05d}": order[c * MINI_PER_CLASS : (c + 1) * MINI_PER_CLASS].tolist()
            for c in range(classes)
        }
        images = pixel_ids(count, (3, 84, 84), start).transpose(0, 2, 3, 1)
        data = {"image_data": np.ascontiguousarray(images), "class_dict": class_dict}
        start += count
        (root / f"mini-imagenet-cache-{names[split]}.pkl").write_bytes(pickle.dumps(data))
        contents[split] = data
    return contents


def mini_csv(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Ravi & Larochelle's images/ + train.csv|val.csv|test.csv (filename,label)."""
    (root / "images").mkdir(parents=True)
    rows = {}
    rng = np.random.default_rng(1)
    for split, classes in MINI_CLASSES.items():
        rows[split] = []
        for c in range(classes):
            label = f"n0{split}{c:04d}"
            for i in range(MINI_PER_CLASS):
                name = f"{label}{i:08d}.jpg"
                size = (84, 84) if i else (100, 90)  # one image of another size, to be resized
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / name)
                rows[split].append((name, label))
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows(rows[split])
    return rows


def identities(x: torch.Tensor) -> torch.Tensor:
    """The numbers that ``pixel_ids`` wrote into a batch of float images."""
    flat = (x * 255).round().long().flatten(start_dim=-3)
    return flat[..., 0] * 256 + flat[..., 1]


# -- mini-ImageNet ---------------------------------------------------------------------------


def test_mini_imagenet_pickles(tmp_path):
    contents = mini_pickles(tmp_path)
    images, classes, names = read_mini_imagenet(tmp_path)
    assert images.shape == (13 * MINI_PER_CLASS, 3, 84, 84) and images.dtype == torch.uint8
    offset = 0
    for split, data in contents.items():
        assert names[split] == list(data["class_dict"])
        for members, expected in zip(classes[split], data["class_dict"].values(), strict=True):
            want = torch.from_numpy(data["image_data"][expected]).permute(0, 3, 1, 2)
            assert torch.equal(images[members], want)
            assert members.min() >= offset
        offset += len(data["image_data"])

    dm = MiniImageNetDataModule(tmp_path, ways=3, shots=2, query_shots=3, hessian_shots=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (4, 6, 3, 84, 84)
    assert batch.hessian_x.shape == (4, 3, 3, 84, 84)
    # Every image of a task belongs to the training split and is used once.
    train_ids = set(range(len(contents["train"]["image_data"])))
    for t in range(batch.num_tasks):
        ids = torch.cat(
            [identities(x[t]) for x in (batch.support_x, batch.query_x, batch.hessian_x)]
        )
        assert len(ids.unique()) == len(ids) and set(ids.tolist()) <= train_ids


def test_mini_imagenet_csv_and_cache(tmp_path):
    rows = mini_csv(tmp_path / "mini")
    cache = tmp_path / "cache"
    images, classes, names = read_mini_imagenet(tmp_path / "mini", cache_dir=cache)
    assert images.shape == (13 * MINI_PER_CLASS, 3, 84, 84)
    assert [len(classes[s]) for s in ("train", "val", "test")] == [6, 3, 4]
    assert names["val"] == [f"n0val{c:04d}" for c in range(3)]
    name = rows["test"][1][0]
    index = [r[0] for s in ("train", "val", "test") for r in rows[s]].index(name)
    decoded = np.array(Image.open(tmp_path / "mini" / "images" / name).convert("RGB"))
    assert torch.equal(images[index], torch.from_numpy(decoded).permute(2, 0, 1))
    assert len(list(cache.glob("*.npy"))) == 1
    # The second read comes from the cache: it no longer needs the JPEGs.
    for path in (tmp_path / "mini" / "images").iterdir():
        path.unlink()
    again, _, _ = read_mini_imagenet(tmp_path / "mini", cache_dir=cache)
    assert torch.equal(again, images)


def test_mini_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"looked for mini-imagenet-cache-train\.pkl.*csv"):
        MiniImageNetDataModule(tmp_path)
    mini_pickles(tmp_path)
    dm = MiniImageNetDataModule(tmp_path, ways=4, query_shots=2)
    with pytest.raises(ValueError, match=r"ways=4 but the val split .* only 3 classes"):
        dm.setup("fit")
    dm = MiniImageNetDataModule(tmp_path, ways=3, shots=4, query_shots=5)
    with pytest.raises(ValueError, match=r"smallest class .* has 8"):
        dm.setup("test")
    path = tmp_path / "mini-imagenet-cache-test.pkl"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        MiniImageNetDataModule(tmp_path, query_shots=2).setup("fit")
    path.write_bytes(pickle.dumps({"image_data": np.zeros((2, 84, 84)), "class_dict": {}}))
    with pytest.raises(ValueError, match=r"'image_data' must be a uint8 array"):
        MiniImageNetDataModule(tmp_path, query_shots=2).setup("fit")


def test_mini_imagenet_csv_errors(tmp_path):
    rows = mini_csv(tmp_path)
    (tmp_path / "images" / rows["val"][0][0]).unlink()
    with pytest.raises(FileNotFoundError, match="listed in a CSV but missing"):
        MiniImageNetDataModule(tmp_path, query_shots=2).setup("fit")
    (tmp_path / "test.csv").write_text("name,class\n")
    with pytest.raises(ValueError, match="header 'filename,label'"):
        MiniImageNetDataModule(tmp_path, query_shots=2).setup("fit")


# -- CIFAR-FS and FC100 ----------------------------------------------------------------------


def test_cifar100_reader(cifar_root):
    data = read_cifar100(cifar_root)
    assert data.images.shape == (600, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.fine_names == FINE and data.coarse_names == COARSE
    assert np.bincount(data.fine).tolist() == [6] * 100
    # root may also be cifar-100-python/ itself
    assert torch.equal(read_cifar100(cifar_root / "cifar-100-python").images, data.images)


def split_names(dm) -> dict[str, set[str]]:
    data = read_cifar100(dm.root)
    return {
        split: {FINE[int(data.fine[c[0]])] for c in classes}
        for split, classes in dm.classes.items()
    }


def test_cifar_fs_split(cifar_root):
    dm = CIFARFSDataModule(cifar_root, shots=1, query_shots=5)
    dm.setup("fit")
    names = split_names(dm)
    assert [len(names[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert names["train"] | names["val"] | names["test"] == set(FINE)
    assert names["val"] == {
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor",
    }  # fmt: skip
    assert all(len(c) == 6 for cls in dm.classes.values() for c in cls)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (4, 5, 3, 32, 32) and batch.query_y.shape == (4, 25)


def test_fc100_split(cifar_root):
    dm = FC100DataModule(cifar_root, shots=1, query_shots=5)
    dm.setup("fit")
    names = split_names(dm)
    assert [len(names[s]) for s in ("train", "val", "test")] == [60, 20, 20]
    superclasses = {s: {COARSE[COARSE_OF[n]] for n in names[s]} for s in names}
    assert [len(superclasses[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert superclasses["test"] == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert not superclasses["train"] & superclasses["val"]


def test_cifar_tasks_are_deterministic_and_rank_aware(cifar_root):
    a = CIFARFSDataModule(cifar_root, query_shots=5, seed=7)
    b = CIFARFSDataModule(cifar_root, query_shots=5, seed=7)
    first = next(iter(a.train_dataloader()))
    assert torch.equal(first.query_x, next(iter(b.train_dataloader())).query_x)
    assert torch.equal(a.eval_set("test")[2].support_x, b.eval_set("test")[2].support_x)
    ranks = [
        TrainTaskStream(a.task_sampler("train"), 4, 7, rank=r, world_size=2).batch(0)
        for r in (0, 1)
    ]
    assert not torch.equal(ranks[0].support_x, ranks[1].support_x)
    assert torch.equal(torch.cat([r.support_x for r in ranks]), first.support_x)


def test_cifar_errors(cifar_root, tmp_path):
    for module in (CIFARFSDataModule, FC100DataModule):
        with pytest.raises(
            FileNotFoundError, match=r"looked for cifar-100-python/\{train,test,meta\}"
        ):
            module(tmp_path)
    with pytest.raises(ValueError, match=r"ways=17 but the val split of CIFARFSDataModule .* 16"):
        CIFARFSDataModule(cifar_root, ways=17, query_shots=2).setup("fit")
    with pytest.raises(ValueError, match=r"4 \+ 2 \+ 1 = 7 images per class, but the smallest"):
        FC100DataModule(cifar_root, shots=4, query_shots=2, hessian_shots=1).setup("test")
    broken = tmp_path / "cifar-100-python"
    write_cifar(broken)
    data = (broken / "train").read_bytes()
    (broken / "train").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CIFARFSDataModule(tmp_path, query_shots=2).setup("fit")
    (broken / "train").write_bytes(pickle.dumps({b"data": np.zeros((3, 10), np.uint8)}))
    with pytest.raises(ValueError, match=r"must be a dict with the keys"):
        CIFARFSDataModule(tmp_path, query_shots=2).setup("fit")
