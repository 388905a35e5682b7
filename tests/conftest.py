"""Shared test set-up: W&B never prompts or reaches the network in tests."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


@pytest.fixture(autouse=True)
def _quiet_lightning(monkeypatch):
    # The tip about litlogger and the GPU/TPU banner add nothing to test logs.
    monkeypatch.setenv("LIGHTNING_DISABLE_TIPS", "1")
