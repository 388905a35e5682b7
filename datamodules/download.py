"""Downloads the benchmark data sets from their official sources, verified against pinned hashes.

``lightning-maml download NAME [--root DIR] [--mirror URL]``, or ``download=True`` on a datamodule
(in ``prepare_data``, when its root holds no data). :func:`pooch.retrieve` checks each file against
its pinned MD5, the official file's whatever the URL, and moves it to its name only once verified;
a wrong body (an HTML page, an empty or truncated response) is deleted and reported. The transfer
streams into ``<file>.part``, from which the next run resumes after an interruption (a dropped
connection, a full disk, a killed job) where the server honours HTTP range requests. A lock file
lets one process at a time download into a root; the others wait, then find the files verified.
Nothing is written through a symbolic link: a link at a name that a download writes is refused.
CIFAR-100's tarball must hold only files and folders, none out of the root; pooch's Untar unpacks
it into a temporary folder, renamed to ``cifar-100-python/`` when complete.

Mirrors, for clusters without internet access: ``--mirror URL`` or ``LIGHTNING_MAML_DATA_MIRROR``
replace the official URLs by ``<mirror>/<data set>/<file name>``, e.g.
``<mirror>/omniglot/images_background.zip``. A password in a mirror's URL
(``https://user:password@host``) is sent, never shown: messages print ``https://***@host/...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import IncompleteRead
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pooch
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
        members: The files (name, MD5) that ``unpack`` holds once unpacked.
    """

    title: str
    size: str
    sources: tuple[Source, ...]
    unpack: str | None = None
    members: tuple[tuple[str, str], ...] = ()


_OMNIGLOT = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
_CIFAR100 = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
# The MD5s are those that torchvision's Omniglot and CIFAR100 datasets publish for these files.
DATASETS: dict[str, DataSet] = {
    "omniglot": DataSet(
        "Omniglot (Lake et al. 2015), the two official zips",
        "about 16 MB",
        tuple(
            Source(f"{name}.zip", f"{_OMNIGLOT}{name}.zip", md5)
            for name, md5 in (
                ("images_background", "68d2efa1b9178cc56df9314c21c6e718"),
                ("images_evaluation", "6b91aef0f799c5bb55b94e3f2daec811"),
            )
        ),
    ),
    "cifar100": DataSet(
        "CIFAR-100 (for CIFAR-FS and FC100), unpacked into cifar-100-python/",
        "161 MB",
        (Source("cifar-100-python.tar.gz", _CIFAR100, "eb9058c3a382ffc7106e4002c42a8d85"),),
        unpack="cifar-100-python",
        members=(
            ("train", "16019d7e3df5f24257cddd939b257f8d"),
            ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
            ("meta", "7973b15100ade9c7d40fb424638fde48"),
        ),
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


def _shown(url: str) -> str:
    """``url`` as messages show it, with ``***`` for a user and password."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def _md5(path: Path) -> str:
    return pooch.file_hash(str(path), alg="md5")


def _no_link(path: Path) -> None:
    if path.is_symlink():
        raise DownloadError(
            f"{path} is a symbolic link (to {os.readlink(path)}), and a download writes only what "
            "it creates: remove the link and run again (for data kept elsewhere, use its folder "
            "as the root)."
        )


def _reason(err: BaseException) -> str:
    """Why a transfer failed, in words ("Connection refused"), from a requests or urllib3 error."""
    if isinstance(err, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return f"no answer for {TIMEOUT} s"
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if isinstance(cause, IncompleteRead):
            return "closed before the end of the file"
        err, cause = cause, cause.__cause__ or cause.__context__
    return type(err).__name__


def _what(path: Path) -> str:
    """What a body that failed the hash check looks like, for the message."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(256).lstrip().lower()
    if size == 0:
        return "an empty body"
    if head.startswith((b"<!doctype html", b"<html")):
        return f"an HTML page of {size:,} bytes, not the file: an error, login or quota page"
    return f"{size:,} bytes"


class _Downloader:
    """pooch's downloader: streams a URL into ``<target>.part``, resuming what that holds.

    pooch passes an empty temporary file, verifies it afterwards and moves it to the target. The
    body goes to the ``.part`` instead, kept if the transfer fails so that the next run resumes,
    and replaces the temporary file once complete. That is deleted at once, so that a killed job
    leaves the ``.part`` only.
    """

    def __init__(self, target: Path, md5: str) -> None:
        self.part, self.md5 = target.with_name(target.name + ".part"), md5
        self.got = self.what = ""  # the body's MD5 and look, for pooch's hash mismatch

    def __call__(self, url: str, output_file: str, _pooch: object) -> None:
        os.unlink(output_file)
        resumed = self._stream(url)
        self.got = _md5(self.part)
        if resumed and self.got != self.md5:
            # The kept bytes may belong to another file (a mirror that changed, say).
            _say(f"{self.part.stem}: the resumed download failed the hash check; starting again.")
            self.part.unlink()
            self._stream(url)
            self.got = _md5(self.part)
        self.what = _what(self.part)
        os.replace(self.part, output_file)

    def _stream(self, url: str) -> bool:
        """Streams ``url`` into the ``.part``; returns whether it resumed what that held."""
        part, shown, response, total = self.part, _shown(url), None, None
        _no_link(part)
        offset = part.stat().st_size if part.exists() else 0
        # identity: byte offsets, lengths and hashes are those of the file itself.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
                status = response.status_code
                resumed = status == 206 and response.headers.get("Content-Range", "").startswith(
                    f"bytes {offset}-"
                )
                if offset and not resumed and status in (206, 416):
                    # The kept bytes are no prefix of this file (416: as long as it or longer),
                    # or the server sent another range than asked for: start from byte 0.
                    part.unlink()
                    return self._stream(url)
                if status >= 400:
                    advice = (
                        "Check the URL (a mirror holds <mirror>/<data set>/<file name>)"
                        if status < 500
                        else f"The server failed: try again later, or {MIRROR_HINT}"
                    )
                    raise DownloadError(
                        f"{shown} answered HTTP {status} {response.reason}; nothing was saved. "
                        f"{advice}."
                    )
                start = offset if resumed else 0
                length = response.headers.get("Content-Length", "")
                total = start + int(length) if length.isdigit() else None
                if not resumed:
                    part.unlink(missing_ok=True)
                # O_NOFOLLOW, O_EXCL: a link put at this name since the check above is refused.
                mode = os.O_APPEND if resumed else os.O_CREAT | os.O_EXCL
                fd = os.open(part, os.O_WRONLY | os.O_NOFOLLOW | mode, 0o644)
                with open(fd, "wb") as f, _progress(part.stem, total, start) as bar:
                    # The raw bytes: a server that labels a .tar.gz "Content-Encoding: gzip"
                    # must not have it decompressed on the way.
                    for chunk in response.raw.stream(CHUNK, decode_content=False):
                        f.write(chunk)
                        bar.update(len(chunk))
            if total is not None and part.stat().st_size < total:
                raise IncompleteRead(b"")
            return resumed
        # from None: requests' errors can quote the URL, password included.
        except (requests.RequestException, urllib3.exceptions.HTTPError, IncompleteRead) as err:
            if response is None:
                raise DownloadError(
                    f"cannot reach {shown} ({_reason(err)}); check the network and the address, "
                    f"or {MIRROR_HINT}."
                ) from None
            received = part.stat().st_size if part.is_file() else 0
            of = f" of {total:,}" if total else ""
            raise DownloadError(
                f"the connection to {shown} dropped ({_reason(err)}); {received:,}{of} bytes are "
                f"kept in {part}: run again to resume."
            ) from None
        except OSError as err:  # after requests' errors, which are OSErrors too
            raise DownloadError(
                f"cannot write {part} ({err.strerror or err}); free space on that disk or choose "
                "another root, then run again to resume."
            ) from err


def _progress(name: str, total: int | None, initial: int) -> tqdm:
    # disable=None draws the bar on a terminal only: batch jobs' logs get no carriage returns.
    style = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "disable": None}
    return tqdm(total=total, initial=initial, desc=name, file=sys.stderr, **style)


def _fetch(url: str, target: Path, md5: str) -> None:
    """Puts the file at ``url`` at ``target`` once verified; the caller holds the root's lock."""
    _no_link(target)
    if target.exists():
        actual = _md5(target)
        if actual == md5:
            _say(f"{target.name}: already here, MD5 verified.")
            return
        # Only a verified file is ever moved to a target name: this one came from elsewhere.
        raise DownloadError(
            f"{target} is not the expected file (MD5 {actual}, expected {md5}) and was not "
            "downloaded here: move it away and run again."
        )
    _say(f"{target.name}: downloading {_shown(url)}")
    fetch = _Downloader(target, md5)
    try:
        pooch.retrieve(url, f"md5:{md5}", target.name, target.parent, downloader=fetch)
    except ValueError:  # pooch's hash mismatch; it has deleted the body
        raise DownloadError(
            f"hash mismatch for {_shown(url)}: expected MD5 {md5}, got {fetch.got} ({fetch.what}). "
            f"It was deleted; nothing was kept. Try again later, or {MIRROR_HINT} that serves the "
            "official file."
        ) from None
    _say(f"{target.name}: MD5 verified.")


def _unpacked(folder: Path, members: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``folder`` holds ``members``, verified; an empty one is removed."""
    _no_link(folder)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        _say(f"{folder} was empty: removed.")
    if not folder.exists():
        return False
    wrong = []
    for name, md5 in members:
        actual = _md5(folder / name) if (folder / name).is_file() else None
        if actual != md5:
            wrong.append(f"{name}: MD5 {actual}" if actual else f"{name}: missing")
    if wrong:
        raise DownloadError(
            f"{folder} does not hold the official files ({'; '.join(wrong)}) and was not "
            "unpacked here: move it away and run again."
        )
    _say(f"{folder} is already here, MD5 verified.")
    return True


def _unpack(archive: Path, folder: str) -> None:
    """Unpacks ``folder`` from the tar ``archive`` beside it, all of it or nothing."""
    root = archive.parent
    staging = root / f".{folder}.partial"
    _no_link(staging)
    # A staging folder left by an interrupted unpack is ours (we hold the lock): start afresh.
    shutil.rmtree(staging, ignore_errors=True)
    _say(f"{archive.name}: unpacking {folder}/")
    try:
        # pooch's Untar filters members on Python 3.12+ only: check them on every version.
        with tarfile.open(archive) as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                inside = not path.is_absolute() and ".." not in path.parts
                if not (inside and (member.isfile() or member.isdir())):
                    raise DownloadError(
                        f"{archive} holds {member.name!r}, not a file or folder at a relative path "
                        "without '..', as the official file's are: nothing was unpacked. Delete "
                        "it and run again."
                    )
        staging.mkdir()
        pooch.Untar(extract_dir=staging.name)(str(archive), "download", None)
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
    """Holds the root's lock, with pooch's log (which would show URLs) quiet."""
    lock = FileLock(root / LOCK_FILE)
    _no_link(Path(lock.lock_file))
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
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        lock.release()


def _mirror(mirror: str | None) -> str | None:
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror is None:
        return None
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DownloadError(
            f"the mirror must be an http:// or https:// URL, got {_shown(mirror)!r} (from "
            f"--mirror or {MIRROR_ENV}); files already on disk need no mirror: put them in the "
            "root."
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
        if dataset.unpack is not None and _unpacked(root / dataset.unpack, dataset.members):
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
    names = [*DATASETS, *ALIASES, *UNAVAILABLE]
    parser.add_argument(
        "name", metavar="NAME", choices=names, help=f"the data set: {', '.join(names)}"
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
