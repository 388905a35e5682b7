"""Downloads against a real HTTP server on 127.0.0.1: the happy paths and every failure.

The server serves small archives generated here in the official layouts (Omniglot's zips,
CIFAR-100's python tarball) and a 1 MB blob for the interruption and full-disk cases; their MD5s
reach :func:`lightning_maml.datamodules.download.download` through its ``datasets`` argument, the registry that
the shipped data sets' pinned hashes live in by default.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import pickle
import pty
import re
import signal
import struct
import subprocess
import sys
import tarfile
import termios
import threading
import time
import traceback
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_maml import MAML
from lightning_maml.datamodules.cifar import (
    CIFARFS_CLASSES,
    FC100_SUPERCLASSES,
    CIFARFSDataModule,
    FC100DataModule,
    read_cifar100,
)
from lightning_maml.datamodules.download import (
    DATASETS,
    LOCK_FILE,
    MIRROR_ENV,
    DataSet,
    DownloadError,
    Source,
    download,
    main,
)
from lightning_maml.datamodules.miniimagenet import MiniImageNetDataModule
from lightning_maml.datamodules.omniglot import OmniglotDataModule, read_omniglot
from lightning_maml.learner import MetaLearner
from lightning_maml.models import ConvNet

REPO = Path(__file__).resolve().parents[2]
HTML = b"<!DOCTYPE html>\n<html><body>Quota exceeded: too many users have viewed this file.</body></html>\n"
BLOB = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def png(ink: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(~ink).save(buffer, format="PNG")  # a 1-bit image, white background
    return buffer.getvalue()


def omniglot_zips() -> dict[str, bytes]:
    """The two official zips, each 2 alphabets x 2 characters x 4 drawers of 105x105 PNGs."""
    rng = np.random.default_rng(0)
    zips, number = {}, 0
    for part, alphabets in (
        ("images_background", ("Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc")),
        ("images_evaluation", ("Angelic", "Atemayar_Qelisayer")),
    ):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for alphabet in alphabets:
                for character in (1, 2):
                    number += 1
                    for drawer in range(1, 5):
                        name = f"{part}/{alphabet}/character{character:02d}/{number:04d}_{drawer:02d}.png"
                        archive.writestr(name, png(rng.random((105, 105)) < 0.1))
        zips[f"{part}.zip"] = buffer.getvalue()
    return zips


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def cifar_members() -> dict[str, bytes]:
    """cifar-100-python/{train,test,meta}: the real pickles' keys, 2 + 1 images per class."""
    fine_names = sorted(name for names in CIFARFS_CLASSES.values() for name in names)
    coarse_names = sorted(name for names in FC100_SUPERCLASSES.values() for name in names)
    members = {}
    for part, per_class in (("train", 2), ("test", 1)):
        fine = np.repeat(np.arange(100), per_class)
        members[f"cifar-100-python/{part}"] = pickle.dumps(
            {
                b"data": np.repeat(fine[:, None], 3072, axis=1).astype(np.uint8),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine % 20).tolist(),
            }
        )
    members["cifar-100-python/meta"] = pickle.dumps(
        {
            b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [n.encode() for n in coarse_names],
        }
    )
    return members


ZIPS = omniglot_zips()
MEMBERS = cifar_members()
TARBALL = tar_gz(MEMBERS)


class Server:
    """HTTP/1.0 on 127.0.0.1 in a thread, with HTTP range requests.

    ``files`` maps paths to bodies. Each request to a path takes the next fault of
    ``faults[path]`` (none left: serve the file): ``404``, ``500``, ``"html"`` (a quota page
    instead of the file), ``"empty"`` (an empty 200), ``"drop"`` (close the connection half-way),
    ``"stall"`` (send half, then wait for ``release``), ``"norange"`` (ignore a Range header).
    ``requests`` records every request's path and Range header, ``authorizations`` its
    Authorization header.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[int | str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.authorizations: list[str | None] = []
        self.delay = 0.0
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the requests for ``path``, in order."""
        return [rng for p, rng in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server: Server = self.server.owner
        server.requests.append((self.path, self.headers.get("Range")))
        server.authorizations.append(self.headers.get("Authorization"))
        queue = server.faults.get(self.path, [])
        fault = queue.pop(0) if queue else None
        body = server.files.get(self.path)
        time.sleep(server.delay)
        if body is None or fault in (404, 500):
            self.send_error(fault or 404)
            return
        body = {"html": HTML, "empty": b""}.get(fault, body)
        start = 0
        if self.headers.get("Range") and fault != "norange":
            start = int(self.headers["Range"].removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "text/html" if fault == "html" else "application/zip")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if fault in ("drop", "stall"):
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            if fault == "stall":
                server.release.wait(30)
            return  # HTTP/1.0: the connection closes, short of Content-Length
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    server = Server()
    for name, data in ZIPS.items():
        server.files[f"/omniglot/{name}"] = data
        server.files[f"/official/{name}"] = data
        server.files[f"/other/omniglot/{name}"] = data
    server.files["/cifar100/cifar-100-python.tar.gz"] = TARBALL
    server.files["/blob/blob.bin"] = BLOB
    yield server
    server.release.set()
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def registry(server: Server) -> dict[str, DataSet]:
    """The shipped data sets with the generated files' hashes and official URLs on ``server``."""
    return {
        "omniglot": DataSet(
            "Omniglot",
            "",
            tuple(
                Source(name, f"{server.url}/official/{name}", md5(data))
                for name, data in ZIPS.items()
            ),
        ),
        "cifar100": dataclasses.replace(
            DATASETS["cifar100"],
            sources=(Source("cifar-100-python.tar.gz", "unused", md5(TARBALL)),),
            members=tuple((name.split("/")[1], md5(data)) for name, data in MEMBERS.items()),
        ),
        "blob": DataSet("blob", "", (Source("blob.bin", "unused", md5(BLOB)),)),
    }


def files(root: Path) -> set[str]:
    """The names under ``root`` that a reader could pick up (not the lock file)."""
    return {p.name for p in root.iterdir()} - {LOCK_FILE} if root.exists() else set()


def test_omniglot_from_a_mirror_in_the_official_layout(server, tmp_path):
    download("omniglot", tmp_path, server.url, datasets=registry(server))
    assert files(tmp_path) == set(ZIPS)
    for name, data in ZIPS.items():
        assert (tmp_path / name).read_bytes() == data
        assert server.gets(f"/omniglot/{name}") == [None]
    data = read_omniglot(tmp_path)
    assert data.images.shape == (8 * 4, 1, 28, 28)
    assert data.background.tolist() == [True] * 4 + [False] * 4


def test_official_urls_the_environment_mirror_and_the_argument(server, tmp_path, monkeypatch):
    datasets = registry(server)
    download("omniglot", tmp_path / "a", datasets=datasets)
    assert len(server.gets("/official/images_background.zip")) == 1
    monkeypatch.setenv(MIRROR_ENV, server.url + "/")
    download("omniglot", tmp_path / "b", datasets=datasets)
    assert len(server.gets("/omniglot/images_background.zip")) == 1
    # The argument wins over the environment.
    download("omniglot", tmp_path / "c", f"{server.url}/other", datasets=datasets)
    assert len(server.gets("/other/omniglot/images_background.zip")) == 1
    monkeypatch.setenv(MIRROR_ENV, "/srv/mirror")
    with pytest.raises(DownloadError, match=r"mirror must be an http:// or https:// URL"):
        download("omniglot", tmp_path / "d", datasets=datasets)


def test_a_verified_file_is_not_fetched_again(server, tmp_path):
    datasets = registry(server)
    download("omniglot", tmp_path, server.url, datasets=datasets)
    download("omniglot", tmp_path, server.url, datasets=datasets)
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("fault", "body", "what"),
    [
        ("html", HTML, rf"an HTML page of {len(HTML)} bytes, not the file"),
        ("empty", b"", "an empty body"),
    ],
)
def test_a_wrong_body_is_a_hash_mismatch_that_leaves_nothing(server, tmp_path, fault, body, what):
    server.faults["/omniglot/images_evaluation.zip"] = [fault]
    url = f"{server.url}/omniglot/images_evaluation.zip"
    with pytest.raises(DownloadError) as error:
        download("omniglot", tmp_path, server.url, datasets=registry(server))
    message = str(error.value)
    assert message.startswith(f"hash mismatch for {url}: ")
    assert f"expected MD5 {md5(ZIPS['images_evaluation.zip'])}, got {md5(body)}" in message
    assert what in message and "mirror" in message
    # The first zip, verified, stays; nothing of the second is left, not even a part.
    assert files(tmp_path) == {"images_background.zip"}


def test_another_file_is_a_hash_mismatch(server, tmp_path):
    server.files["/omniglot/images_background.zip"] = ZIPS["images_evaluation.zip"]
    with pytest.raises(DownloadError, match=rf"got {md5(ZIPS['images_evaluation.zip'])} \("):
        download("omniglot", tmp_path, server.url, datasets=registry(server))
    assert files(tmp_path) == set()


@pytest.mark.parametrize(
    ("status", "advice"),
    [
        (404, r"Not Found; nothing was saved\. Check the URL"),
        (500, r"Internal Server Error; nothing was saved\. The server failed: try again later"),
    ],
)
def test_http_errors(server, tmp_path, status, advice):
    server.faults["/omniglot/images_background.zip"] = [status]
    with pytest.raises(
        DownloadError, match=rf"/omniglot/images_background\.zip answered HTTP {status} {advice}"
    ):
        download("omniglot", tmp_path, server.url, datasets=registry(server))
    assert files(tmp_path) == set()


def test_an_unreachable_server(tmp_path, server):
    closed = Server()
    closed.httpd.shutdown()
    closed.httpd.server_close()
    with pytest.raises(
        DownloadError,
        match=r"cannot reach http://127\.0\.0\.1:\d+/omniglot/images_background\.zip \(Connection refused\)",
    ):
        download("omniglot", tmp_path, closed.url, datasets=registry(server))
    assert files(tmp_path) == set()


def test_a_dropped_connection_keeps_the_part_and_the_next_run_resumes(server, tmp_path):
    datasets = registry(server)
    server.faults["/blob/blob.bin"] = ["drop"]
    half = len(BLOB) // 2
    with pytest.raises(
        DownloadError,
        match=rf"dropped \(closed before the end of the file\); {half:,} of {len(BLOB):,} bytes "
        r"are kept in .*blob\.bin\.part: run again to resume",
    ):
        download("blob", tmp_path, server.url, datasets=datasets)
    assert files(tmp_path) == {"blob.bin.part"}
    download("blob", tmp_path, server.url, datasets=datasets)
    assert server.gets("/blob/blob.bin") == [None, f"bytes={half}-"]
    assert files(tmp_path) == {"blob.bin"} and (tmp_path / "blob.bin").read_bytes() == BLOB


def test_a_stalled_server_times_out_and_the_next_run_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setattr("lightning_maml.datamodules.download.TIMEOUT", 0.5)
    server.faults["/blob/blob.bin"] = ["stall"]
    half = len(BLOB) // 2
    with pytest.raises(DownloadError, match=rf"dropped \(no answer for 0\.5 s\); {half:,} of"):
        download("blob", tmp_path, server.url, datasets=registry(server))
    server.release.set()
    download("blob", tmp_path, server.url, datasets=registry(server))
    assert server.gets("/blob/blob.bin") == [None, f"bytes={half}-"]
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_a_server_without_ranges_restarts_the_download(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:1000])
    server.faults["/blob/blob.bin"] = ["norange"]
    download("blob", tmp_path, server.url, datasets=registry(server))
    assert server.gets("/blob/blob.bin") == ["bytes=1000-"]
    assert files(tmp_path) == {"blob.bin"} and (tmp_path / "blob.bin").read_bytes() == BLOB


@pytest.mark.parametrize("kept", [1000, len(BLOB) + 10], ids=["prefix", "longer"])
def test_a_part_of_another_file_is_discarded(server, tmp_path, kept):
    """Bytes kept from another file fail the check after the resume (or get a 416): restart."""
    (tmp_path / "blob.bin.part").write_bytes(b"x" * kept)
    download("blob", tmp_path, server.url, datasets=registry(server))
    assert server.gets("/blob/blob.bin") == [f"bytes={kept}-", None]
    assert files(tmp_path) == {"blob.bin"} and (tmp_path / "blob.bin").read_bytes() == BLOB


def test_a_file_that_was_not_downloaded_here_is_left_alone(server, tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"mine")
    with pytest.raises(
        DownloadError,
        match=rf"is not the expected file \(MD5 {md5(b'mine')}, expected .*move it away",
    ):
        download("omniglot", tmp_path, server.url, datasets=registry(server))
    assert (tmp_path / "images_background.zip").read_bytes() == b"mine"
    assert server.requests == []


def test_cifar100_is_unpacked_whole(server, tmp_path):
    (tmp_path / ".cifar-100-python.partial" / "cifar-100-python").mkdir(parents=True)
    (tmp_path / ".cifar-100-python.partial" / "cifar-100-python" / "train").write_bytes(b"cut")
    datasets = registry(server)
    download("fc100", tmp_path, server.url, datasets=datasets)
    assert files(tmp_path) == {"cifar-100-python.tar.gz", "cifar-100-python"}
    assert read_cifar100(tmp_path).images.shape == (300, 3, 32, 32)
    download("cifarfs", tmp_path, server.url, datasets=datasets)
    assert len(server.requests) == 1


def test_a_tarball_without_its_folder_leaves_nothing(server, tmp_path):
    other = tar_gz({"cifar-10-batches-py/data_batch_1": b"x"})
    server.files["/cifar100/cifar-100-python.tar.gz"] = other
    datasets = registry(server)
    source = dataclasses.replace(datasets["cifar100"].sources[0], md5=md5(other))
    datasets["cifar100"] = dataclasses.replace(datasets["cifar100"], sources=(source,))
    with pytest.raises(DownloadError, match=r"holds no cifar-100-python/ folder"):
        download("cifar100", tmp_path, server.url, datasets=datasets)
    assert files(tmp_path) == {"cifar-100-python.tar.gz"}


def test_cifar100_into_an_empty_folder(server, tmp_path, capsys):
    """An empty cifar-100-python/ is not "already here": it is removed and the data fetched."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"download cifar100 --root"):
        CIFARFSDataModule(tmp_path)
    download("cifar100", tmp_path, server.url, datasets=registry(server))
    err = capsys.readouterr().err
    assert f"{folder} was empty: removed." in err and "already here" not in err
    assert len(server.requests) == 1 and read_cifar100(tmp_path).images.shape == (300, 3, 32, 32)
    CIFARFSDataModule(tmp_path)  # finds the data
    download("cifar100", tmp_path, server.url, datasets=registry(server))
    assert f"{folder} is already here, MD5 verified." in capsys.readouterr().err
    assert len(server.requests) == 1


def test_cifar100_into_a_partial_folder_names_what_it_lacks(server, tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "meta").write_bytes(MEMBERS["cifar-100-python/meta"])
    (folder / "train").write_bytes(b"cut")
    with pytest.raises(
        DownloadError,
        match=rf"{re.escape(str(folder))} does not hold the official files \(train: MD5 "
        rf"{md5(b'cut')}; test: missing\) and was not unpacked here: move it away and run again",
    ):
        download("cifar100", tmp_path, server.url, datasets=registry(server))
    assert server.requests == [] and {p.name for p in folder.iterdir()} == {"meta", "train"}


@pytest.mark.parametrize(
    ("name", "link", "victim"),
    [
        ("blob", "blob.bin.part", "file"),
        ("blob", "blob.bin.part", "absent"),
        ("blob", "blob.bin", "file"),
        ("blob", LOCK_FILE, "file"),
        ("cifar100", "cifar-100-python", "folder"),
        ("cifar100", ".cifar-100-python.partial", "folder"),
    ],
)
def test_a_link_at_a_name_the_download_writes_is_refused(server, tmp_path, name, link, victim):
    root, target = tmp_path / "root", tmp_path / "victim"
    root.mkdir()
    if victim == "file":
        target.write_bytes(b"precious")
    elif victim == "folder":
        target.mkdir()
    (root / link).symlink_to(target)
    with pytest.raises(
        DownloadError,
        match=rf"{re.escape(str(root / link))} is a symbolic link \(to {re.escape(str(target))}\)"
        r", and a download writes only what it creates: remove the link and run again",
    ):
        download(name, root, server.url, datasets=registry(server))
    assert (root / link).is_symlink()
    if victim == "file":
        assert target.read_bytes() == b"precious"
    elif victim == "folder":
        assert list(target.iterdir()) == []
    else:
        assert not target.exists()
    # The temporary folder is checked when the verified tarball is there to unpack.
    assert len(server.requests) == (link == ".cifar-100-python.partial")


@pytest.mark.parametrize(
    ("member", "kind", "linkname"),
    [
        ("cifar-100-python/../../../escaped", tarfile.REGTYPE, ""),
        ("{tmp}/escaped", tarfile.REGTYPE, ""),
        ("cifar-100-python/link", tarfile.SYMTYPE, "../../../escaped"),
        ("cifar-100-python/hard", tarfile.LNKTYPE, "../../../escaped"),
        ("cifar-100-python/fifo", tarfile.FIFOTYPE, ""),
    ],
    ids=["dot-dot", "absolute", "symlink", "hard-link", "fifo"],
)
def test_an_archive_member_out_of_the_root_or_not_a_file_is_refused(
    server, tmp_path, member, kind, linkname
):
    member = member.format(tmp=tmp_path)
    info = tarfile.TarInfo(member)
    info.type, info.linkname = kind, linkname
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in MEMBERS.items():
            regular = tarfile.TarInfo(name)
            regular.size = len(data)
            archive.addfile(regular, io.BytesIO(data))
        data = b"escaped" if kind == tarfile.REGTYPE else b""
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    tarball = buffer.getvalue()
    server.files["/cifar100/cifar-100-python.tar.gz"] = tarball
    datasets = registry(server)
    source = dataclasses.replace(datasets["cifar100"].sources[0], md5=md5(tarball))
    datasets["cifar100"] = dataclasses.replace(datasets["cifar100"], sources=(source,))
    root = tmp_path / "data" / "cifar100"
    with pytest.raises(
        DownloadError,
        match=rf"holds {re.escape(repr(member))}, not a file or folder at a relative path without "
        r"'\.\.', as the official file's are: nothing was unpacked\. Delete it and run again",
    ):
        download("cifar100", root, server.url, datasets=datasets)
    # The verified tarball stays; nothing was unpacked, in the root or out of it.
    tarball = root / "cifar-100-python.tar.gz"
    assert set(tmp_path.rglob("*")) == {root.parent, root, root / LOCK_FILE, tarball}


def test_a_mirror_password_is_sent_but_never_shown(server, tmp_path, monkeypatch):
    secret = "s3cret-Pa55word"
    host = server.url.removeprefix("http://")
    mirror, shown = f"http://user:{secret}@{host}", f"http://***@{host}"
    closed = Server()
    closed.httpd.shutdown()
    closed.httpd.server_close()
    dead = closed.url.replace("http://", f"http://user:{secret}@")
    datasets = registry(server)
    cases = [  # (fault of the first request, data set, mirror, what the message says)
        (404, "omniglot", mirror, f"{shown}/omniglot/images_background.zip answered HTTP 404"),
        ("html", "omniglot", mirror, f"hash mismatch for {shown}/omniglot/images_background.zip"),
        ("drop", "blob", mirror, f"the connection to {shown}/blob/blob.bin dropped"),
        (None, "omniglot", dead, f"cannot reach {dead.replace(f'user:{secret}', '***')}/"),
        (None, "omniglot", f"ftp://user:{secret}@{host}", f"got 'ftp://***@{host}'"),
    ]
    for fault, name, url, says in cases:
        if fault is not None:
            server.faults[f"/{name}/{datasets[name].sources[0].file}"] = [fault]
        with pytest.raises(DownloadError) as error:
            download(name, tmp_path / "failed", url, datasets=datasets)
        assert says in str(error.value)
        assert secret not in "".join(traceback.format_exception(error.value))
    # Sent: the server got the user and password. Shown nowhere: not on the stderr of a process
    # of its own (where pooch's log would go), nor on a terminal's progress bar.
    process = start("blob", tmp_path / "ok", registry(server), mirror)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    credentials = base64.b64encode(f"user:{secret}".encode()).decode()
    assert server.authorizations[-1] == f"Basic {credentials}"
    assert secret not in err and f"blob.bin: downloading {shown}/blob/blob.bin" in err
    terminal = on_a_terminal(
        monkeypatch, lambda: download("blob", tmp_path / "tty", mirror, datasets=datasets)
    )
    assert b"blob.bin: 100%" in terminal and secret.encode() not in terminal


def test_miniimagenet_says_how_to_get_it(tmp_path):
    with pytest.raises(
        DownloadError, match=r"no official redistributable file.*learn2learn.*meta-learning-lstm"
    ):
        download("miniimagenet", tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"looked for .*no official redistributable file.*learn2learn"
    ):
        MiniImageNetDataModule(tmp_path)
    dm = MiniImageNetDataModule(tmp_path / "absent", download=True)
    with pytest.raises(DownloadError, match=r"Put one of two layouts in .*absent"):
        dm.prepare_data()


def test_missing_data_says_how_to_download_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"download omniglot --root {tmp_path}, or")
    ):
        OmniglotDataModule(tmp_path)
    for datamodule in (CIFARFSDataModule, FC100DataModule):
        with pytest.raises(
            FileNotFoundError, match=r"download cifar100 --root .*data\.init_args\.download: true"
        ):
            datamodule(tmp_path)


def test_progress_bar_is_quiet_when_not_a_terminal(server, tmp_path, capsys):
    download("blob", tmp_path, server.url, datasets=registry(server))
    err = capsys.readouterr().err
    assert "blob.bin: downloading" in err and "blob.bin: MD5 verified." in err
    assert "\r" not in err and "B/s" not in err


def on_a_terminal(monkeypatch, run) -> bytes:
    """What ``run()`` shows on a terminal of 24 rows and 100 columns (tqdm sizes its bar to it)."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with open(secondary, "w") as terminal, monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", terminal)
        run()
    shown = b""
    os.set_blocking(primary, False)
    while True:
        try:
            chunk = os.read(primary, 1 << 16)
        except OSError:  # EAGAIN or EIO: all that the terminal showed has been read
            break
        shown += chunk
    os.close(primary)
    return shown


def test_progress_bar_on_a_terminal(server, tmp_path, monkeypatch):
    shown = on_a_terminal(
        monkeypatch, lambda: download("blob", tmp_path, server.url, datasets=registry(server))
    )
    assert b"blob.bin: 100%" in shown and b"1.00M/1.00M" in shown and b"B/s" in shown


# Runs download() in a process of its own: argv[1] is the path of datamodules/download.py, argv[2]
# JSON [name, root, datasets, fsize_limit, barrier files (mine, the other's) or null]. The module
# is loaded from its file, not through the datamodules package, which would import torch: seconds
# per process. It imports nothing of the project.
PROCESS = """
import importlib.util, json, resource, signal, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("download", sys.argv[1])
module = sys.modules["download"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
DataSet, DownloadError, Source, download = (
    module.DataSet, module.DownloadError, module.Source, module.download
)
name, root, datasets, limit, barrier = json.loads(sys.argv[2])
datasets = {
    key: DataSet(
        d["title"], d["size"], tuple(Source(**s) for s in d["sources"]), d["unpack"],
        tuple(map(tuple, d["members"])),
    )
    for key, d in datasets.items()
}
if barrier:
    Path(barrier[0]).touch()
    while not Path(barrier[1]).exists():
        time.sleep(0.01)
if limit:
    # Writes past the limit then fail with EFBIG, as on a full disk, instead of killing us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    download(name, root, datasets=datasets)
except DownloadError as err:
    sys.exit(f"DownloadError: {err}")
"""


def start(name, root, datasets, url, limit=None, barrier=None) -> subprocess.Popen:
    """download() in a new process of this checkout, with official URLs on ``url``."""
    for key, dataset in list(datasets.items()):
        sources = tuple(
            dataclasses.replace(s, url=f"{url}/{key}/{s.file}") for s in dataset.sources
        )
        datasets[key] = dataclasses.replace(dataset, sources=sources)
    plain = {key: dataclasses.asdict(d) for key, d in datasets.items()}
    argument = json.dumps([name, str(root), plain, limit, barrier])
    return subprocess.Popen(
        [sys.executable, "-c", PROCESS, str(REPO / "datamodules" / "download.py"), argument],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("stage", ["download", "unpack"])
def test_a_full_disk_is_a_clear_error_and_leaves_nothing(server, tmp_path, stage):
    name, limit = ("blob", 256 * 1024) if stage == "download" else ("cifar100", len(TARBALL) + 1)
    process = start(name, tmp_path, registry(server), server.url, limit=limit)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    if stage == "download":
        assert "DownloadError: cannot write" in err and "blob.bin.part (File too large)" in err
        assert "free space on that disk or choose another root" in err
        assert files(tmp_path) == {"blob.bin.part"}
        assert (tmp_path / "blob.bin.part").stat().st_size <= limit
    else:
        # The verified tarball stays; no half-unpacked folder does.
        assert "DownloadError: cannot unpack" in err and "(File too large)" in err
        assert files(tmp_path) == {"cifar-100-python.tar.gz"}
        download("cifar100", tmp_path, server.url, datasets=registry(server))
        assert len(server.requests) == 1 and (tmp_path / "cifar-100-python" / "meta").is_file()


def test_a_killed_download_resumes(server, tmp_path):
    server.faults["/blob/blob.bin"] = ["stall"]
    process = start("blob", tmp_path, registry(server), server.url)
    part = tmp_path / "blob.bin.part"
    deadline = time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size == len(BLOB) // 2):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    server.release.set()
    assert files(tmp_path) == {"blob.bin.part"}
    download("blob", tmp_path, server.url, datasets=registry(server))
    assert server.gets("/blob/blob.bin") == [None, f"bytes={len(BLOB) // 2}-"]
    assert files(tmp_path) == {"blob.bin"} and (tmp_path / "blob.bin").read_bytes() == BLOB


def test_two_processes_downloading_into_one_root(server, tmp_path):
    server.delay = 1.0  # the first download holds the lock while the second process asks for it
    ready = [str(tmp_path / "ready-a"), str(tmp_path / "ready-b")]
    root = tmp_path / "data"
    processes = [
        start("omniglot", root, registry(server), server.url, barrier=barrier)
        for barrier in (ready, ready[::-1])
    ]
    errs = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errs
    # One process waited on the lock, then found both zips verified: each was fetched once.
    assert sum("waiting for another download into" in err for err in errs) == 1, errs
    assert sum(err.count("already here, MD5 verified.") for err in errs) == 2, errs
    assert sorted(path for path, _ in server.requests) == [f"/omniglot/{n}" for n in sorted(ZIPS)]
    assert files(root) == set(ZIPS)
    assert all((root / name).read_bytes() == data for name, data in ZIPS.items())


def test_command_help_lists_the_data_sets(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for name, dataset in DATASETS.items():
        assert f"  {name}" in out and dataset.size in out
        assert all(source.url in out for source in dataset.sources)
    assert "cifar100 (or cifarfs, fc100)" in out and "miniimagenet" in out and MIRROR_ENV in out


def test_command_through_lightning_maml(server, tmp_path, capsys, monkeypatch):
    from lightning_maml.cli import main as cli

    monkeypatch.setattr("lightning_maml.datamodules.download.DATASETS", registry(server))
    assert cli(["download", "omniglot", "--root", str(tmp_path), "--mirror", server.url]) == 0
    assert capsys.readouterr().out == f"omniglot is in {tmp_path}\n"
    assert files(tmp_path) == set(ZIPS)
    server.faults["/cifar100/cifar-100-python.tar.gz"] = [500]
    root = tmp_path / "cifar"
    assert cli(["download", "cifarfs", "--root", str(root), "--mirror", server.url]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("lightning-maml download: error: ") and "HTTP 500" in err[-1]
    monkeypatch.chdir(tmp_path)  # the default root is data/<name>, where the recipes look
    assert cli(["download", "fc100", "--mirror", server.url]) == 0
    assert (tmp_path / "data" / "cifar100" / "cifar-100-python" / "train").is_file()


@pytest.mark.slow
def test_command_refuses_an_html_page_with_the_pinned_hashes(server, tmp_path):
    """The shipped command and hashes against a mirror that answers with an HTML page."""
    server.faults = {f"/omniglot/{name}": ["html"] for name in ZIPS}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_maml.cli",
            "download",
            "omniglot",
            "--root",
            str(tmp_path),
        ],
        cwd=REPO,
        env={**os.environ, MIRROR_ENV: server.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    expected = DATASETS["omniglot"].sources[0].md5
    assert last == (
        f"lightning-maml download: error: hash mismatch for {server.url}/omniglot/"
        f"images_background.zip: expected MD5 {expected}, got {md5(HTML)} (an HTML page of "
        f"{len(HTML)} bytes, not the file: an error, login or quota page). It was deleted; "
        "nothing was kept. Try again later, or use a mirror (--mirror URL or "
        f"{MIRROR_ENV}) that serves the official file."
    )
    assert "Traceback" not in result.stderr
    assert files(tmp_path) == set()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_datamodules_download_in_prepare_data_and_train(server, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, server.url)
    monkeypatch.setattr("lightning_maml.datamodules.download.DATASETS", registry(server))
    root = tmp_path / "omniglot"
    dm = OmniglotDataModule(
        root,
        ways=2,
        query_shots=1,
        meta_batch_size=2,
        val_characters=2,
        test_characters=2,
        num_val_tasks=2,
        num_test_tasks=2,
        download=True,
    )
    learner = MetaLearner(
        model=ConvNet(in_channels=1, ways=2, hidden=4, image_size=28),
        algorithm=MAML(inner_lr=0.4),
        loss="cross_entropy",
    )
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, datamodule=dm)
    assert trainer.global_step == 2 and files(root) == set(ZIPS)
    # CIFAR-FS: prepare_data fetches and unpacks, setup reads, a task is drawn.
    cifar = CIFARFSDataModule(tmp_path / "cifar100", query_shots=1, download=True)
    cifar.prepare_data()
    cifar.setup("fit")
    task = cifar.task_sampler("train")(np.random.default_rng(0), "train")
    assert task.support_x.shape == (5, 3, 32, 32) and task.query_y.tolist() == list(range(5))
    assert torch.isfinite(task.support_x).all()
    # Data already there (in any layout): prepare_data fetches nothing.
    count = len(server.requests)
    FC100DataModule(tmp_path / "cifar100", download=True).prepare_data()
    OmniglotDataModule(root, download=True).prepare_data()
    assert len(server.requests) == count
