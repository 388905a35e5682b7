"""Shared test set-up: W&B never prompts or reaches the network in tests; where the real data is.

Tests that need the real Omniglot take the ``omniglot_root`` fixture. It is
``$LIGHTNING_MAML_DATA/omniglot`` where that variable is set, else ``../shared/data/omniglot``
beside the repository when that exists (as in CI). Where neither holds Omniglot the tests are
skipped, saying how to get it; with ``LIGHTNING_MAML_REQUIRE_DATA=1`` (``.ci/run`` sets it) they
fail instead, so that CI cannot pass by skipping them.
"""

import os
from pathlib import Path

import pytest
import torch

from lightning_maml.datamodules.omniglot import _locate as locate_omniglot

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "LIGHTNING_MAML_DATA"
REQUIRE_ENV = "LIGHTNING_MAML_REQUIRE_DATA"


def data_root() -> Path:
    """The folder that holds the real data sets, one sub-folder each."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    root = data_root() / "omniglot"
    try:
        locate_omniglot(root)
    except FileNotFoundError:
        message = (
            f"needs the real Omniglot, not found in {root}: run `lightning-maml download omniglot "
            f"--root DIR/omniglot` and set {DATA_ENV}=DIR"
        )
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message} ({REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
        pytest.skip(message)
    return root


@pytest.fixture(autouse=True)
def _quiet_lightning(monkeypatch):
    # The tip about litlogger and the GPU/TPU banner add nothing to test logs.
    monkeypatch.setenv("LIGHTNING_DISABLE_TIPS", "1")


@pytest.fixture(autouse=True)
def _restore_threads():
    # `threads:` in a recipe and --threads set torch's threads for the whole process, and
    # OMP_NUM_THREADS for the processes it starts.
    threads = torch.get_num_threads()
    environment = os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(threads)
    if environment is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = environment
