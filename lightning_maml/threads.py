"""How many threads torch computes with, and whether the cores this process may use can carry them.

By default torch starts one intra-op thread per core of the machine. Runs that share a CPU
then spin their threads against each other and each slows several-fold, where with one thread
each they would hardly slow at all (issue #22; ``benchmarks/concurrency.py`` measures it). Small
models such as the sinusoid MLP gain nothing from a second thread, so their recipes set
``threads: 1``; :func:`warn_if_oversubscribed` says so when a run asks for more threads than
the cores it may use (its CPU affinity and its cgroup's CPU quota), or when the machine's
other work already fills them.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_maml.checks import check_int

__all__ = [
    "cgroup_cpu_limit",
    "machine_load",
    "oversubscription",
    "set_threads",
    "usable_cores",
    "warn_if_oversubscribed",
]

#: Where cgroups are mounted, and where a process's own cgroup is named.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

#: How to lower the threads, for the messages.
ADVICE = (
    "set `threads: 1` in the config (or `--threads 1` on the lightning-maml command line, "
    "torch.set_num_threads(1) in Python, or OMP_NUM_THREADS=1 in the environment)"
)


def set_threads(threads: int) -> None:
    """Makes torch compute with ``threads`` intra-op threads (and inter-op threads, if still possible).

    Torch fixes the inter-op pool when it first runs work in parallel; after that only the
    intra-op threads can change, which is what a meta-step's kernels use.

    Raises:
        ValueError: If ``threads`` is not a positive integer.
    """
    check_int("threads", threads)
    torch.set_num_threads(threads)
    # Once the pool is started only the intra-op setting can change, and it is the one that matters.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


def _read_limit(v2_max: Path, v1_quota: Path, v1_period: Path) -> float | None:
    """One cgroup's quota in CPUs from its files, None if unlimited, missing or unreadable."""
    try:
        quota, period = v2_max.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = v1_quota.read_text().strip(), v1_period.read_text().strip()
        except OSError:
            return None
    try:
        limit, length = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    if limit <= 0 or length <= 0:
        return None
    return limit / length


def _own_cgroups(root: Path, proc_cgroup: Path) -> list[tuple[Path, Path, Path]]:
    """The (v2 cpu.max, v1 quota, v1 period) files of this process's cgroup and its ancestors.

    ``/proc/self/cgroup`` names the cgroup as ``0::/path`` (v2) or ``N:cpu,cpuacct:/path`` (v1);
    a quota set on any ancestor limits the process too, so every level up to the root counts.
    In a container whose cgroup namespace hides the path, the path is ``/`` and the root's
    files are its own.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    v2_path, v1_path = "/", "/"
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            v2_path = path or "/"
        elif "cpu" in controllers.split(","):
            v1_path = path or "/"
    levels: list[tuple[Path, Path, Path]] = []
    v2_dir = root / v2_path.lstrip("/")
    v1_dir = root / "cpu" / v1_path.lstrip("/")
    while True:
        levels.append(
            (v2_dir / "cpu.max", v1_dir / "cpu.cfs_quota_us", v1_dir / "cpu.cfs_period_us")
        )
        if v2_dir == root and v1_dir == root / "cpu":
            return levels
        v2_dir = v2_dir.parent if v2_dir != root else v2_dir
        v1_dir = v1_dir.parent if v1_dir != root / "cpu" else v1_dir


def cgroup_cpu_limit(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The CPUs' worth of time this process's cgroup may use per period, or None if unlimited.

    cgroup v2 writes ``"<quota> <period>"`` (quota ``max`` when unlimited) in ``cpu.max``; v1
    writes the quota (``-1`` when unlimited) and the period in two files. The process's own
    cgroup and each ancestor are read (the tightest quota wins); a file that is missing or
    unreadable counts as no limit.

    Args:
        root: Where cgroups are mounted (``/sys/fs/cgroup``; v1's CPU controller under ``cpu/``).
        proc_cgroup: The file that names this process's cgroup (``/proc/self/cgroup``).
    """
    limits = [_read_limit(*files) for files in _own_cgroups(root, proc_cgroup)]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def usable_cores(
    affinity: set[int] | None = None, cgroup_limit: float | Literal["read"] | None = "read"
) -> int:
    """The cores this process may compute on: its CPU affinity, capped by its cgroup's quota.

    A quota of 1.5 CPUs counts as 2 cores: threads can use part of the second.

    Args:
        affinity: The CPUs this process may run on (default: ``os.sched_getaffinity(0)``, or
            every CPU where the platform has no affinity).
        cgroup_limit: The cgroup quota in CPUs, None for none (default: read it,
            :func:`cgroup_cpu_limit`).
    """
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores = len(affinity) if affinity is not None else os.cpu_count() or 1
    limit = cgroup_cpu_limit() if cgroup_limit == "read" else cgroup_limit
    if isinstance(limit, float | int):
        cores = min(cores, max(1, math.ceil(limit)))
    return max(cores, 1)


def machine_load() -> float | None:
    """The machine's 1-minute load average (runnable threads), None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def oversubscription(threads: int, cores: int, load: float | None) -> str | None:
    """What is wrong with computing with ``threads`` threads on ``cores`` cores, or None.

    Args:
        threads: This process's intra-op threads.
        cores: The cores it may use (:func:`usable_cores`).
        load: The machine's 1-minute load average, this process's own starting thread included
            (:func:`machine_load`); None if unknown.
    """
    if threads > cores:
        return (
            f"torch computes with {threads} threads but this process may use only {cores} "
            f"core{'s' if cores != 1 else ''} (CPU affinity and cgroup quota); the threads will "
            f"wait on each other: {ADVICE}, with at most {cores}."
        )
    if load is None or threads == 1:
        return None  # one thread is the least there is to advise
    # The load counts this process's own busy thread: it has been starting up.
    others = max(load - 1.0, 0.0)
    if others + threads > cores + 0.5:
        return (
            f"torch computes with {threads} threads on {cores} usable cores, but other "
            f"processes already keep about {others:.1f} of them busy (load average "
            f"{load:.1f}); runs that share cores fight over them and each slows several-fold: "
            f"{ADVICE}."
        )
    return None


def warn_if_oversubscribed(
    threads: int | None = None,
    cores: int | None = None,
    load: float | Literal["read"] | None = "read",
) -> str | None:
    """Warns (on rank 0) when this process has more threads than the cores it can have.

    Args:
        threads: The intra-op threads (default: ``torch.get_num_threads()``).
        cores: The usable cores (default: :func:`usable_cores`).
        load: The machine's load average, None to ignore it (default: :func:`machine_load`).

    Returns:
        The warning's message, or None when there was nothing to warn about.
    """
    threads = torch.get_num_threads() if threads is None else threads
    cores = usable_cores() if cores is None else cores
    measured = machine_load() if load == "read" else load
    message = oversubscription(
        threads, cores, measured if isinstance(measured, float | int) else None
    )
    if message is not None:
        rank_zero_warn(message)
    return message
