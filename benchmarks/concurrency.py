"""Two recipe runs at once on a shared CPU, each against one run alone, with and without ``threads``.

Each run is a whole ``lightning-maml fit`` process (start-up included, as a user waits for it)
of a recipe, by default the sinusoid MAML recipe for 600 steps, logging CSV into a temporary
folder. Two settings are compared: torch's default threads (one per core, ``--threads null``
and no ``OMP_NUM_THREADS``) and the recipe's ``threads: 1``. For each setting one run goes
alone, then two go at once. The four cases are interleaved over ``--rounds`` so that the
machine's other work slows them alike; each case reports its fastest round, and each concurrent
run its ratio to the run alone (the slower of the two, in the round where it was fastest).

Usage::

    python benchmarks/concurrency.py                          # sinusoid MAML, 600 steps, 3 rounds
    python benchmarks/concurrency.py --rounds 5 --output concurrency.json
    python benchmarks/concurrency.py --config recipes/theory/maml.yaml --steps 1000

Wall-clock seconds are what a user waits; the CPU seconds (user + system, from the process's
resource usage) show the threads spinning: two runs that fight over the cores burn far more CPU
time than the work needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_maml.cpu import cpu_name  # noqa: E402
from lightning_maml.threads import machine_load, usable_cores  # noqa: E402

#: The settings compared: the value given to ``--threads`` (null: torch's default).
SETTINGS = {"default": "null", "threads=1": "1"}


def command(config: str, steps: int, threads: str, folder: str) -> list[str]:
    """The ``lightning-maml fit`` command line of one run, writing only into ``folder``."""
    return [
        sys.executable,
        "-m",
        "lightning_maml.cli",
        "fit",
        "--config",
        config,
        f"--threads={threads}",
        f"--trainer.max_steps={steps}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={folder}",
        f"--trainer.default_root_dir={folder}",
        "--trainer.enable_progress_bar=false",
    ]


def run_together(commands: list[list[str]], folder: Path, timeout: float) -> list[dict]:
    """Starts every command at once and waits for all; each one's wall and CPU seconds.

    A run still going after ``timeout`` seconds is stopped and reported with ``timed_out``
    (its seconds are then a lower bound).
    """
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("WANDB_MODE", "offline")
    with contextlib.ExitStack() as stack:
        runs = []
        for i, line in enumerate(commands):
            log = stack.enter_context(open(folder / f"run{i}.log", "w"))
            runs.append(subprocess.Popen(line, stdout=log, stderr=log, env=env, cwd=ROOT))
        start = time.perf_counter()
        results: dict[int, dict] = {}
        while len(results) < len(runs):
            # wait4 gives each child's own CPU time, which Popen.wait does not.
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                if time.perf_counter() - start > timeout:
                    for process in runs:
                        if process.returncode is None:
                            process.kill()
                time.sleep(0.05)
                continue
            for i, process in enumerate(runs):
                if process.pid == pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    wall = time.perf_counter() - start
                    results[i] = {
                        "wall_s": min(wall, timeout) if wall > timeout else wall,
                        "cpu_s": usage.ru_utime + usage.ru_stime,
                        "timed_out": wall > timeout,
                    }
    for i, process in enumerate(runs):
        if process.returncode and not results[i]["timed_out"]:
            tail = (folder / f"run{i}.log").read_text()[-2000:]
            raise RuntimeError(f"run {i} failed ({process.returncode}):\n{tail}")
    return [results[i] for i in range(len(runs))]


def measure(args: argparse.Namespace) -> dict:
    """Every case's rounds: ``{setting: {"alone": [...], "pair": [[a, b], ...]}}``."""
    rounds: dict[str, dict[str, list]] = {s: {"alone": [], "pair": []} for s in args.settings}
    for r in range(args.rounds):
        for setting in args.settings:
            threads = SETTINGS[setting]
            for case, copies in (("alone", 1), ("pair", 2)):
                with tempfile.TemporaryDirectory() as tmp:
                    folder = Path(tmp)
                    lines = [
                        command(args.config, args.steps, threads, str(folder / f"out{i}"))
                        for i in range(copies)
                    ]
                    result = run_together(lines, folder, args.timeout)
                rounds[setting][case].append(result if copies > 1 else result[0])
                seconds = " ".join(
                    f"{'>' if x['timed_out'] else ''}{x['wall_s']:.1f}" for x in result
                )
                print(f"round {r + 1} {setting:<10} {case:<6} {seconds} s", flush=True)
    return rounds


def summary(rounds: dict) -> list[dict]:
    """One row per setting: fastest alone, fastest pair (by its slower run), and the ratio."""
    rows = []
    for setting, cases in rounds.items():
        alone = min(cases["alone"], key=lambda x: x["wall_s"])
        pair = min(cases["pair"], key=lambda p: max(x["wall_s"] for x in p))
        slower = max(pair, key=lambda x: x["wall_s"])
        rows.append(
            {
                "setting": setting,
                "alone_s": alone["wall_s"],
                "alone_cpu_s": alone["cpu_s"],
                "pair_s": [x["wall_s"] for x in pair],
                "pair_cpu_s": [x["cpu_s"] for x in pair],
                "ratio": slower["wall_s"] / alone["wall_s"],
                "timed_out": any(x["timed_out"] for x in [alone, *pair]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "recipes" / "sinusoid" / "maml.yaml"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="compared"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before a run is stopped (a bound)"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the rounds as JSON")
    args = parser.parse_args(argv)
    load = machine_load()
    print(
        f"{Path(args.config).name}, {args.steps} steps, {args.rounds} rounds; CPU {cpu_name()}, "
        f"{usable_cores()} usable cores, load average "
        f"{'unknown' if load is None else f'{load:.1f}'} at the start"
    )
    rounds = measure(args)
    rows = summary(rounds)
    print(
        f"{'setting':<10}{'alone s':>9}{'pair s (each)':>16}{'pair/alone':>12}{'CPU s alone/pair':>22}"
    )
    for row in rows:
        pair = " ".join(f"{s:.1f}" for s in row["pair_s"])
        cpu = f"{row['alone_cpu_s']:.1f} / " + " ".join(f"{s:.1f}" for s in row["pair_cpu_s"])
        # A run stopped at --timeout gives a bound, not a ratio.
        ratio = ("~" if row["timed_out"] else "") + f"{row['ratio']:.2f}x"
        print(f"{row['setting']:<10}{row['alone_s']:>9.1f}{pair:>16}{ratio:>12}{cpu:>22}")
    if args.output:
        record = {"cpu": cpu_name(), "config": args.config, "steps": args.steps, "rows": rows}
        args.output.write_text(json.dumps({**record, "rounds": rounds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
