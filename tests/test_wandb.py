"""W&B: real offline runs read back from their files, and a CLI that never prompts or hangs."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import lightning as L
import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from wandb.proto import wandb_internal_pb2

from lightning_maml import HFMAML, MetaLearner
from lightning_maml.callbacks import GradNormMonitor
from lightning_maml.cli import main
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP
from lightning_maml.tools.plot import load_run, wandb_records
from lightning_maml.tools.plot import main as plot
from lightning_maml.wandb_connection import default_wandb_offline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "sinusoid", "hfmaml.yaml")
TINY = [
    "--trainer.max_steps=3",
    "--trainer.log_every_n_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.meta_batch_size=2",
]


def records(directory, timeout: float = 60.0) -> tuple[list, int]:
    """The records of the finished run under ``directory``, and the size of its .wandb file.

    ``wandb.finish()`` can return before the file is written out (seen with a second run in one
    process), so this waits for the file and for the run's closing ``exit`` record.
    """
    deadline = time.monotonic() + timeout
    while True:
        parsed = []
        for path in directory.rglob("run-*.wandb"):
            for data in wandb_records(path):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(data)
                parsed.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in parsed):
            return parsed, path.stat().st_size
        assert time.monotonic() < deadline, f"no finished W&B run under {directory} in {timeout} s"
        time.sleep(0.2)


def read_run(directory) -> dict:
    """The run's history rows, config, tags and saved files, from its .wandb file."""
    assert len(list(directory.rglob("run-*.wandb"))) <= 1, "one run expected"
    parsed, size = records(directory)
    run = {"history": [], "config": {}, "tags": [], "files": [], "size": size}
    for record in parsed:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            run["history"].append(row)
        elif kind in ("run", "config"):
            config = record.run.config if kind == "run" else record.config
            run["config"].update({u.key: json.loads(u.value_json) for u in config.update})
            if kind == "run":
                run["tags"] = list(record.run.tags)
        elif kind == "files":
            run["files"] += [f.path for f in record.files.files]
    return run


def series(rows: list[dict], key: str) -> list:
    return [row[key] for row in rows if key in row]


def test_offline_run_holds_every_series_for_every_step(tmp_path, monkeypatch):
    # WandbLogger(offline=True) sets WANDB_MODE for the whole process; the monkeypatch undoes it.
    monkeypatch.setenv("WANDB_MODE", "offline")
    steps = 20  # enough records to cross the .wandb file's 32 KiB blocks
    loggers = [WandbLogger(offline=True, save_dir=tmp_path, project="tests"), CSVLogger(tmp_path)]
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=loggers,
        log_every_n_steps=1,
        callbacks=[GradNormMonitor(group_by="tensor")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    learner = MetaLearner(MLP(hidden=8), HFMAML(0.01, 2, track_loss_before=True))
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2, shots=5, query_shots=5))
    wandb.finish()

    run = read_run(tmp_path / "wandb")
    assert run["size"] > 32768
    rows = run["history"]
    assert series(rows, "trainer/global_step") == list(range(steps))
    keys = [
        "train/loss",
        "train/grad_norm",
        "grad_norm/meta",
        "grad_norm/meta/model.0.weight",
        "grad_norm/inner_step_1",
        "loss/support_step_0",
        "loss/query_before",
        "loss/query_after",
        "hfmaml/delta_step_1",
        "hfmaml/hvp_norm_step_0",
    ]
    csv = load_run(tmp_path / "lightning_logs" / "version_0").series
    for key in keys:
        values = series(rows, key)
        assert len(values) == steps, key
        # The same numbers reached both loggers.
        assert values == pytest.approx(csv[key][1], rel=1e-6), key
    assert series(rows, "grad_norm/meta") == pytest.approx(series(rows, "train/grad_norm"))
    algorithm = run["config"]["algorithm"]
    assert algorithm["class_path"].endswith("HFMAML")
    assert algorithm["init_args"]["inner_steps"] == 2

    # A run still being written ends at its last whole record; a damaged one says so.
    (path,) = (tmp_path / "wandb").rglob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: len(data) - 100])
    assert 0 < len(list(wandb_records(cut))) < len(list(wandb_records(path)))
    damaged = tmp_path / "damaged.wandb"
    damaged.write_bytes(data[:500] + bytes([data[500] ^ 1]) + data[501:])
    with pytest.raises(ValueError, match="checksum"):
        list(wandb_records(damaged))

    # The plot tool reads the same files.
    png = tmp_path / "wandb.png"
    assert plot([str(tmp_path / "wandb" / "latest-run"), "-o", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # pytest's own argv
def test_cli_run_config_and_tags_carry_the_variant(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE")  # conftest's offline; the CLI must choose it itself
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    # Absolute: W&B's service process, started by an earlier test in another directory, would
    # write the run's .wandb file under its own working directory.
    save_dir = f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"
    # Lightning's logger reaches the root logger (caplog) only if the root logger had handlers
    # when Lightning was first imported; otherwise it writes to the stderr of that moment.
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    with caplog.at_level(logging.INFO):
        assert main(["fit", "--config", RECIPE, *TINY, save_dir]) is None
    assert "no W&B API key found" in caplog.text
    assert f"wandb sync {tmp_path / 'runs' / 'wandb' / 'offline-run-'}" in caplog.text

    run = read_run(tmp_path / "runs" / "wandb")
    config = run["config"]
    assert config["variant"] == "HFMAML"
    assert config["algorithm"]["class_path"] == "lightning_maml.HFMAML"
    assert config["algorithm"]["init_args"]["delta_scale"] == 0.01
    assert config["trainer"]["max_steps"] == 3
    assert config["meta_batch_size"] == 2
    assert run["tags"] == ["sinusoid", "hfmaml"]
    assert "config.yaml" in run["files"]
    for key in ["grad_norm/meta", "grad_norm/meta/model.0", "hfmaml/delta_step_0", "train/loss"]:
        assert len(series(run["history"], key)) == 3, key


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_wandb_env(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_offline_without_a_key(clean_wandb_env):
    assert default_wandb_offline()
    assert os.environ["WANDB_MODE"] == "offline"


def test_offline_with_a_key_but_no_server(clean_wandb_env):
    clean_wandb_env.setenv("WANDB_API_KEY", "x" * 40)
    clean_wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    assert default_wandb_offline()
    assert os.environ["WANDB_MODE"] == "offline"


def test_online_with_a_netrc_key_and_a_server(clean_wandb_env, tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        clean_wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        netrc = tmp_path / ".netrc"
        netrc.write_text(f"machine 127.0.0.1\n  login user\n  password {'x' * 40}\n")
        netrc.chmod(0o600)
        assert not default_wandb_offline()
    assert "WANDB_MODE" not in os.environ


def test_a_chosen_mode_is_kept(clean_wandb_env):
    clean_wandb_env.setenv("WANDB_MODE", "disabled")
    assert not default_wandb_offline()
    assert os.environ["WANDB_MODE"] == "disabled"


@pytest.mark.slow
def test_console_command_with_no_key_no_mode_and_no_terminal_finishes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true", LIGHTNING_DISABLE_TIPS="1")
    done = subprocess.run(
        [sys.executable, "-m", "lightning_maml.cli", "fit", "--config", RECIPE, *TINY],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no W&B API key found" in done.stderr
    assert "wandb sync runs/wandb/offline-run-" in done.stderr
    run = read_run(tmp_path / "runs" / "wandb")
    assert len(series(run["history"], "grad_norm/meta")) == 3
