"""Reading checkpoints without running what they hold, with errors that name the file.

A checkpoint is a pickle, and unpickling can call any function the file names
(``os.system``, say). Every read here uses ``torch.load(weights_only=True)``, which builds only
tensors, plain containers and the few types PyTorch allows; lightning-maml's checkpoints hold
nothing else. Lightning (2.6) loads local and most remote files that way too, but
``http(s)://`` ones with ``weights_only=False``. The command line therefore fetches a remote
checkpoint first, checks the copy and hands Lightning the checked local copy
(:func:`cli_ckpt_path`). From Python, do the same before ``trainer.fit(ckpt_path=...)``::

    local = fetch_checkpoint(url)
    read_checkpoint(local, name=url)
    trainer.fit(learner, datamodule=data, ckpt_path=local)
"""

from __future__ import annotations

import atexit
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import torch

__all__ = [
    "check_checkpoint_file",
    "check_finite_weights",
    "cli_ckpt_path",
    "fetch_checkpoint",
    "is_remote",
    "load_checkpoint",
    "read_checkpoint",
]

#: ``ckpt_path`` values Lightning resolves itself, to files it finds on its own
#: (``registry:NAME`` too).
LIGHTNING_NAMES = ("hpc", "registry")
#: ``ckpt_path`` values that name a checkpoint of a ``fit`` earlier in the same process.
IN_PROCESS_NAMES = ("best", "last")
RUNS = "<save_dir>/<project or lightning_logs>/<run>/checkpoints/"


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URL (``s3://...``, ``https://...``) rather than a local file."""
    return "://" in str(path)


def fetch_checkpoint(url: str) -> Path:
    """Copies the remote checkpoint ``url`` to a private temporary file and returns its path.

    ``http(s)://`` is fetched as Lightning fetches it (``urllib``, through ``torch.hub``);
    other schemes through fsspec, as Lightning opens them. The copy is removed when the process
    exits. Nothing is unpickled here: check the copy with :func:`read_checkpoint`.

    Raises:
        FileNotFoundError: If the file cannot be fetched.
    """
    folder = Path(tempfile.mkdtemp(prefix="lightning-maml-ckpt-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    local = folder / (Path(url.split("?")[0]).name or "checkpoint.ckpt")
    try:
        if url.startswith(("http://", "https://")):
            torch.hub.download_url_to_file(url, str(local), progress=False)
        else:
            with fsspec.open(url, "rb") as source, local.open("wb") as copy:
                shutil.copyfileobj(source, copy)
    except Exception as err:  # urllib, fsspec and every file system raise their own kinds
        raise FileNotFoundError(
            f"ckpt_path {url}: could not fetch it ({err}); check the address, or download it "
            "and pass the local file."
        ) from err
    return local


def read_checkpoint(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """Loads a local checkpoint without running code from it, or raises an error naming it.

    Args:
        path: The local file.
        name: How to name it in messages (the URL it was fetched from; default: ``path``).

    Returns:
        The checkpoint, with its tensors on the CPU.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file is empty, truncated, not a checkpoint, would run code when
            unpickled, or holds non-finite weights.
    """
    path = Path(path)
    name = name or str(path)
    elsewhere = "" if is_remote(name) else f" (the other .ckpt files in {path.parent})"
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path {name}: no such file; runs keep theirs under {RUNS} (last.ckpt is the "
            "newest)."
        )
    fix = (
        "it is empty, truncated (a run killed while writing it, or a full disk) or not a "
        f"checkpoint; resume or test from another one{elsewhere}."
    )
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read checkpoint {name}: {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"cannot read checkpoint {name} ({err}): {fix}") from err
        called = re.search(r"GLOBAL (\S+)", str(err))
        what = (
            f"it would call {called.group(1)} when unpickled"
            if called
            else "it holds objects other than tensors and plain values"
        )
        raise ValueError(
            f"refused to load checkpoint {name}: {what}, and unpickling such a file can run "
            "any code; lightning-maml's checkpoints hold only tensors and plain values. Use a "
            "checkpoint a lightning-maml run wrote; for a file from a source you trust that "
            "holds other types, allow them with torch.serialization.add_safe_globals."
        ) from None  # the cause would repeat torch's advice to load with weights_only=False
    except Exception as err:  # a damaged file fails in torch's zip reader or the unpickler
        raise ValueError(f"cannot read checkpoint {name} ({err!r}): {fix}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"cannot read checkpoint {name} (it holds no state_dict): {fix}")
    check_finite_weights(checkpoint["state_dict"], f"the checkpoint {name}", elsewhere)
    return checkpoint


def check_finite_weights(state_dict: Mapping[str, Any], source: str, elsewhere: str = "") -> None:
    """Raises ``ValueError`` naming the tensors of ``state_dict`` that hold NaN or infinity.

    Weights are never meant to be non-finite: such a checkpoint was saved after training
    diverged, and evaluating or resuming it would only report NaN losses.

    Args:
        state_dict: Name -> tensor, as saved.
        source: What holds them, for the message ("the checkpoint PATH").
        elsewhere: Where earlier checkpoints are, appended to the advice.
    """
    bad = [
        key
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]
    if bad:
        named = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"{source} holds non-finite values in {named}: it was saved after training "
            f"diverged; resume or test from an earlier checkpoint{elsewhere}."
        )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """:func:`read_checkpoint` for a local file or a URL (fetched to a temporary file first).

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file cannot be used as a checkpoint.
    """
    if not is_remote(path):
        return read_checkpoint(path)
    local = fetch_checkpoint(str(path))
    try:
        return read_checkpoint(local, name=str(path))
    finally:
        shutil.rmtree(local.parent, ignore_errors=True)


def check_checkpoint_file(path: str | Path) -> None:
    """Raises a clear error for a checkpoint that is missing, damaged, unsafe or diverged.

    Remote checkpoints (``s3://...``, any URL) are fetched to a temporary file and checked
    there. See :func:`read_checkpoint` for what is checked.

    Args:
        path: The checkpoint given as ``ckpt_path`` (``--ckpt_path`` on the command line).

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file cannot be used as a checkpoint.
    """
    load_checkpoint(path)


def cli_ckpt_path(path: str | Path | None, command: str) -> str | Path | None:
    """The ``ckpt_path`` the command line hands Lightning, after checking what was given.

    A local file is checked in place (:func:`read_checkpoint`); a remote one is fetched and
    checked, and its checked local copy is returned, so that Lightning never unpickles an
    unchecked file. ``hpc`` and ``registry[:NAME]`` are left to Lightning; ``best`` and
    ``last`` are refused, since they name a checkpoint of a ``fit`` run earlier in the same
    process, which a command never has.

    Args:
        path: The ``--ckpt_path`` given (None: none).
        command: The sub-command (``fit``, ``validate``, ``test``), for messages.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file cannot be used, or for ``best`` and ``last``.
    """
    if path is None or str(path).lower().split(":")[0] in LIGHTNING_NAMES:
        return path  # Lightning loads what it finds for these with weights_only=True
    if path in IN_PROCESS_NAMES:
        which = "the best" if path == "best" else "the newest"
        raise ValueError(
            f"--ckpt_path {path} names {which} checkpoint of a fit run earlier in the same "
            f"Python process (trainer.fit, then trainer.{command}); each lightning-maml "
            f"command is a process of its own. Give the file: RUN/checkpoints/last.ckpt for "
            f"the newest state, or the best one's file beside it (runs keep theirs under {RUNS})."
        )
    if is_remote(path):
        local = fetch_checkpoint(str(path))
        read_checkpoint(local, name=str(path))
        return str(local)
    read_checkpoint(path)
    return path
