"""Fault injection: runs killed or stopped at random points, a full disk, damaged checkpoints.

Real ``lightning-maml fit`` processes on the sinusoid recipe. Whatever happens to a run, every
checkpoint it leaves is whole, and a resume from the newest one continues at its global step and
ends bit-identical to a run that was never interrupted. A run stopped by SIGTERM (how schedulers
stop and preempt jobs) loses no step at all.
"""

from __future__ import annotations

import csv
import os
import random
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_maml import MAML, MetaLearner
from lightning_maml.callbacks import ModelCheckpoint
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP

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


def wait_for_the_first_checkpoint(save_dir: Path, process: subprocess.Popen) -> None:
    """Returns once the run has written a last.ckpt (or ended); fails after 300 s."""
    deadline = time.monotonic() + 300
    while not list(save_dir.rglob("last.ckpt")) and process.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail("the run wrote no checkpoint in 300 s")
        time.sleep(0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_run_killed_at_a_random_point_resumes_exactly(seed, uninterrupted, tmp_path):
    save_dir = tmp_path / "killed"
    process = subprocess.Popen(
        command(save_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_the_first_checkpoint(save_dir, process)
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


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_stopped_by_sigterm_saves_its_last_step_and_resumes_exactly(
    seed, uninterrupted, tmp_path
):
    save_dir = tmp_path / "stopped"
    with (tmp_path / "stderr").open("w") as stderr:
        process = subprocess.Popen(
            command(save_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            wait_for_the_first_checkpoint(save_dir, process)
            # At a random step after the first validation: in a step, a validation or a save.
            time.sleep(random.Random(seed).uniform(0.0, 1.0))
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=300)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, "not stopped by the signal"
    (last,) = save_dir.rglob("last.ckpt")
    step = step_of(last)
    assert 20 <= step < STEPS
    # Every step the run trained is in last.ckpt: none is lost since the last validation.
    _, logged = uninterrupted
    assert trained_steps(save_dir) == logged[:step]
    assert not list(save_dir.rglob("*.partial"))
    resume = shlex.join(["lightning-maml", *command(save_dir)[3:], "--ckpt_path", str(last)])
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert lines[-1] == (
        f"lightning-maml: stopped by SIGTERM at step {step}; {last} holds that step. "
        f"Resume with: {resume}"
    )
    assert_resumes_to_the_same_end(last, uninterrupted, tmp_path)


class SignalAt(Callback):
    """Sends this process ``signum`` when training step ``step`` starts (0: in the sanity check),
    and when testing starts."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        if self.step == 0:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            os.kill(os.getpid(), self.signum)


def fit_in_process(tmp_path: Path, *callbacks: Callback, command: str = "fit") -> None:
    learner = MetaLearner(MLP(hidden=8), MAML(0.01), loss="mse")
    data = SinusoidDataModule(
        meta_batch_size=2, num_val_tasks=4, num_test_tasks=4, eval_meta_batch_size=2
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        val_check_interval=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    getattr(trainer, command)(learner, datamodule=data)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_in_python_saves_last_without_save_last(name, tmp_path, capsys):
    signum = signal.Signals[name]
    # A handler that ignores the signal, so that a fit which does not take it fails this test
    # instead of ending the test process.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGUSR1)}
    handlers = {s: signal.getsignal(s) for s in previous}
    try:
        with pytest.raises(SystemExit) as stop:
            fit_in_process(tmp_path, ModelCheckpoint(dirpath=tmp_path), SignalAt(signum, 3))
        # The handlers from before fit are back.
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert stop.value.code == 128 + signum
    assert step_of(tmp_path / "last.ckpt") == 3
    line = capsys.readouterr().err.strip().splitlines()[-1]
    # Outside the CLI the line says what to pass instead of a command.
    assert line == (
        f"lightning-maml: stopped by {name} at step 3; {tmp_path / 'last.ckpt'} holds that "
        f"step. Resume with: ckpt_path='{tmp_path / 'last.ckpt'}' (--ckpt_path "
        f"{tmp_path / 'last.ckpt'} on the command line)"
    )


def test_a_signal_in_the_sanity_check_exits_with_its_status(tmp_path, capsys):
    # Lightning stops there by itself, with status 0; nothing was trained, nothing is saved.
    with pytest.raises(SystemExit) as stop:
        fit_in_process(tmp_path, ModelCheckpoint(dirpath=tmp_path), SignalAt(signal.SIGTERM, 0))
    assert stop.value.code == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lightning-maml: stopped by SIGTERM before training step 1;")
    assert not list(tmp_path.glob("*.ckpt"))


def test_a_test_stopped_by_sigterm_exits_with_143(tmp_path, capsys):
    # Lightning stops a test in the middle with status 0: `fit && test` would look done.
    with pytest.raises(SystemExit) as stop:
        fit_in_process(
            tmp_path, ModelCheckpoint(dirpath=tmp_path), SignalAt(signal.SIGTERM, 0), command="test"
        )
    assert stop.value.code == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "lightning-maml: stopped by SIGTERM during test: no result."


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
