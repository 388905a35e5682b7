"""Milliseconds per meta-step and peak memory of each variant, against a clone-and-adapt loop.

The reference adapts task by task in a Python loop on a clone of the model whose parameters
are graph tensors (what learn2learn's ``MAML.clone()`` / ``adapt()`` do), then backpropagates
the summed query losses. Every row of one run is measured in the same process on the same
machine, so the ratios are side by side.

Usage::

    python benchmarks/speed.py --setup sinusoid            # CPU goal: >= 2.5x faster than the loop
    python benchmarks/speed.py --setup omniglot --device cuda --inner-steps 1 5
    python benchmarks/speed.py --setup sinusoid --trainer  # adds the Lightning Trainer loop
    python benchmarks/speed.py --setup omniglot --compile --bf16 --variants MAML FOMAML HFMAML

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU each case runs in a
fresh subprocess and reports its peak resident-set growth (``ru_maxrss``), a coarser measure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_maml import FOMAML, HFMAML, MAML, MetaAlgorithm, TaskBatch
from lightning_maml.models import MLP, ConvNet

VARIANTS = ["MAML", "FOMAML", "HFMAML", "loop-MAML", "loop-FOMAML"]


def make_setup(name: str, device: torch.device, meta_batch_size: int | None):
    """Model, loss, task batch and inner_lr of a benchmark setup."""
    g = torch.Generator().manual_seed(0)
    if name == "sinusoid":
        tasks = meta_batch_size or 25
        x = torch.rand(tasks, 20, 1, generator=g) * 10 - 5
        y = torch.sin(x)
        batch = TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
        return MLP(), nn.functional.mse_loss, batch.to(device), 0.01
    if name == "omniglot":
        tasks, ways, queries = meta_batch_size or 32, 5, 15
        x = torch.rand(tasks, ways * (1 + queries), 1, 28, 28, generator=g)
        y = torch.arange(ways).repeat(1 + queries).expand(tasks, -1)
        s = ways
        batch = TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])
        return ConvNet(1, ways, 64, 28), nn.functional.cross_entropy, batch.to(device), 0.4
    raise ValueError(f"unknown setup {name!r}: use sinusoid or omniglot")


def clone_module(module: nn.Module) -> nn.Module:
    """A shallow copy whose parameters are differentiable clones (learn2learn's clone_module)."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    clone._buffers = module._buffers.copy()
    clone._modules = {k: clone_module(m) for k, m in module._modules.items()}
    return clone


def loop_step(
    model: nn.Module, loss_fn, batch: TaskBatch, inner_lr: float, steps: int, first_order: bool
):
    """One meta-gradient by cloning and adapting task by task (the reference)."""
    model.zero_grad()
    for i in range(batch.num_tasks):
        learner = clone_module(model)
        for _ in range(steps):
            params = [p for m in learner.modules() for p in m._parameters.values() if p is not None]
            loss = loss_fn(learner(batch.support_x[i]), batch.support_y[i])
            grads = torch.autograd.grad(loss, params, create_graph=not first_order)
            grads = iter(grads)
            for m in learner.modules():
                for k, p in m._parameters.items():
                    if p is not None:
                        g = next(grads)
                        m._parameters[k] = p - inner_lr * (g.detach() if first_order else g)
        (loss_fn(learner(batch.query_x[i]), batch.query_y[i]) / batch.num_tasks).backward()


def make_algorithm(variant: str, inner_lr: float, steps: int, args) -> MetaAlgorithm:
    chunk = "auto" if args.chunk is None else (None if args.chunk == 0 else args.chunk)
    return {"MAML": MAML, "FOMAML": FOMAML, "HFMAML": HFMAML}[variant](
        inner_lr, inner_steps=steps, task_chunk_size=chunk, compile=args.compile
    )


def autocast(args) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``--bf16`` (what ``precision="bf16-mixed"`` does in the Trainer)."""
    return torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.bf16)


def step_fn(variant: str, model, loss_fn, batch, inner_lr, steps, args) -> Callable[[], None]:
    if variant.startswith("loop-"):
        first_order = variant == "loop-FOMAML"
        step = functools.partial(loop_step, model, loss_fn, batch, inner_lr, steps, first_order)
    else:
        algorithm = make_algorithm(variant, inner_lr, steps, args)
        step = functools.partial(algorithm.meta_gradient, model, loss_fn, batch)

    def run() -> None:
        with autocast(args):
            step()

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args, variant: str, steps: int) -> dict:
    device = torch.device(args.device)
    model, loss_fn, batch, inner_lr = make_setup(args.setup, device, args.meta_batch_size)
    model = model.to(device)
    step = step_fn(variant, model, loss_fn, batch, inner_lr, steps, args)
    rss_before = rss_bytes()
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**20
    return {
        "variant": variant,
        "inner_steps": steps,
        "ms": statistics.median(times),
        "peak_mib": peak,
    }


def measure_trainer(args, variant: str, steps: int) -> dict:
    """The same step through a full Lightning Trainer loop, and the same done by hand."""
    import lightning as L

    from datamodules.base import MetaDataModule
    from lightning_maml import MetaLearner
    from lightning_maml.callbacks import GradNormMonitor

    device = torch.device(args.device)
    model, loss_fn, batch, inner_lr = make_setup(args.setup, device, args.meta_batch_size)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield batch

    class Fixed(MetaDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(Repeat(), batch_size=None)

    algorithm = make_algorithm(variant, inner_lr, steps, args)
    n = args.warmup + args.repeats
    learner = MetaLearner(model, algorithm, loss_fn)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if args.bf16 else "32-true",
        max_steps=n,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    stamps = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, *a, **k):
            sync(device)
            stamps.append(time.perf_counter())

    trainer.callbacks.append(Stamp())
    if args.monitor:
        # As the recipes have it; it logs on the Trainer's logging steps (every 50 here).
        trainer.callbacks.append(GradNormMonitor(group_by="layer"))
    trainer.fit(learner, datamodule=Fixed(meta_batch_size=batch.num_tasks))
    loop_ms = (stamps[-1] - stamps[args.warmup - 1]) / args.repeats * 1e3

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(n):
        start = time.perf_counter()
        with autocast(args):
            result = algorithm.meta_gradient(model, loss_fn, batch)
        for name, p in model.named_parameters():
            p.grad = result.grads[name]
        optimizer.step()
        sync(device)
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    direct_ms = sum(times) / len(times)
    return {"variant": variant, "inner_steps": steps, "trainer_ms": loop_ms, "direct_ms": direct_ms}


def run_isolated(args, variant: str, steps: int) -> dict:
    """Runs one case in a fresh interpreter so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--one", variant, "--one-steps", str(steps)]
    for key in ("setup", "device", "repeats", "warmup", "meta_batch_size", "chunk", "threads"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    cmd += ["--bf16"] if args.bf16 else []
    cmd += [] if args.compile is False else ["--compile", str(args.compile)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", default="sinusoid", choices=["sinusoid", "omniglot"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--meta-batch-size", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None, help="task_chunk_size; 0 = all tasks")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--trainer", action="store_true", help="also time the Lightning loop")
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        type=lambda mode: True if mode == "True" else mode,
        help="torch.compile each variant (optionally the mode max-autotune-no-cudagraphs)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (bf16-mixed)")
    parser.add_argument(
        "--monitor",
        action="store_true",
        help="the Trainer loop with GradNormMonitor, as in recipes",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one-steps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one:
        print(json.dumps(measure(args, args.one, args.one_steps)))
        return
    isolate = args.device == "cpu"
    rows = []
    print(
        f"setup={args.setup} device={args.device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} bf16={args.bf16} compile={args.compile}"
    )
    print(f"{'variant':<12}{'steps':>6}{'ms/step':>10}{'peak MiB':>10}{'vs loop':>9}")
    for steps in args.inner_steps:
        block = []
        for variant in args.variants:
            row = run_isolated(args, variant, steps) if isolate else measure(args, variant, steps)
            block.append(row)
        loops = {r["variant"][5:]: r["ms"] for r in block if r["variant"].startswith("loop-")}
        for row in block:
            base = loops.get("FOMAML" if row["variant"] == "FOMAML" else "MAML")
            row["speedup_vs_loop"] = (
                base / row["ms"] if base and not row["variant"].startswith("loop") else None
            )
            ratio = f"{row['speedup_vs_loop']:.1f}x" if row["speedup_vs_loop"] else ""
            print(
                f"{row['variant']:<12}{steps:>6}{row['ms']:>10.1f}{row['peak_mib']:>10.1f}{ratio:>9}"
            )
        rows += block
        if args.trainer:
            for variant in [v for v in args.variants if not v.startswith("loop")]:
                t = measure_trainer(args, variant, steps)
                overhead = t["trainer_ms"] / t["direct_ms"] - 1
                print(
                    f"  Trainer loop {variant}: {t['trainer_ms']:.1f} ms vs direct {t['direct_ms']:.1f} ms ({overhead:+.0%})"
                )
                rows.append(t)
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
