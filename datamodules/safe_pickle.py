"""Reading data pickles of NumPy arrays and plain containers, without running code from them.

``pickle.load`` calls whatever function a file names, so a data file from elsewhere could run any
code the moment it is read. The data sets distributed as pickles (learn2learn's mini-ImageNet,
CIFAR-100's Python version) hold only dicts, lists, strings, numbers and NumPy arrays: this
unpickler builds those and refuses every other global, naming the file.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

try:  # NumPy 2 keeps them in numpy._core; pickles written by NumPy 1 name numpy.core
    from numpy._core import multiarray, numeric
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core import multiarray, numeric  # type: ignore[no-redef]

__all__ = ["UnsafePickleError", "load_data_pickle"]

# What an array pickles to: ndarray.__reduce__ calls _reconstruct (protocols up to 4) or
# _frombuffer (protocol 5) with a dtype; a NumPy scalar calls scalar; Python 2 era pickles
# (protocol 2) encode raw bytes as _codecs.encode(text, "latin1"). Sets are plain containers.
_ALLOWED: dict[tuple[str, str], Any] = {
    **{
        (module, name): getattr(multiarray, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    },
    **{
        (module, "_frombuffer"): numeric._frombuffer  # type: ignore[attr-defined]  # private, unstubbed
        for module in ("numpy.core.numeric", "numpy._core.numeric")
    },
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{(module, "set"): set for module in ("builtins", "__builtin__")},  # __builtin__: protocol 2
    **{(module, "frozenset"): frozenset for module in ("builtins", "__builtin__")},
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a function or class that data never needs: it may run code."""


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None


def load_data_pickle(path: Path, fix: str, encoding: str = "ASCII") -> Any:
    """Unpickles ``path``, allowing only NumPy arrays and plain containers.

    Args:
        path: The pickle file.
        fix: What to do about a bad file, ending the messages ("replace PATH with ...").
        encoding: How to decode Python 2 strings (``"bytes"`` keeps them as bytes).

    Returns:
        What the file holds.

    Raises:
        ValueError: If the file calls anything else (it would run code), or is corrupt or
            truncated; the message names the file.
    """
    try:
        with path.open("rb") as f:
            return _DataUnpickler(f, encoding=encoding).load()
    except UnsafePickleError as err:
        raise ValueError(
            f"refused to unpickle {path}: it calls {err}, and data files hold only NumPy "
            f"arrays and plain containers, so it may run code; {fix}"
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as err:
        raise ValueError(f"cannot unpickle {path} ({err!r}): corrupt or truncated; {fix}") from err
