"""Fault injection: runs killed at random points, a full disk, damaged checkpoints.

Real ``lightning-maml fit`` processes on the sinusoid recipe. Whatever happens to a run, every
checkpoint it leaves is whole, and a resume from the newest one continues at its global step and
ends bit-identical to a run that was never interrupted.
"""

from __future__ import annotations

import csv
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sinusoid" / "maml.yaml"
STEPS = 200
SETTINGS = [
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.val_check_interval=20",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.num_val_tasks=4",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

pytestmark = pytest.mark.slow


def command(save_dir: Path, max_steps: int = STEPS, ckpt: Path | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lightning_maml.cli",
        "fit",
        "--config",
        str(RECIPE),
        *SETTINGS,
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.max_steps={max_steps}",
        *([f"--ckpt_path={ckpt}"] if ckpt else []),
    ]


def run(save_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    limit = kwargs.pop("file_size_limit", None)

    def limit_file_size() -> None:  # a full disk: writes past `limit` bytes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        command(save_dir, **kwargs),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit_file_size if limit else None,
    )


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def trained_steps(save_dir: Path) -> list[int]:
    """The global steps whose training loss the run in ``save_dir`` logged, in order."""
    (metrics,) = save_dir.rglob("metrics.csv")
    return [int(r["step"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[int]]:
    save_dir = tmp_path_factory.mktemp("uninterrupted")
    done = run(save_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    (last,) = save_dir.rglob("last.ckpt")
    assert step_of(last) == STEPS
    return weights(last), trained_steps(save_dir)


def assert_resumes_to_the_same_end(checkpoint: Path, uninterrupted, tmp_path: Path) -> None:
    reference, logged = uninterrupted
    start = step_of(checkpoint)
    resumed_dir = tmp_path / "resumed"
    done = run(resumed_dir, ckpt=checkpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    # The resumed process trained exactly the steps after the checkpoint, as the uninterrupted
    # run numbered them, and ended where that run ended, to the bit.
    assert trained_steps(resumed_dir) == logged[start:]
    (last,) = resumed_dir.rglob("last.ckpt")
    assert step_of(last) == STEPS
    for name, value in reference.items():
        assert torch.equal(weights(last)[name], value), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_run_killed_at_a_random_point_resumes_exactly(seed, uninterrupted, tmp_path):
    save_dir = tmp_path / "killed"
    process = subprocess.Popen(
        command(save_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not list(save_dir.rglob("last.ckpt")) and process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("the run wrote no checkpoint in 300 s")
            time.sleep(0.05)
        # Somewhere after the first checkpoint: while training, validating or saving.
        time.sleep(random.Random(seed).uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    checkpoints = sorted(save_dir.rglob("*.ckpt"))
    steps = {path: step_of(path) for path in checkpoints}  # every one loads: none is truncated
    (last,) = [path for path in checkpoints if path.name == "last.ckpt"]
    # last.ckpt is the newest state saved (or the one before, if the kill fell between writing
    # a validation's best checkpoint and last.ckpt), and resuming from it continues exactly.
    assert max(steps.values()) - 20 <= steps[last] < STEPS
    assert_resumes_to_the_same_end(last, uninterrupted, tmp_path)


def test_a_full_disk_keeps_the_checkpoints_written_before(uninterrupted, tmp_path):
    save_dir = tmp_path / "run"
    first = run(save_dir, max_steps=40)
    assert first.returncode == 0, first.stderr[-3000:]
    (last,) = save_dir.rglob("last.ckpt")
    size = last.stat().st_size
    # The resumed run cannot write a file of half a checkpoint's size: its first save fails.
    full = run(save_dir, max_steps=STEPS, ckpt=last, file_size_limit=size // 2)
    assert full.returncode == 1
    message = full.stderr.strip().splitlines()[-1]
    assert message.startswith(
        "lightning-maml: error: OSError: [Errno 27] could not write the checkpoint"
    )
    assert "the checkpoints written before it are intact" in message
    # Nothing was cut short where a reader looks: every checkpoint loads, last.ckpt still holds
    # step 40, and no partial file is left behind.
    assert step_of(last) == 40
    assert all(step_of(p) <= 40 for p in save_dir.rglob("*.ckpt"))
    assert not list(save_dir.rglob("*.partial"))
    assert_resumes_to_the_same_end(last, uninterrupted, tmp_path)


def test_a_truncated_last_checkpoint_is_named_and_an_earlier_one_resumes(uninterrupted, tmp_path):
    save_dir = tmp_path / "run"
    done = run(save_dir, max_steps=60)
    assert done.returncode == 0, done.stderr[-3000:]
    (last,) = save_dir.rglob("last.ckpt")
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    refused = run(save_dir, ckpt=last)
    assert refused.returncode == 1
    assert f"cannot read checkpoint {last}" in refused.stderr.strip().splitlines()[-1]
    earlier = max((p for p in save_dir.rglob("*.ckpt") if p.name != "last.ckpt"), key=step_of)
    assert_resumes_to_the_same_end(earlier, uninterrupted, tmp_path)
