"""Writes the image-classification recipes: recipes/<benchmark>/<variant>_<ways>w<shots>s[_ddp].yaml.

The Omniglot, mini-ImageNet, CIFAR-FS and FC100 recipes are generated, so that they stay
consistent: each benchmark's setting is in the tables below (Finn et al.'s where they exist), and
each variant's recipes, with the changes its paper makes to that setting, are in its entry of the
variant registry (``lightning_maml/variants.py``, ``Variant.recipes``): MAML, FO-MAML and HF-MAML
on every benchmark, the other members of the family where their papers report a setting. A
registered variant gets its recipes here with no change to this script. Edit the tables or the
registry, not the YAML, and run

    python recipes/generate.py           # rewrite the recipes
    python recipes/generate.py --check   # exit 1 if a recipe differs from what this writes

(tests/recipes/test_recipes.py runs the check). The sinusoid and theory recipes are written by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

RECIPES = Path(__file__).resolve().parent
# This checkout's package, whichever directory the script is run from.
sys.path.insert(0, str(RECIPES.parent))

import lightning_maml  # noqa: E402
from lightning_maml.variants import Recipe, Variant, get, variants  # noqa: E402

#: The datamodule class of each benchmark, as the recipes name it.
DATAMODULES = {
    "omniglot": "lightning_maml.datamodules.OmniglotDataModule",
    "miniimagenet": "lightning_maml.datamodules.MiniImageNetDataModule",
    "cifarfs": "lightning_maml.datamodules.CIFARFSDataModule",
    "fc100": "lightning_maml.datamodules.FC100DataModule",
}
#: The learner's meta-optimizer unless a variant's recipe says otherwise.
ADAM = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}


@dataclass(frozen=True)
class Setting:
    """One benchmark at one ways/shots: everything a recipe needs."""

    benchmark: str  # folder name under recipes/, and the key of DATAMODULES
    title: str
    root: str
    data_lines: tuple[str, ...]  # header lines on where to get the data
    source_lines: tuple[str, ...]  # header lines on where the settings come from
    ways: int
    shots: int
    query_shots: int
    in_channels: int
    hidden: int
    image_size: int
    inner_lr: float
    inner_steps: int
    meta_batch_size: int
    ddp_devices: int
    max_steps: int = 60000
    eval_inner_steps: int = 10
    val_check_interval: int = 1000
    extra_data: tuple[tuple[str, object], ...] = ()
    download: bool = True  # mini-ImageNet has no official file to download

    @property
    def shape(self) -> str:
        return f"{self.ways}w{self.shots}s"


DOWNLOAD_DATA = (
    "      download: true fetches it there when absent, from the official source (or the mirror",
    "      in LIGHTNING_MAML_DATA_MIRROR), checked against pinned hashes; `lightning-maml download",
)
OMNIGLOT_DATA = (
    "Data: Omniglot (Lake et al. 2015) under data/omniglot (relative to where you launch).",
    *DOWNLOAD_DATA,
    "      omniglot` does it ahead. Also read: images_background/ + images_evaluation/ (the",
    "      official zips, unzipped), omniglot-py/ (what torchvision.datasets.Omniglot(root,",
    "      download=True) leaves), or the NumPy archives images_background.npz +",
    "      images_evaluation.npz; see datamodules/omniglot.py.",
    "      Another folder: --data.init_args.root PATH.",
)
MINI_DATA = (
    "Data: mini-ImageNet (Vinyals et al. 2016, Ravi & Larochelle's 64/16/20 split) under",
    "      data/miniimagenet, either learn2learn's mini-imagenet-cache-{train,validation,test}.pkl",
    "      (learn2learn.vision.datasets.MiniImagenet(root, mode=..., download=True) fetches them)",
    "      or images/ + train.csv, val.csv, test.csv (github.com/twitter-research/meta-learning-lstm);",
    "      see datamodules/miniimagenet.py. Another folder: --data.init_args.root PATH.",
    "      No official file can be downloaded: `lightning-maml download miniimagenet` says how.",
)
CIFAR_DATA = (
    "      under data/cifar100: the folder cifar-100-python/ (train, test, meta) of",
    "      https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, or what",
    "      torchvision.datasets.CIFAR100('data/cifar100', download=True) leaves.",
    *DOWNLOAD_DATA,
    "      cifar100` does it ahead; see datamodules/cifar.py.",
    "      Another folder: --data.init_args.root PATH.",
)
FINN = "Settings: Finn et al. 2017 (paper and reference code)"
CIFAR_GUESS = (
    "Settings: a guess, Finn et al.'s mini-ImageNet ones (32 filters, inner_lr 0.01, 5 steps,",
    "          10 at test, meta-batch 4, 15 query images per class) at 32x32. {paper} report",
    "          MAML on this benchmark but these recipes do not reproduce its exact settings.",
)


def omniglot(ways: int, shots: int) -> Setting:
    five = ways == 5
    return Setting(
        benchmark="omniglot",
        title="Omniglot",
        root="data/omniglot",
        data_lines=OMNIGLOT_DATA,
        source_lines=(
            f"{FINN}; as in its code, as many query images",
            "          per class as support images. Split: 1,100 / 100 / 423 characters, with rotations.",
        ),
        ways=ways,
        shots=shots,
        query_shots=shots,
        in_channels=1,
        hidden=64,
        image_size=28,
        inner_lr=0.4 if five else 0.1,
        inner_steps=1 if five else 5,
        meta_batch_size=32 if five else 16,
        ddp_devices=8,
        extra_data=(("split", "finn"), ("rotations", True), ("image_size", 28)),
    )


def miniimagenet(ways: int, shots: int) -> Setting:
    return Setting(
        benchmark="miniimagenet",
        title="mini-ImageNet",
        root="data/miniimagenet",
        data_lines=MINI_DATA,
        source_lines=(f"{FINN}.",),
        ways=ways,
        shots=shots,
        query_shots=15,
        in_channels=3,
        hidden=32,
        image_size=84,
        inner_lr=0.01,
        inner_steps=5,
        meta_batch_size=4,
        ddp_devices=4,
        download=False,
    )


#: CIFAR-FS and FC100: title, the first data line, and who report MAML on them.
CIFAR = {
    "cifarfs": (
        "CIFAR-FS",
        "Data: CIFAR-FS (Bertinetto et al. 2019; 64/16/20 CIFAR-100 classes), cut from CIFAR-100",
        "Bertinetto et al. 2019",
    ),
    "fc100": (
        "FC100",
        "Data: FC100 (Oreshkin et al. 2018; 12/4/4 CIFAR-100 superclasses), cut from CIFAR-100",
        "Sun et al. 2019 (MTL)",
    ),
}


def cifar(benchmark: str, ways: int, shots: int) -> Setting:
    title, first, paper = CIFAR[benchmark]
    return Setting(
        benchmark=benchmark,
        title=title,
        root="data/cifar100",
        data_lines=(first, *CIFAR_DATA),
        source_lines=tuple(line.format(paper=paper) for line in CIFAR_GUESS),
        ways=ways,
        shots=shots,
        query_shots=15,
        in_channels=3,
        hidden=32,
        image_size=32,
        inner_lr=0.01,
        inner_steps=5,
        meta_batch_size=4,
        ddp_devices=4,
    )


def settings() -> list[Setting]:
    found = [omniglot(w, s) for w in (5, 20) for s in (1, 5)]
    found += [miniimagenet(5, s) for s in (1, 5)]
    found += [cifar(b, 5, s) for b in CIFAR for s in (1, 5)]
    return found


def class_path(cls: type) -> str:
    """How a recipe names a class: through the package's front door where it is exported."""
    if getattr(lightning_maml, cls.__name__, None) is cls:
        return f"lightning_maml.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def adapted(s: Setting, variant: Variant, recipe: Recipe) -> Setting:
    """The benchmark's setting with the changes of the variant's recipe."""
    known = {f.name for f in fields(Setting)}
    unknown = sorted(set(recipe.setting) - known)
    if unknown:
        raise ValueError(
            f"Variant {variant.name!r}: Recipe(setting=...) names {unknown}, which recipes/"
            f"generate.py's Setting does not have; use some of {sorted(known)}."
        )
    s = replace(s, **recipe.setting)
    return replace(s, source_lines=recipe.source) if recipe.source else s


def nodes(s: Setting) -> int | None:
    """GPUs per node of a two-node launch: as many as keep the meta-batch divisible by all of
    them together (None: no two-node launch does)."""
    for per_node in (s.ddp_devices, s.ddp_devices // 2):
        if per_node >= 1 and s.meta_batch_size % (2 * per_node) == 0:
            return per_node
    return None


def header(s: Setting, variant: Variant, recipe: Recipe, ddp: bool) -> list[str]:
    """The recipe's opening comment: what it runs, from where, and how to launch it."""
    base = f"recipes/{s.benchmark}/{variant.name}_{s.shape}.yaml"
    me = base.replace(".yaml", "_ddp.yaml") if ddp else base
    per_device = s.meta_batch_size // s.ddp_devices
    steps = f"inner_lr {s.inner_lr:g}, {s.inner_steps} inner step{'s' if s.inner_steps > 1 else ''}"
    lines = [
        f"{s.title} {s.ways}-way {s.shots}-shot classification with {variant.description or variant.title}"
        + (f", on {s.ddp_devices} GPUs with DDP." if ddp else "."),
        f"ConvNet ({s.in_channels}-channel {s.image_size}x{s.image_size} input, 4 blocks of {s.hidden} filters);"
        f" {steps} ({s.eval_inner_steps} at test);",
        f"meta-batch {s.meta_batch_size} tasks; {s.query_shots} query image{'s' if s.query_shots > 1 else ''}"
        f" per class; {recipe.optimizer_text}; {s.max_steps:,} meta-steps; tested on 600 tasks.",
        *s.source_lines,
        *recipe.notes,
        *s.data_lines,
    ]
    if ddp:
        node = nodes(s)
        several = " --trainer.num_nodes 2" + (
            f" --trainer.devices {node}" if node != s.ddp_devices else ""
        )
        lines += [
            f"meta_batch_size is global: the {s.meta_batch_size} tasks of a step are split over the"
            f" {s.ddp_devices} GPUs ({per_device} each),",
            f"so the run optimises exactly as {base} does"
            + (
                f" ({s.ddp_devices} GPUs, not 8: the meta-batch of {s.meta_batch_size} must divide evenly)."
                if s.ddp_devices != 8
                else "."
            ),
            f"One node:       lightning-maml fit --config {me}",
        ]
        if node is None:
            lines.append(
                f"Several nodes:  none: the meta-batch of {s.meta_batch_size} tasks does not split"
                " evenly over two nodes."
            )
        else:
            lines += [
                f"Several nodes:  torchrun --nnodes 2 --nproc_per_node {node} --rdzv_backend c10d"
                " --rdzv_endpoint HOST:29500 \\",
                f"                  -m lightning_maml.cli fit --config {me}{several}",
                f"                or, under SLURM (#SBATCH --nodes=2 --ntasks-per-node={node}"
                f" --gres=gpu:{node}):",
                f"                  srun lightning-maml fit --config {me}{several}",
                '                (README.md, "Several devices"; the devices of all nodes together must divide'
                " meta_batch_size)",
            ]
    else:
        lines += [
            f"Single device:  lightning-maml fit --config {me}",
            f"Multi-GPU:      lightning-maml fit --config {me.replace('.yaml', '_ddp.yaml')}"
            f"  (DDP on {s.ddp_devices} GPUs, same meta-batch)",
        ]
    return [
        *lines,
        f"Override:       lightning-maml fit --config {me} --data.init_args.root /path/to/data",
        f"Test a checkpoint: lightning-maml test --config {me} --ckpt_path PATH.ckpt",
        "                (prints the test accuracy with its 95% interval over the test tasks)",
    ]


def config(s: Setting, variant: Variant, recipe: Recipe, ddp: bool) -> dict:
    """The recipe's content: what ``lightning-maml fit --config`` reads."""
    distribution = {"accelerator": "gpu", "devices": s.ddp_devices, "strategy": "ddp"}
    algorithm = {"inner_lr": s.inner_lr, "inner_steps": s.inner_steps, **recipe.algorithm}
    if variant.inner_update is not None:
        algorithm["inner_update"] = {"class_path": class_path(variant.inner_update)}
        if variant.inner_update_args:
            algorithm["inner_update"]["init_args"] = dict(variant.inner_update_args)
    content = {
        "seed_everything": 0,
        "trainer": {
            **(distribution if ddp else {}),
            "max_steps": s.max_steps,
            "val_check_interval": s.val_check_interval,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 50,
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {
                    "project": "lightning-maml",
                    "save_dir": "runs",
                    "group": s.benchmark,
                    "tags": [s.benchmark, s.shape],
                },
            },
            "callbacks": [
                {
                    "class_path": "lightning_maml.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/accuracy", "mode": "max", "save_last": True},
                },
                {
                    "class_path": "lightning_maml.callbacks.GradNormMonitor",
                    "init_args": {"group_by": "layer"},
                },
            ],
        },
        "model": {
            "model": {
                "class_path": "lightning_maml.models.ConvNet",
                "init_args": {
                    "in_channels": s.in_channels,
                    "ways": s.ways,
                    "hidden": s.hidden,
                    "image_size": s.image_size,
                },
            },
            "algorithm": {"class_path": class_path(variant.algorithm), "init_args": algorithm},
            "loss": "cross_entropy",
            "meta_optimizer": recipe.meta_optimizer or ADAM,
            **({"lr_scheduler": recipe.lr_scheduler} if recipe.lr_scheduler else {}),
            "eval_inner_steps": s.eval_inner_steps,
        },
        "data": {
            "class_path": DATAMODULES[s.benchmark],
            "init_args": {
                "root": s.root,
                **({"download": True} if s.download else {}),
                "ways": s.ways,
                "shots": s.shots,
                "query_shots": s.query_shots,
                "hessian_shots": 0,
                "meta_batch_size": s.meta_batch_size,
                **dict(s.extra_data),
                "seed": 0,
                "num_val_tasks": 100,
                "num_test_tasks": 600,
                "num_workers": 2,
            },
        },
    }
    # Fresh objects throughout: safe_dump would write a YAML alias for an object met twice.
    return json.loads(json.dumps(content))


def recipe(s: Setting, variant: Variant | str, ddp: bool) -> tuple[str, str]:
    """The path (relative to recipes/) and text of one recipe of ``variant`` on ``s``.

    Raises:
        ValueError: If the variant has no recipe on this setting.
    """
    variant = get(variant) if isinstance(variant, str) else variant
    changes = variant.recipe_for(s.benchmark, s.shape)
    if changes is None:
        raise ValueError(
            f"Variant {variant.name!r} has no recipe on {s.benchmark}/{s.shape}: add one to its "
            "Variant(recipes={...}) entry."
        )
    s = adapted(s, variant, changes)
    path = f"{s.benchmark}/{variant.name}_{s.shape}{'_ddp' if ddp else ''}.yaml"
    comment = "".join(f"# {line}\n" for line in header(s, variant, changes, ddp))
    body = yaml.safe_dump(config(s, variant, changes, ddp), sort_keys=False, width=100)
    return path, comment + body


def recipes() -> dict[str, str]:
    """Every generated recipe: path relative to recipes/ -> text."""
    out = {}
    for s in settings():
        for variant in variants():
            if variant.recipe_for(s.benchmark, s.shape) is None:
                continue
            for ddp in (False, True):
                path, text = recipe(s, variant, ddp)
                out[path] = text
    return out


def stale(root: Path = RECIPES) -> list[str]:
    """The generated recipes that are missing under ``root`` or differ from this script's."""
    return [
        path
        for path, text in recipes().items()
        if not (root / path).is_file() or (root / path).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        for path in out_of_date:
            print(f"out of date: recipes/{path}")
        return 1 if out_of_date else 0
    written = recipes()
    for path, text in written.items():
        target = RECIPES / path
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
    print(f"wrote {len(written)} recipes under {RECIPES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
