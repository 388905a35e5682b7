"""Downloads the benchmark data sets from their official sources, verified against pinned hashes.

``lightning-maml download NAME [--root DIR] [--mirror URL]`` on the command line, or
``download=True`` on a datamodule (done in ``prepare_data`` when its root holds no data). Every
file

- is checked against its pinned MD5, the official file's, whatever the URL it came from: a wrong
  body (an HTML error page, an empty or truncated response) is deleted and reported with both
  digests, and nothing is left where the readers look;
- is written to ``<file>.part`` beside its target and renamed only once verified, so that no
  reader ever sees a partial file. After an interruption (a dropped connection, a full disk,
  Ctrl-C, a killed job) the next run resumes from the ``.part`` where the server honours HTTP
  range requests, and starts again where it does not;
- is fetched once: a verified file is not fetched again, and a lock file in the root lets only one
  process at a time download into it (two jobs, or the nodes of a DDP run on a shared file
  system); the others wait, then find the files verified.

CIFAR-100's tarball is unpacked into a temporary folder beside ``cifar-100-python/`` and renamed
to it when complete; the Omniglot zips are read as they are.

Mirrors, for clusters without internet access: ``--mirror URL`` or the environment variable
``LIGHTNING_MAML_DATA_MIRROR`` replace the official URLs by ``<mirror>/<data set>/<file name>``,
e.g. ``<mirror>/omniglot/images_background.zip`` or ``<mirror>/cifar100/cifar-100-python.tar.gz``.

This is requests, tqdm and filelock rather than pooch: pooch streams into a temporary file with a
random name, which a killed download leaves behind for good and which no later run can resume
from, and its downloader does not expose the response status a resume has to check.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3
from filelock import FileLock, Timeout
from tqdm import tqdm

__all__ = [
    "DATASETS",
    "MIRROR_ENV",
    "DataSet",
    "DownloadError",
    "Source",
    "download",
    "main",
    "miniimagenet_howto",
]

MIRROR_ENV = "LIGHTNING_MAML_DATA_MIRROR"
LOCK_FILE = ".lightning-maml-download.lock"
TIMEOUT = 60  # seconds to connect, and without a byte received, before a download is given up
CHUNK = 1 << 16
MIRROR_HINT = f"use a mirror (--mirror URL or {MIRROR_ENV})"


class DownloadError(RuntimeError):
    """A data set could not be downloaded; the message says why and what to do."""


@dataclass(frozen=True)
class Source:
    """One file: its name (in the root and on mirrors), its official URL and its MD5."""

    file: str
    url: str
    md5: str


@dataclass(frozen=True)
class DataSet:
    """A downloadable data set.

    Attributes:
        title: What it is, for messages and ``--help``.
        size: Its download size, for ``--help``.
        sources: Its files.
        unpack: The folder that its one tar archive holds, unpacked into the root; ``None`` for
            files that the readers read as they are.
    """

    title: str
    size: str
    sources: tuple[Source, ...]
    unpack: str | None = None


_OMNIGLOT = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
# The MD5s are those that torchvision's Omniglot and CIFAR100 datasets publish for these files.
DATASETS: dict[str, DataSet] = {
    "omniglot": DataSet(
        "Omniglot (Lake et al. 2015), the two official zips",
        "about 16 MB",
        (
            Source(
                "images_background.zip",
                _OMNIGLOT + "images_background.zip",
                "68d2efa1b9178cc56df9314c21c6e718",
            ),
            Source(
                "images_evaluation.zip",
                _OMNIGLOT + "images_evaluation.zip",
                "6b91aef0f799c5bb55b94e3f2daec811",
            ),
        ),
    ),
    "cifar100": DataSet(
        "CIFAR-100 (for CIFAR-FS and FC100), unpacked into cifar-100-python/",
        "161 MB",
        (
            Source(
                "cifar-100-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
            ),
        ),
        unpack="cifar-100-python",
    ),
}
ALIASES = {"cifarfs": "cifar100", "fc100": "cifar100"}
UNAVAILABLE = ("miniimagenet",)


def miniimagenet_howto(root: str | Path) -> str:
    """How to obtain mini-ImageNet, which has no official file to download, into ``root``."""
    return (
        "mini-ImageNet has no official redistributable file, so it cannot be downloaded here. "
        f"Put one of two layouts in {root}: learn2learn's pickles mini-imagenet-cache-train.pkl, "
        "mini-imagenet-cache-validation.pkl and mini-imagenet-cache-test.pkl (pip install "
        f"learn2learn; then learn2learn.vision.datasets.MiniImagenet('{root}', mode=MODE, "
        "download=True) for MODE in 'train', 'validation', 'test' writes them; they have no "
        "published hash, the reader checks their contents), or Ravi & Larochelle's images/ with "
        "train.csv, val.csv and test.csv (header filename,label), built from ImageNet by the "
        "script of https://github.com/twitter-research/meta-learning-lstm."
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _md5(path: Path) -> str:
    # usedforsecurity=False: MD5 checks integrity here, and FIPS-mode systems refuse it otherwise.
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _reason(err: BaseException) -> str:
    """Why a transfer failed, in words ("Connection refused"), from a requests or urllib3 error."""
    if isinstance(err, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return f"no answer for {TIMEOUT} s"
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if isinstance(cause, http.client.IncompleteRead):
            return "closed before the end of the file"
        err, cause = cause, cause.__cause__ or cause.__context__
    return type(err).__name__


def _what(part: Path) -> str:
    """What a body that failed the hash check looks like, for the message."""
    size = part.stat().st_size
    if size == 0:
        return "an empty body"
    with part.open("rb") as f:
        head = f.read(256).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return f"an HTML page of {size:,} bytes, not the file: an error, login or quota page"
    return f"{size:,} bytes"


def _progress(name: str, total: int | None, initial: int) -> tqdm:
    # disable=None draws the bar on a terminal only: batch jobs' logs get no carriage returns.
    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None,
        file=sys.stderr,
    )


def _dropped(url: str, part: Path, total: int | None, reason: str) -> DownloadError:
    received = part.stat().st_size if part.is_file() else 0
    of = f" of {total:,}" if total else ""
    return DownloadError(
        f"the connection to {url} dropped ({reason}); {received:,}{of} bytes are kept in {part}: "
        "run again to resume."
    )


def _get(url: str, part: Path) -> bool:
    """Streams ``url`` into ``part``, resuming from what ``part`` holds where the server can.

    Returns:
        Whether the download resumed (``part`` then starts with bytes of an earlier attempt).
    """
    offset = part.stat().st_size if part.is_file() else 0
    # identity: byte offsets, lengths and hashes are those of the file itself.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    response = None
    total = None
    try:
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
            status = response.status_code
            resumed = status == 206 and response.headers.get("Content-Range", "").startswith(
                f"bytes {offset}-"
            )
            if offset and (status == 416 or (status == 206 and not resumed)):
                # The kept bytes are no prefix of this file (416: as long as it or longer), or the
                # server sent another range than asked for: start again from the first byte.
                part.unlink()
                return _get(url, part)
            if status >= 400:
                advice = (
                    "Check the URL (a mirror holds <mirror>/<data set>/<file name>)"
                    if status < 500
                    else f"The server failed: try again later, or {MIRROR_HINT}"
                )
                raise DownloadError(
                    f"{url} answered HTTP {status} {response.reason}; nothing was saved. {advice}."
                )
            start = offset if resumed else 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length else None
            with (
                part.open("ab" if resumed else "wb") as f,
                _progress(part.name.removesuffix(".part"), total, start) as bar,
            ):
                # The raw bytes: a server that labels a .tar.gz "Content-Encoding: gzip" must not
                # have it decompressed on the way.
                for chunk in response.raw.stream(CHUNK, decode_content=False):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total is not None and part.stat().st_size < total:
                raise _dropped(url, part, total, "closed before the end of the file")
            return resumed
    except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
        if response is None:
            raise DownloadError(
                f"cannot reach {url} ({_reason(err)}); check the network and the address, or "
                f"{MIRROR_HINT}."
            ) from err
        raise _dropped(url, part, total, _reason(err)) from err
    except OSError as err:  # after requests' errors, which are OSErrors too
        raise DownloadError(
            f"cannot write {part} ({err.strerror or err}); free space on that disk or choose "
            "another root, then run again to resume."
        ) from err


def _fetch(url: str, target: Path, md5: str) -> None:
    """Puts the file at ``url`` at ``target`` once verified; the caller holds the root's lock."""
    if target.exists():
        actual = _md5(target)
        if actual == md5:
            _say(f"{target.name}: already here, MD5 verified.")
            return
        # Only a verified file is ever renamed to a target name: this one came from elsewhere.
        raise DownloadError(
            f"{target} is not the expected file (MD5 {actual}, expected {md5}) and was not "
            "downloaded here: move it away and run again."
        )
    part = target.with_name(target.name + ".part")
    _say(f"{target.name}: downloading {url}")
    while True:
        resumed = _get(url, part)
        actual = _md5(part)
        if actual == md5:
            part.replace(target)
            _say(f"{target.name}: MD5 verified.")
            return
        what = _what(part)
        part.unlink()
        if not resumed:
            raise DownloadError(
                f"hash mismatch for {url}: expected MD5 {md5}, got {actual} ({what}). It was "
                f"deleted; nothing was kept. Try again later, or {MIRROR_HINT} that serves the "
                "official file."
            )
        # The bytes kept from an earlier attempt may belong to another file (a mirror that
        # changed, say): the loop downloads once more, from the first byte.
        _say(f"{target.name}: the resumed download failed the hash check; starting again.")


def _unpack(archive: Path, folder: str) -> None:
    """Unpacks ``folder`` from the tar ``archive`` beside it, all of it or nothing."""
    root = archive.parent
    staging = root / f".{folder}.partial"
    # A staging folder left by an interrupted unpack is ours (we hold the lock): start afresh.
    shutil.rmtree(staging, ignore_errors=True)
    _say(f"{archive.name}: unpacking {folder}/")
    try:
        with tarfile.open(archive) as tar:
            # The "data" filter refuses links and paths out of the folder (Python 3.10.12+).
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")
            else:
                tar.extractall(staging)
        if not (staging / folder).is_dir():
            raise DownloadError(f"{archive} holds no {folder}/ folder; delete it and run again.")
        (staging / folder).rename(root / folder)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DownloadError(
            f"cannot unpack {archive} ({getattr(err, 'strerror', None) or err}); free space on "
            "that disk, or delete the archive if it is damaged, then run again."
        ) from err
    finally:
        # Best effort: a failure here must not hide the error above, and the next run retries.
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    lock = FileLock(root / LOCK_FILE)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            _say(f"waiting for another download into {root} to finish (lock {lock.lock_file})")
            lock.acquire()
    except OSError as err:
        raise DownloadError(
            f"cannot create the lock file {lock.lock_file} ({err.strerror or err}); the root "
            "must be writable."
        ) from err
    try:
        yield
    finally:
        lock.release()


def _mirror(mirror: str | None) -> str | None:
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror is None:
        return None
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DownloadError(
            f"the mirror must be an http:// or https:// URL, got {mirror!r} (from --mirror or "
            f"{MIRROR_ENV}); files already on disk need no mirror: put them in the root."
        )
    return mirror.rstrip("/")


def download(
    name: str,
    root: str | Path,
    mirror: str | None = None,
    *,
    datasets: Mapping[str, DataSet] | None = None,
) -> Path:
    """Downloads and verifies data set ``name`` into ``root`` (see the module docstring).

    Args:
        name: ``"omniglot"`` or ``"cifar100"`` (``"cifarfs"`` and ``"fc100"`` name the latter).
        root: The folder for the files; created if missing.
        mirror: A base URL that replaces the official ones (default: ``$LIGHTNING_MAML_DATA_MIRROR``).
        datasets: The data sets and their pinned hashes (default: :data:`DATASETS`).

    Returns:
        ``root``.

    Raises:
        DownloadError: With a message that says what failed and what to do.
    """
    registry = DATASETS if datasets is None else datasets
    key = ALIASES.get(name, name)
    if key in UNAVAILABLE:
        raise DownloadError(miniimagenet_howto(root))
    if key not in registry:
        raise DownloadError(f"no data set {name!r} to download; choose from {', '.join(registry)}.")
    dataset = registry[key]
    base = _mirror(mirror)
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create {root} ({err.strerror or err}).") from err
    with _locked(root):
        if dataset.unpack is not None and (root / dataset.unpack).is_dir():
            _say(f"{root / dataset.unpack} is already here.")
            return root
        for source in dataset.sources:
            url = source.url if base is None else f"{base}/{key}/{source.file}"
            _fetch(url, root / source.file, source.md5)
        if dataset.unpack is not None:
            _unpack(root / dataset.sources[0].file, dataset.unpack)
    return root


def _listing() -> str:
    lines = ["data sets (NAME: size, what, official source):"]
    for name, dataset in DATASETS.items():
        aliases = [alias for alias, key in ALIASES.items() if key == name]
        also = f" (or {', '.join(aliases)})" if aliases else ""
        lines.append(f"  {name}{also}: {dataset.size}, {dataset.title}")
        lines += [f"      {source.url}" for source in dataset.sources]
    lines += [
        "  miniimagenet: no official redistributable file; the command says how to get it",
        "",
        f"A mirror (--mirror URL or {MIRROR_ENV}=URL) serves <URL>/<data set>/<file name>,",
        "e.g. <URL>/omniglot/images_background.zip; the pinned MD5s apply to it too.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``lightning-maml download NAME [--root DIR] [--mirror URL]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-maml download",
        description="Download a data set from its official source (or a mirror), verified "
        "against its pinned MD5, into the folder the datamodules read.",
        epilog=_listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name",
        metavar="NAME",
        choices=[*DATASETS, *ALIASES, *UNAVAILABLE],
        help=f"the data set: {', '.join([*DATASETS, *ALIASES, *UNAVAILABLE])}",
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="the folder for the files (default: data/NAME, where the recipes look; "
        "data/cifar100 for cifarfs and fc100)",
    )
    parser.add_argument(
        "--mirror",
        metavar="URL",
        help=f"fetch <URL>/<data set>/<file name> instead of the official URLs "
        f"(default: ${MIRROR_ENV})",
    )
    args = parser.parse_args(argv)
    root = Path(args.root or f"data/{ALIASES.get(args.name, args.name)}")
    try:
        download(args.name, root, args.mirror)
    except DownloadError as err:
        print(f"lightning-maml download: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lightning-maml download: interrupted; run again to resume.", file=sys.stderr)
        return 130
    print(f"{args.name} is in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
