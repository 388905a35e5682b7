"""The package installs under its own name: ``lightning_maml``, with the datamodules inside it.

A top-level ``datamodules`` package would collide with the ``datamodules/`` folder of many
Lightning projects. The source stays in the repository's ``datamodules/`` folder and
``lightning_maml/datamodules`` links to it (pyproject.toml says why): a checkout, an editable
install and a wheel all import it as ``lightning_maml.datamodules``, beside a user's own
``datamodules``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lightning_maml.datamodules

ROOT = Path(__file__).resolve().parents[1]

# Run in the new environment from the user's project folder: what each import resolves to.
PROBE = """
import json, datamodules, lightning_maml
from lightning_maml.datamodules import OmniglotDataModule
import lightning_maml.datamodules.omniglot as omniglot
print(json.dumps({
    "lightning_maml": lightning_maml.__file__,
    "omniglot": omniglot.__file__,
    "class": OmniglotDataModule.__module__,
    "users": datamodules.__file__,
    "users_value": datamodules.MINE,
}))
"""


def test_a_checkout_imports_its_own_datamodules_folder():
    # Run from the repository (cwd on sys.path), the name leads to the repository's datamodules/.
    found = Path(lightning_maml.datamodules.__file__).resolve()
    assert found == ROOT / "datamodules" / "__init__.py"
    assert (ROOT / "lightning_maml" / "datamodules").resolve() == ROOT / "datamodules"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of what the build reads (the link included), so no build output lands in the tree."""
    copy = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, copy / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("lightning_maml", "datamodules"):
        shutil.copytree(ROOT / name, copy / name, symlinks=True, ignore=skip)
    return copy


def pip(*args: str) -> None:
    # Without build isolation the build uses this environment's setuptools: no index is asked.
    options = ("--no-deps", "--no-build-isolation", "--check-build-dependencies", "-q")
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args, *options],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def user_project(tmp_path: Path) -> Path:
    """A Lightning project of a user, with its own ``datamodules`` package."""
    project = tmp_path / "project"
    (project / "datamodules").mkdir(parents=True)
    (project / "datamodules" / "__init__.py").write_text("MINE = 'the user'\n")
    return project


def probe(tmp_path: Path, install: list[str]) -> dict:
    """Installs into a fresh environment and runs :data:`PROBE` from a user's project."""
    env_dir = tmp_path / "env"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)],
        check=True,
    )
    python = env_dir / "bin" / "python"
    pip("--python", str(python), "install", *install)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(python), "-c", PROBE],
        cwd=user_project(tmp_path),
        env=environ,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package_with_the_datamodules(source, tmp_path):
    pip("wheel", str(source), "-w", str(tmp_path / "wheel"))
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == {"lightning_maml"}
    assert "lightning_maml/datamodules/omniglot.py" in names
    # Every source file is in it: a sub-package left out of the build would be missing here.
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_maml").rglob("*.py")}
    sources |= {
        f"lightning_maml/{p.relative_to(ROOT).as_posix()}"
        for p in (ROOT / "datamodules").glob("*.py")
    }
    assert sources <= set(names), sorted(sources - set(names))

    found = probe(tmp_path, [str(wheel)])
    site = str(tmp_path / "env")
    assert found["lightning_maml"].startswith(site)
    assert found["omniglot"].startswith(site)
    assert found["omniglot"].endswith(os.path.join("lightning_maml", "datamodules", "omniglot.py"))
    assert found["class"] == "lightning_maml.datamodules.omniglot"
    assert found["users"] == str(tmp_path / "project" / "datamodules" / "__init__.py")
    assert found["users_value"] == "the user"


@pytest.mark.slow
def test_an_editable_install_imports_the_datamodules_beside_the_users(source, tmp_path):
    found = probe(tmp_path, ["-e", str(source)])
    assert found["lightning_maml"] == str(source / "lightning_maml" / "__init__.py")
    assert Path(found["omniglot"]).resolve() == source / "datamodules" / "omniglot.py"
    assert found["class"] == "lightning_maml.datamodules.omniglot"
    assert found["users"] == str(tmp_path / "project" / "datamodules" / "__init__.py")
    assert found["users_value"] == "the user"
