"""What the host CPU can do natively: bf16 arithmetic (AVX512-BF16, AMX) for bf16-mixed runs."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["BF16_FLAGS", "cpu_bf16_support", "cpu_name", "read_cpu_flags", "warn_bf16_on_cpu"]

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
