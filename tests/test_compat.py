"""Each of Lightning's private APIs that lightning-maml uses works with the installed Lightning.

They are all in :mod:`lightning_maml.compat`; when a Lightning release moves one, these tests
fail with the name of the function and the Lightning version, rather than a training run.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import lightning_maml
import lightning_maml.callbacks  # the modules that override Lightning's private methods
import lightning_maml.cli
from lightning_maml import compat

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def uses_private(function: str) -> Iterator[None]:
    """Turns a failure inside into one that names the compat function and the Lightning version."""
    try:
        yield
    except (AttributeError, AssertionError, TypeError) as err:
        pytest.fail(
            f"lightning_maml.compat.{function} does not work with lightning "
            f"{lightning.__version__} ({type(err).__name__}: {err}); it was checked against "
            f"{compat.CHECKED}. Find what Lightning does now in its source and update the "
            "function, or bound lightning in pyproject.toml.",
            pytrace=False,
        )


class Recorder(LightningModule):
    """A one-layer regression model that records what the compat functions say at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.logged: list[bool] = []
        self.trainers: list[Trainer | None] = []

    def training_step(self, batch, batch_idx):
        with uses_private("should_update_logs"):
            self.logged.append(compat.should_update_logs(self.trainer))
        with uses_private("attached_trainer"):
            self.trainers.append(compat.attached_trainer(self))
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Path, callback: ModelCheckpoint) -> tuple[Recorder, Trainer]:
    data = TensorDataset(torch.randn(4, 2), torch.randn(4, 1))
    module = Recorder()
    trainer = Trainer(
        max_steps=4,
        log_every_n_steps=2,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with uses_private("attached_trainer"):
        assert compat.attached_trainer(module) is None
    trainer.fit(module, DataLoader(data, batch_size=1))
    return module, trainer


def test_the_functions_work_in_a_real_fit(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=True)
    module, trainer = fit(tmp_path, callback)
    with uses_private("should_update_logs"):
        # Lightning writes logs on every log_every_n_steps-th batch: the 2nd and the 4th.
        assert module.logged == [False, True, False, True]
    with uses_private("attached_trainer"):
        assert all(t is trainer for t in module.trainers)
    with uses_private("every_n_train_steps"):
        assert compat.every_n_train_steps(callback) == 3
        assert compat.every_n_train_steps(ModelCheckpoint()) == 0
    with uses_private("checkpoint_filesystem"):
        assert compat.checkpoint_filesystem(callback).exists(str(tmp_path / "ckpt"))
    with uses_private("monitor_candidates"):
        candidates = compat.monitor_candidates(callback, trainer)
        assert int(candidates["step"]) == trainer.global_step == 4
    with uses_private("save_last_checkpoint"):
        (tmp_path / "ckpt" / "last.ckpt").unlink()
        compat.save_last_checkpoint(callback, trainer, candidates)
        assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    with uses_private("record_saved_checkpoint"):
        # It sets attributes, which never fails: Lightning's own must exist for it to matter.
        for name in ("_last_global_step_saved", "_last_checkpoint_saved"):
            assert name in vars(ModelCheckpoint()), f"ModelCheckpoint has no {name}"
        compat.record_saved_checkpoint(callback, trainer, "somewhere.ckpt")
        assert callback._last_checkpoint_saved == "somewhere.ckpt"


def all_modules() -> list[str]:
    names = [lightning_maml.__name__]
    for found in pkgutil.walk_packages(lightning_maml.__path__, "lightning_maml."):
        names.append(found.name)
    return names


def test_every_private_lightning_method_overridden_is_marked():
    marked = {(o.base, o.method) for o in compat.OVERRIDES}
    unmarked = []
    for name in all_modules():
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != name:
                continue
            for attr, method in vars(cls).items():
                if not attr.startswith("_") or attr.startswith("__"):
                    continue
                for base in cls.__mro__[1:]:
                    if base.__module__.startswith("lightning.") and attr in vars(base):
                        if (base, method) not in marked:
                            unmarked.append(f"{cls.__qualname__}.{attr} (of {base.__qualname__})")
                        break
    assert not unmarked, (
        f"{unmarked} override private methods of Lightning: mark each with "
        "@lightning_maml.compat.overrides_private(Base)"
    )
    assert compat.OVERRIDES, "no override found: the modules were not imported"


@pytest.mark.parametrize("override", compat.OVERRIDES, ids=lambda o: f"{o.base.__name__}.{o.name}")
def test_each_overridden_private_method_is_still_there(override):
    where = f"{override.method.__module__}.{override.method.__qualname__}"
    theirs = getattr(override.base, override.name, None)
    if not callable(theirs):
        pytest.fail(
            f"{where} overrides {override.base.__name__}.{override.name} (marked with "
            f"lightning_maml.compat.overrides_private), which lightning {lightning.__version__} "
            f"no longer has; it was checked against {compat.CHECKED}. Find what Lightning "
            "calls instead and override that, or bound lightning in pyproject.toml.",
            pytrace=False,
        )
    expected = list(inspect.signature(theirs).parameters)
    ours = list(inspect.signature(override.method).parameters)
    assert ours == expected, (
        f"{where} takes {ours}, {override.base.__name__}.{override.name} of lightning "
        f"{lightning.__version__} takes {expected} (checked against {compat.CHECKED})"
    )


# Lightning's private names that only lightning_maml/compat.py may use.
PRIVATE = re.compile(
    r"\._logger_connector\b|\._trainer\b|\._fs\b|\._every_n_train_steps\b|\._monitor_candidates\b"
    r"|\._last_global_step_saved\b|\._last_checkpoint_saved\b"
)


@pytest.mark.parametrize(
    "path",
    [p for p in sorted((ROOT / "lightning_maml").rglob("*.py")) if p.name != "compat.py"],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_private_lightning_names_only_in_compat(path):
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not found, f"use lightning_maml.compat instead: {found}"
