"""Writes the image-classification recipes: recipes/<benchmark>/<variant>_<ways>w<shots>s[_ddp].yaml.

The Omniglot, mini-ImageNet, CIFAR-FS and FC100 recipes are generated from the tables below, so
that they stay consistent: MAML, FO-MAML and HF-MAML on every benchmark, and ANIL, Meta-SGD and
MAML++ with their papers' settings on Omniglot and mini-ImageNet 5-way 1-shot. Edit this script,
not the YAML, and run

    python recipes/generate.py           # rewrite the recipes
    python recipes/generate.py --check   # exit 1 if a recipe differs from what this writes

(tests/test_recipes.py runs the check). The sinusoid and theory recipes are written by hand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

RECIPES = Path(__file__).resolve().parent

VARIANTS = {
    "maml": ("MAML", "MAML (second-order meta-gradient, Finn et al. 2017)"),
    "fomaml": ("FOMAML", "first-order MAML (no Hessian terms, Finn et al. 2017)"),
    "hfmaml": (
        "HFMAML",
        "Hessian-free MAML (finite-difference Hessian-vector products, Fallah et al. 2020)",
    ),
}


@dataclass(frozen=True)
class Setting:
    """One benchmark at one ways/shots: everything a recipe needs."""

    benchmark: str  # folder name under recipes/
    title: str
    datamodule: str
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
    algorithm_lines: tuple[str, ...] = ()  # more init_args of the algorithm (indented 6)
    scheduler_lines: tuple[str, ...] = ()  # the learner's lr_scheduler block (indented 2)

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
        datamodule="lightning_maml.datamodules.OmniglotDataModule",
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
        datamodule="lightning_maml.datamodules.MiniImageNetDataModule",
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


def cifar(benchmark: str, ways: int, shots: int) -> Setting:
    if benchmark == "cifarfs":
        title, datamodule = "CIFAR-FS", "lightning_maml.datamodules.CIFARFSDataModule"
        first = "Data: CIFAR-FS (Bertinetto et al. 2019; 64/16/20 CIFAR-100 classes), cut from CIFAR-100"
        paper = "Bertinetto et al. 2019"
    else:
        title, datamodule = "FC100", "lightning_maml.datamodules.FC100DataModule"
        first = (
            "Data: FC100 (Oreshkin et al. 2018; 12/4/4 CIFAR-100 superclasses), cut from CIFAR-100"
        )
        paper = "Sun et al. 2019 (MTL)"
    return Setting(
        benchmark=benchmark,
        title=title,
        datamodule=datamodule,
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


ANIL_SOURCE = (
    "Settings: Raghu et al. 2020 (ANIL) keep MAML's (Finn et al. 2017), the head adapting alone.",
)
METASGD_SOURCE = (
    "Settings: Li et al. 2017 (Meta-SGD): one inner step with a learned step size per parameter",
    "          element, otherwise MAML's (Finn et al. 2017); the step sizes start at inner_lr here",
    "          (Li et al. draw them in [0.005, 0.1]).",
)
MAMLPP_SOURCE = (
    "Settings: Antoniou et al. 2019 (MAML++), as in the authors' released configuration:",
    "          5 inner steps with learned per-layer per-step step sizes and per-step BatchNorm",
    "          weights, the multi-step loss over the first 10 epochs of 500 steps (at least",
    "          0.01 / k per step), second order throughout.",
)


def anil(s: Setting) -> Setting:
    return replace(
        s,
        source_lines=ANIL_SOURCE,
        algorithm_lines=("inner_update:", "  class_path: lightning_maml.ANIL"),
    )


def meta_sgd(s: Setting) -> Setting:
    return replace(
        s,
        source_lines=METASGD_SOURCE,
        inner_steps=1,
        eval_inner_steps=1,
        algorithm_lines=("inner_update:", "  class_path: lightning_maml.MetaSGD"),
    )


def maml_plus_plus(s: Setting) -> Setting:
    omniglot = s.benchmark == "omniglot"
    steps = 50000
    return replace(
        s,
        source_lines=MAMLPP_SOURCE
        + (
            ("          Cosine annealing of the meta learning rate to 1e-5.",)
            if omniglot
            else ("          A constant meta learning rate (the configuration's minimum is 1e-3).",)
        ),
        query_shots=1 if omniglot else 15,
        hidden=64 if omniglot else 48,
        inner_lr=0.1 if omniglot else 0.01,
        inner_steps=5,
        eval_inner_steps=5,
        meta_batch_size=8 if omniglot else 2,
        ddp_devices=8 if omniglot else 2,
        max_steps=steps,
        algorithm_lines=(
            f"multi_step_loss_steps: {10 * 500 if omniglot else 15 * 500}",
            "first_order_steps: 0",
            "min_step_weight: 0.01",
            "inner_update:",
            "  class_path: lightning_maml.PerStepRates",
            "  init_args:",
            "    batch_norm: true",
        ),
        scheduler_lines=(
            (
                "lr_scheduler:",
                "  class_path: torch.optim.lr_scheduler.CosineAnnealingLR",
                "  init_args:",
                f"    T_max: {steps}",
                "    eta_min: 1.0e-05",
            )
            if omniglot
            else ()
        ),
    )


#: Where the other members of the family have recipes.
FAMILY_SETTINGS = {("omniglot", "5w1s"), ("miniimagenet", "5w1s")}
#: The other members of the family: name -> (algorithm class, description, setting change),
#: each on Omniglot and mini-ImageNet 5-way 1-shot.
FAMILY: dict[str, tuple[str, str, Callable[[Setting], Setting]]] = {
    "anil": ("MAML", "ANIL (only the head adapts, Raghu et al. 2020)", anil),
    "metasgd": ("MAML", "Meta-SGD (learned per-parameter step sizes, Li et al. 2017)", meta_sgd),
    "mamlpp": ("MAMLPlusPlus", "MAML++ (Antoniou et al. 2019)", maml_plus_plus),
}


def settings() -> list[Setting]:
    found = [omniglot(w, s) for w in (5, 20) for s in (1, 5)]
    found += [miniimagenet(5, s) for s in (1, 5)]
    found += [cifar(b, 5, s) for b in ("cifarfs", "fc100") for s in (1, 5)]
    return found


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _num(value: float) -> str:
    return f"{value:g}"


def recipe(s: Setting, variant: str, ddp: bool) -> tuple[str, str]:
    """The path (relative to recipes/) and text of one recipe."""
    if variant in FAMILY:
        cls, description, change = FAMILY[variant]
        s = change(s)
    else:
        cls, description = VARIANTS[variant]
    name = f"{variant}_{s.shape}{'_ddp' if ddp else ''}.yaml"
    path = f"{s.benchmark}/{name}"
    base = f"recipes/{s.benchmark}/{variant}_{s.shape}.yaml"
    me = f"recipes/{path}"
    per_device = s.meta_batch_size // s.ddp_devices
    # Two nodes: as many GPUs each as keeps the meta-batch divisible by all of them together.
    node = s.ddp_devices if s.meta_batch_size % (2 * s.ddp_devices) == 0 else s.ddp_devices // 2
    nodes = " --trainer.num_nodes 2" + (
        f" --trainer.devices {node}" if node != s.ddp_devices else ""
    )
    steps = (
        f"inner_lr {_num(s.inner_lr)}, {s.inner_steps} inner step{'s' if s.inner_steps > 1 else ''}"
    )
    lines = [
        f"# {s.title} {s.ways}-way {s.shots}-shot classification with {description}"
        + (f", on {s.ddp_devices} GPUs with DDP." if ddp else "."),
        f"# ConvNet ({s.in_channels}-channel {s.image_size}x{s.image_size} input, 4 blocks of {s.hidden} filters);"
        f" {steps} ({s.eval_inner_steps} at test);",
        f"# meta-batch {s.meta_batch_size} tasks; {s.query_shots} query image{'s' if s.query_shots > 1 else ''}"
        f" per class; Adam 1e-3{' (cosine-annealed)' if s.scheduler_lines else ''};"
        f" {s.max_steps:,} meta-steps; tested on 600 tasks.",
        *(f"# {line}" for line in s.source_lines),
        *(f"# {line}" for line in s.data_lines),
    ]
    if ddp:
        lines += [
            f"# meta_batch_size is global: the {s.meta_batch_size} tasks of a step are split over the"
            f" {s.ddp_devices} GPUs ({per_device} each),",
            f"# so the run optimises exactly as {base} does"
            + (
                f" ({s.ddp_devices} GPUs, not 8: the meta-batch of {s.meta_batch_size} must divide evenly)."
                if s.ddp_devices != 8
                else "."
            ),
            f"# One node:       lightning-maml fit --config {me}",
            f"# Several nodes:  torchrun --nnodes 2 --nproc_per_node {node} --rdzv_backend c10d"
            " --rdzv_endpoint HOST:29500 \\",
            f"#                   -m lightning_maml.cli fit --config {me}{nodes}",
            f"#                 or, under SLURM (#SBATCH --nodes=2 --ntasks-per-node={node}"
            f" --gres=gpu:{node}):",
            f"#                   srun lightning-maml fit --config {me}{nodes}",
            '#                 (README.md, "Several devices"; the devices of all nodes together must divide'
            " meta_batch_size)",
        ]
    else:
        lines += [
            f"# Single device:  lightning-maml fit --config {me}",
            f"# Multi-GPU:      lightning-maml fit --config {me.replace('.yaml', '_ddp.yaml')}"
            f"  (DDP on {s.ddp_devices} GPUs, same meta-batch)",
        ]
    lines += [
        f"# Override:       lightning-maml fit --config {me} --data.init_args.root /path/to/data",
        f"# Test a checkpoint: lightning-maml test --config {me} --ckpt_path PATH.ckpt",
        "#                 (prints the test accuracy with its 95% interval over the test tasks)",
        "seed_everything: 0",
        "trainer:",
    ]
    if ddp:
        lines += [
            "  accelerator: gpu",
            f"  devices: {s.ddp_devices}",
            "  strategy: ddp",
        ]
    lines += [
        f"  max_steps: {s.max_steps}",
        f"  val_check_interval: {s.val_check_interval}",
        "  check_val_every_n_epoch: null",
        "  log_every_n_steps: 50",
        "  logger:",
        "    class_path: lightning.pytorch.loggers.WandbLogger",
        "    init_args:",
        "      project: lightning-maml",
        "      save_dir: runs",
        f"      group: {s.benchmark}",
        f"      tags: [{s.benchmark}, {s.shape}]  # the CLI adds the variant's tag",
        "  callbacks:",
        "    - class_path: lightning_maml.callbacks.ModelCheckpoint",
        "      init_args:",
        "        monitor: val/accuracy",
        "        mode: max",
        "        save_last: true",
        "    - class_path: lightning_maml.callbacks.GradNormMonitor",
        "      init_args:",
        "        group_by: layer",
        "model:",
        "  model:",
        "    class_path: lightning_maml.models.ConvNet",
        "    init_args:",
        f"      in_channels: {s.in_channels}",
        f"      ways: {s.ways}",
        f"      hidden: {s.hidden}",
        f"      image_size: {s.image_size}",
        "  algorithm:",
        f"    class_path: lightning_maml.{cls}",
        "    init_args:",
        f"      inner_lr: {_num(s.inner_lr)}",
        f"      inner_steps: {s.inner_steps}",
    ]
    if variant == "hfmaml":
        # ReLU and max-pool kinks, not rounding or curvature, set the finite difference's
        # error on these nets; it was lowest near 0.3 (benchmarks/README.md).
        lines.append("      delta_scale: 0.3  # see benchmarks/README.md, gradient fidelity")
    lines += [f"      {line}" for line in s.algorithm_lines]
    lines += [
        "  loss: cross_entropy",
        "  meta_optimizer:",
        "    class_path: torch.optim.Adam",
        "    init_args:",
        "      lr: 0.001",
        *(f"  {line}" for line in s.scheduler_lines),
        f"  eval_inner_steps: {s.eval_inner_steps}",
        "data:",
        f"  class_path: {s.datamodule}",
        "  init_args:",
        f"    root: {s.root}",
        *(["    download: true"] if s.download else []),
        f"    ways: {s.ways}",
        f"    shots: {s.shots}",
        f"    query_shots: {s.query_shots}",
        "    hessian_shots: 0",
        f"    meta_batch_size: {s.meta_batch_size}",
        *(f"    {key}: {_value(value)}" for key, value in s.extra_data),
        "    seed: 0",
        "    num_val_tasks: 100",
        "    num_test_tasks: 600",
        "    num_workers: 2",
    ]
    return path, "\n".join(lines) + "\n"


def recipes() -> dict[str, str]:
    """Every generated recipe: path relative to recipes/ -> text."""
    out = {}
    for s in settings():
        family = list(FAMILY) if (s.benchmark, s.shape) in FAMILY_SETTINGS else []
        for variant in [*VARIANTS, *family]:
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
    for path, text in recipes().items():
        target = RECIPES / path
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
    print(f"wrote {len(recipes())} recipes under {RECIPES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
