"""Threads chosen, not fought over: the cores a process may use, the warning, the CLI setting."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_maml.cli import main
from lightning_maml.threads import (
    cgroup_cpu_limit,
    oversubscription,
    set_threads,
    usable_cores,
    warn_if_oversubscribed,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SINUSOID = str(RECIPES / "sinusoid" / "maml.yaml")


def cgroup_files(
    tmp_path: Path,
    v2: str | None = None,
    v1: tuple[str, str] | None = None,
    path: str = "/",
) -> dict:
    """A cgroup mount under tmp_path with this process in ``path`` (v2 and v1 alike)."""
    root = tmp_path / "sys"
    v2_dir = root / path.lstrip("/")
    v1_dir = root / "cpu" / path.lstrip("/")
    v2_dir.mkdir(parents=True, exist_ok=True)
    v1_dir.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (v2_dir / "cpu.max").write_text(v2)
    if v1 is not None:
        (v1_dir / "cpu.cfs_quota_us").write_text(v1[0])
        (v1_dir / "cpu.cfs_period_us").write_text(v1[1])
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"12:cpu,cpuacct:{path}\n0::{path}\n")
    return {"root": root, "proc_cgroup": proc}


@pytest.mark.parametrize("path", ["/", "/user.slice/job.scope"])
@pytest.mark.parametrize(
    ("v2", "v1", "expected"),
    [
        ("150000 100000\n", None, 1.5),
        ("max 100000\n", None, None),
        (None, ("200000\n", "100000\n"), 2.0),
        (None, ("-1\n", "100000\n"), None),
        (None, None, None),  # no cgroup files: no limit
        ("garbage\n", ("50000\n", "100000\n"), 0.5),  # v2 unreadable: v1 is read
    ],
)
def test_cgroup_quota_is_read_from_v2_or_v1_in_the_process_own_cgroup(
    tmp_path, v2, v1, path, expected
):
    assert cgroup_cpu_limit(**cgroup_files(tmp_path, v2, v1, path)) == expected


def test_a_quota_on_an_ancestor_cgroup_limits_the_process(tmp_path):
    files = cgroup_files(tmp_path, "max 100000\n", path="/machine.slice/job.scope")
    (files["root"] / "machine.slice" / "cpu.max").write_text("300000 100000\n")
    assert cgroup_cpu_limit(**files) == 3.0
    # The tightest level wins.
    (files["root"] / "machine.slice" / "job.scope" / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_limit(**files) == 1.0


def test_a_quota_on_another_cgroup_does_not_limit_this_process(tmp_path):
    files = cgroup_files(tmp_path, path="/mine")
    (files["root"] / "other").mkdir()
    (files["root"] / "other" / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_limit(**files) is None


def test_usable_cores_are_the_affinity_capped_by_the_quota():
    assert usable_cores(affinity={0, 1, 2, 3}, cgroup_limit=None) == 4
    assert usable_cores(affinity={0, 1, 2, 3}, cgroup_limit=1.5) == 2
    assert usable_cores(affinity={0, 1}, cgroup_limit=8.0) == 2
    assert usable_cores(affinity={3}, cgroup_limit=0.1) == 1


def test_usable_cores_default_to_this_process_affinity():
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_more_threads_than_cores_warns_and_says_what_to_set():
    with pytest.warns(UserWarning, match=r"4 threads .* only 2 cores.*threads: 1.*--threads 1"):
        message = warn_if_oversubscribed(threads=4, cores=2, load=None)
    assert message is not None and "OMP_NUM_THREADS" in message


def test_busy_machine_warns_when_threads_and_others_exceed_the_cores():
    # Two other busy runs plus this starting one: load 3 on 2 cores.
    assert "other processes" in (oversubscription(threads=2, cores=2, load=3.0) or "")
    assert oversubscription(threads=2, cores=4, load=2.0) is None
    assert oversubscription(threads=1, cores=2, load=5.0) is None  # nothing lower to advise


def test_no_warning_when_the_threads_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_oversubscribed(threads=1, cores=2, load=0.0) is None
        assert warn_if_oversubscribed(threads=2, cores=2, load=1.0) is None


def test_set_threads_sets_torch_and_refuses_nonsense():
    set_threads(1)
    assert torch.get_num_threads() == 1
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="threads must be an integer >= 1"):
            set_threads(bad)  # type: ignore[arg-type]


def fit_args(tmp_path: Path) -> list[str]:
    return [
        "fit",
        "--config",
        SINUSOID,
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--data.init_args.num_val_tasks=1",
    ]


def test_the_sinusoid_recipe_runs_on_one_thread(tmp_path):
    torch.set_num_threads(2)
    assert main(fit_args(tmp_path)) is None
    assert torch.get_num_threads() == 1


def test_processes_the_run_starts_inherit_its_threads(tmp_path, monkeypatch):
    # A spawned DDP rank or worker starts torch afresh: it reads OMP_NUM_THREADS.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert main([*fit_args(tmp_path), "--threads=1"]) is None
    child = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "1"


def test_threads_on_the_command_line_override_the_recipe(tmp_path):
    assert main([*fit_args(tmp_path), "--threads=2"]) is None
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_cli_refuses_threads_below_one(tmp_path, capsys, bad):
    assert main([*fit_args(tmp_path), f"--threads={bad}"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "threads must be an integer >= 1" in line and "--threads 1" in line
