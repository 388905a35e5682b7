"""Page faults and CPU time per meta-step with glibc's malloc as the system leaves it, and as a
CPU fit sets it (``lightning_maml.cpu.keep_freed_memory``).

Each setting runs in its own process (malloc's parameters belong to the process), the two
alternating for ``--rounds`` rounds; each process times ``--steps`` meta-steps of each row
after a warm-up and reports, per step, the minor page faults, the system and user CPU time
(``resource.getrusage``), and the fastest step by the process's CPU clock.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/malloc.py --rows MAML FOMAML loop-MAML --inner-steps 1 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import speed

from lightning_maml.cpu import cpu_name, keep_freed_memory


def measure(rows: list[str], inner_steps: list[int], steps: int, malloc: str) -> list[dict]:
    """This process's figures per row and inner-step count."""
    torch.set_num_threads(1)
    if malloc == "keep" and not keep_freed_memory():
        raise SystemExit("malloc keep: glibc's parameters could not be set here (not glibc?)")
    args = speed.parse_args(["--setup", "omniglot", "--meta-batch-size", "4", "--threads", "1"])
    results = []
    for k in inner_steps:
        for label in rows:
            model, loss_fn, batch, inner_lr = speed.make_setup("omniglot", torch.device("cpu"), 4)
            step = speed.step_fn(label, model, loss_fn, batch, inner_lr, k, args)
            for _ in range(3):
                step()
            before, fastest = resource.getrusage(resource.RUSAGE_SELF), float("inf")
            for _ in range(steps):
                start = time.process_time()
                step()
                fastest = min(fastest, time.process_time() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            results.append(
                {
                    "row": label,
                    "inner_steps": k,
                    "malloc": malloc,
                    "faults": (after.ru_minflt - before.ru_minflt) / steps,
                    "sys_ms": (after.ru_stime - before.ru_stime) / steps * 1e3,
                    "user_ms": (after.ru_utime - before.ru_utime) / steps * 1e3,
                    "min_ms": fastest * 1e3,
                }
            )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=["MAML", "FOMAML", "loop-MAML"])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--steps", type=int, default=8, help="timed meta-steps per row")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["keep", "system"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.rows, args.inner_steps, args.steps, args.child)))
        return
    print(f"cpu: {cpu_name()}; torch={torch.__version__}; one thread; CPU clock")
    best: dict[tuple, dict] = {}
    for _ in range(args.rounds):
        for malloc in ("system", "keep"):
            command = [sys.executable, __file__, "--child", malloc, "--steps", str(args.steps)]
            command += ["--rows", *args.rows, "--inner-steps", *map(str, args.inner_steps)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            for r in json.loads(out.strip().splitlines()[-1]):
                key = (r["row"], r["inner_steps"], r["malloc"])
                if key not in best or r["min_ms"] < best[key]["min_ms"]:
                    best[key] = r
    print(
        f"{'row':<12}{'steps':>6}{'malloc':>8}{'faults':>9}{'sys ms':>8}{'user ms':>9}{'min ms':>9}"
    )
    for (row, k, malloc), r in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(
            f"{row:<12}{k:>6}{malloc:>8}{r['faults']:>9.0f}{r['sys_ms']:>8.1f}"
            f"{r['user_ms']:>9.1f}{r['min_ms']:>9.1f}"
        )


if __name__ == "__main__":
    main()
