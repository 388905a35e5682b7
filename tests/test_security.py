"""Files from elsewhere never run code: checkpoints and data pickles that would are refused.

Each case reads a file whose pickle calls ``os.system`` to create a marker file, the way an
attacker's file would run its payload, through the path a user takes (the CLI's ``fit``,
``validate``, ``test`` and ``estimate``, Python, a checkpoint served over HTTP by a real server
on 127.0.0.1, the mini-ImageNet and CIFAR-100 pickles), and checks that the marker was never
created and that the message names the file.
"""

from __future__ import annotations

import functools
import os
import pickle
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.datamodules.test_image_datamodules as image_data
from lightning_maml import MetaLearner
from lightning_maml.checkpoint_io import check_checkpoint_file, fetch_checkpoint, read_checkpoint
from lightning_maml.checks import check_checkpoint_file as check_from_checks
from lightning_maml.cli import main
from lightning_maml.datamodules.cifar import read_cifar100
from lightning_maml.datamodules.miniimagenet import read_mini_imagenet
from lightning_maml.datamodules.safe_pickle import load_data_pickle

SINUSOID = str(Path(__file__).resolve().parents[1] / "recipes" / "sinusoid" / "maml.yaml")
CSV = [
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    # Small, so that a check that let a file through fails the test quickly.
    "--data.init_args.num_val_tasks=4",
    "--data.init_args.num_test_tasks=4",
]


class Payload:
    """Unpickled, it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A real sinusoid checkpoint (5 steps)."""
    root = tmp_path_factory.mktemp("good")
    args = ["fit", "--config", SINUSOID, *CSV, f"--trainer.logger.init_args.save_dir={root}"]
    assert main([*args, "--trainer.max_steps=5", "--trainer.val_check_interval=5"]) is None
    (last,) = root.rglob("last.ckpt")
    return last


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the payload ran"


@pytest.fixture
def evil_checkpoint(good_checkpoint, tmp_path, marker) -> Path:
    """The real checkpoint with a payload among its hyper-parameters: all else checks out."""
    checkpoint = torch.load(good_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    return path


def test_the_payload_runs_when_unpickled_without_restriction(evil_checkpoint, marker):
    # The fixture is a real attack: a plain torch.load runs it (the marker is then removed,
    # so that the fixture's own check, that nothing else ran it, holds).
    torch.load(evil_checkpoint, weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_python_check_refuses_a_checkpoint_that_runs_code(evil_checkpoint, marker):
    refusal = rf"refused to load checkpoint {evil_checkpoint}: it would call posix.system"
    for check in (check_checkpoint_file, check_from_checks):
        with pytest.raises(ValueError, match=refusal):
            check(evil_checkpoint)


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_cli_refuses_a_checkpoint_that_runs_code(
    command, evil_checkpoint, marker, tmp_path, capsys
):
    args = [command, "--config", SINUSOID, *CSV, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main([*args, "--trainer.max_steps=6", f"--ckpt_path={evil_checkpoint}"]) == 1
    line = last_line(capsys)
    assert f"refused to load checkpoint {evil_checkpoint}: it would call posix.system" in line
    assert not list(tmp_path.rglob("metrics.csv")), "nothing ran"


def test_estimate_refuses_a_checkpoint_that_runs_code(evil_checkpoint, marker, tmp_path, capsys):
    output = tmp_path / "estimate.json"
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "estimate",
                "--config",
                SINUSOID,
                f"--ckpt_path={evil_checkpoint}",
                "--output",
                str(output),
            ]
        )
    assert exit_.value.code == 2
    assert f"refused to load checkpoint {evil_checkpoint}" in last_line(capsys)
    assert not output.exists()


class Server:
    """A real HTTP server on 127.0.0.1 serving a folder, counting the requests per file."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    running = Server(served)
    yield running, served
    running.close()


@pytest.mark.parametrize("command", ["fit", "test"])
def test_cli_refuses_a_remote_checkpoint_that_runs_code(
    command, evil_checkpoint, marker, server, tmp_path, capsys
):
    running, served = server
    (served / "evil.ckpt").write_bytes(evil_checkpoint.read_bytes())
    url = running.url("evil.ckpt")
    args = [command, "--config", SINUSOID, *CSV, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main([*args, "--trainer.max_steps=6", f"--ckpt_path={url}"]) == 1
    assert f"refused to load checkpoint {url}: it would call posix.system" in last_line(capsys)
    assert running.requests == ["/evil.ckpt"]


def test_cli_tests_a_remote_checkpoint_from_its_checked_copy(
    good_checkpoint, server, tmp_path, capsys
):
    running, served = server
    (served / "good.ckpt").write_bytes(good_checkpoint.read_bytes())
    args = ["test", "--config", SINUSOID, *CSV, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    capsys.readouterr()
    assert main([*args, f"--ckpt_path={running.url('good.ckpt')}"]) is None
    assert "test loss:" in capsys.readouterr().out
    # Fetched once, by the check: Lightning loaded the checked copy, not the URL again.
    assert running.requests == ["/good.ckpt"]


def test_a_missing_remote_checkpoint_is_named(server, tmp_path):
    running, _ = server
    url = running.url("nowhere.ckpt")
    with pytest.raises(FileNotFoundError, match=rf"ckpt_path {url}: could not fetch it"):
        check_checkpoint_file(url)


def test_python_checks_a_remote_checkpoint_and_its_copy_loads(good_checkpoint, server):
    running, served = server
    (served / "good.ckpt").write_bytes(good_checkpoint.read_bytes())
    url = running.url("good.ckpt")
    check_checkpoint_file(url)
    local = fetch_checkpoint(url)
    assert read_checkpoint(local, name=url)["global_step"] == 5


def test_load_from_checkpoint_of_a_remote_file_runs_no_code(evil_checkpoint, marker, server):
    # Lightning would unpickle an http(s) checkpoint with weights_only=False.
    running, served = server
    (served / "evil.ckpt").write_bytes(evil_checkpoint.read_bytes())
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system"):
        MetaLearner.load_from_checkpoint(running.url("evil.ckpt"))


def test_real_checkpoints_load_with_weights_only(good_checkpoint):
    # (tests/recipes/test_recipes.py tests every recipe's checkpoint through the same check.)
    assert read_checkpoint(good_checkpoint)["global_step"] == 5
    learner = MetaLearner.load_from_checkpoint(good_checkpoint)
    assert learner.model[0].weight.shape == (40, 1)


# -- data pickles ---------------------------------------------------------------------------


def test_mini_imagenet_pickle_that_runs_code_is_refused(tmp_path, marker):
    image_data.mini_pickles(tmp_path)
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    data = pickle.loads(path.read_bytes())
    data["class_dict"]["n0"] = Payload(marker)
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=rf"refused to unpickle {path}: it calls posix.system"):
        read_mini_imagenet(tmp_path, "train")


def test_cifar_pickle_that_runs_code_is_refused(tmp_path, marker):
    folder = tmp_path / "cifar-100-python"
    image_data.write_cifar(folder)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": Payload(marker)}))
    with pytest.raises(ValueError, match=rf"refused to unpickle {folder / 'meta'}: it calls"):
        read_cifar100(tmp_path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_data_pickles_of_arrays_load_at_every_protocol(tmp_path, protocol):
    data = {
        "image_data": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
        "class_dict": {"n01": [0, np.int64(1)], "n02": (1,), "set": {1, 2}},
        b"labels": np.array([0.5, -1.0]),
    }
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_data_pickle(path, "fix")
    assert np.array_equal(loaded["image_data"], data["image_data"])
    assert loaded["class_dict"] == data["class_dict"]
    assert np.array_equal(loaded[b"labels"], data[b"labels"])
