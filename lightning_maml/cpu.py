"""The host CPU: what it computes natively (bf16 for bf16-mixed runs), and how freed memory is
reused on it (glibc's malloc)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "BF16_FLAGS",
    "cpu_bf16_support",
    "cpu_name",
    "keep_freed_memory",
    "read_cpu_flags",
    "warn_bf16_on_cpu",
]

#: The /proc/cpuinfo flags of native bf16 arithmetic: AVX512-BF16 dot products, AMX tiles.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the flags are unknown
        return ""


def _field(name: str, cpuinfo: str | None) -> str | None:
    """The value of the first processor's ``name`` line in ``cpuinfo`` (this machine's by
    default), or None where there is none."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def read_cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first processor in ``/proc/cpuinfo`` (empty where it is absent).

    Args:
        cpuinfo: The text of ``/proc/cpuinfo``; by default this machine's.
    """
    return frozenset((_field("flags", cpuinfo) or "").split())


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or what :mod:`platform` knows."""
    return _field("model name", cpuinfo) or platform.processor() or platform.machine()


def cpu_bf16_support(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16).

    Without them PyTorch emulates bf16 in fp32 and converts on every operation, so a
    bf16-mixed run is slower than fp32, not faster.

    Args:
        flags: CPU feature flags; by default this machine's (:func:`read_cpu_flags`).
    """
    return bool(BF16_FLAGS & (read_cpu_flags() if flags is None else flags))


def warn_bf16_on_cpu(
    precision: str | int | None, device_type: str = "cpu", flags: frozenset[str] | None = None
) -> bool:
    """Warns (on rank zero) when a bf16 precision runs on a CPU without native bf16.

    Args:
        precision: The Trainer's precision (``"bf16-mixed"``, ``"bf16-true"``, ``"32-true"``...).
        device_type: Where the model runs; only a CPU is checked.
        flags: CPU feature flags; by default this machine's.

    Returns:
        Whether it warned.
    """
    if device_type != "cpu" or "bf16" not in str(precision) or cpu_bf16_support(flags):
        return False
    rank_zero_warn(
        f"precision={precision!r} on a CPU without native bf16 ({cpu_name()} lacks "
        f"{' and '.join(sorted(BF16_FLAGS))}): PyTorch emulates bf16 in fp32 there, which is "
        "slower than fp32 and less accurate. Use precision='32-true' on this machine.",
        category=UserWarning,
    )
    return True


#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest block glibc serves from its heap when told to (its own ceiling on 64-bit).
KEEP_BLOCKS_UP_TO = 32 * 2**20
#: Free memory the heap keeps at its top instead of returning it to the system.
KEEP_AT_TOP = 2**30


@functools.cache
def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed blocks of up to 32 MiB for reuse (once per process).

    By default glibc returns large freed blocks to the system and asks for them again on the
    next allocation, so every activation of a conv net's meta-step (a few MiB each, allocated
    and freed every step) costs page faults: the kernel maps and zeroes each page again. CPU
    training spends a noticeable part of each step there. After this call, blocks up to 32 MiB
    come from malloc's heap, which keeps up to 1 GiB of free memory at its top; the process's
    resident memory then stays near its peak instead of falling back between steps.

    The environment's own choice stands: where ``GLIBC_TUNABLES`` sets a ``glibc.malloc``
    parameter, or a ``MALLOC_*_`` variable is set (``MALLOC_TRIM_THRESHOLD_=131072`` restores
    glibc's default), nothing is changed. Not glibc (macOS, musl): nothing is changed either.

    Returns:
        Whether malloc's parameters were set.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ
    ):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the heap's top is kept only if its blocks come from it.
    if mallopt(_M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO) != 1:
        return False
    return mallopt(_M_TRIM_THRESHOLD, KEEP_AT_TOP) == 1
