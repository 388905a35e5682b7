"""Milliseconds per meta-step and peak memory of each variant, against a clone-and-adapt loop.

The reference adapts task by task in a Python loop on a clone of the model whose parameters
are graph tensors (what learn2learn's ``MAML.clone()`` / ``adapt()`` do), then backpropagates
the summed query losses. All rows of one run are measured in one process and interleaved: each
round times one step of every variant in turn, and a row reports the fastest of its rounds, so
that a machine shared with other jobs slows the compared rows alike.

Usage::

    python benchmarks/speed.py --setup sinusoid            # the MLP rows against the loop
    python benchmarks/speed.py --setup omniglot --meta-batch-size 4 --inner-steps 1 5
    python benchmarks/speed.py --memory-sweep              # Omniglot conv net, 1/5/20/50 steps
    python benchmarks/speed.py --setup sinusoid --recipe recipes/sinusoid/maml.yaml
    python benchmarks/speed.py --setup sinusoid --trainer --monitor
    python benchmarks/speed.py --setup omniglot --compile --bf16 --variants MAML FOMAML HFMAML
    python benchmarks/speed.py --setup omniglot --variants family loop-MAML --inner-steps 1 5
    python benchmarks/speed.py --setup omniglot --meta-batch-size 4 --inner-steps 1 5 \
        --variants MAML FOMAML loop-MAML loop-FOMAML --threads 1 --roofline --clock cpu
    python benchmarks/speed.py --setup omniglot --meta-batch-size 4 --inner-steps 1 5 \
        --variants MAML FOMAML loop-MAML loop-FOMAML l2l-MAML l2l-FOMAML --threads 1 --check

The loop runs on a plain NCHW conv net in the usual block order, as a user would write it
(``--loop-net plain``), or on the very model the variants use (``--loop-net same``).
``--roofline`` adds each row's FLOPs per meta-step (``torch.utils.flop_counter``) and achieved
GFLOP/s, and the machine's own convolution and matmul rates, fp32 and (where the CPU has it
natively) bf16, measured in the same run. ``--clock cpu`` times with the process's CPU clock,
which a machine shared with other jobs disturbs less than the wall clock.

The rows are the variants' own, as the registry lists them (``lightning_maml.variants``: a
registered variant brings its rows), the two reference loops, and, where learn2learn is
installed (it is no dependency of the project; DEVELOPERS.md says how to build it), learn2learn's
own ``MAML.clone()`` / ``adapt()`` on the loop's model and batches (``l2l-MAML``,
``l2l-FOMAML``). learn2learn imports torchvision; where torchvision is absent, empty stand-in
modules take its place (:func:`import_learn2learn`): the algorithms use none of it.

``--check`` compares, in float64 before timing, the meta-gradients of the loops, of the
learn2learn rows and of the variants ``MAML`` and ``FOMAML`` at each ``--inner-steps``, and prints
the largest absolute difference from the loop of the same order.

Every row runs with glibc's malloc keeping freed memory for reuse, as a CPU fit sets it
(``--malloc keep``, :func:`lightning_maml.cpu.keep_freed_memory`); ``--malloc system`` leaves
malloc as the environment has it. ``--double-backward both`` adds, beside each of our rows, the
same row with PyTorch's own double backward of BatchNorm and conv2d instead of
:mod:`lightning_maml.double_backward`'s (label suffix ``[torch 2nd]``), interleaved with it.

Peak memory is what the allocator holds at its highest during one step beyond what was held
before it (model, data): ``torch.cuda.max_memory_allocated`` on a GPU, and on a CPU the
allocator's running total as the torch profiler's memory events report it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch import nn
from torch._C._profiler import _EventType
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_maml import MetaAlgorithm, TaskBatch
from lightning_maml.cpu import cpu_bf16_support, cpu_name, keep_freed_memory
from lightning_maml.double_backward import pytorch_double_backward
from lightning_maml.functional import mse_loss
from lightning_maml.models import MLP, ConvNet
from lightning_maml.variants import SpeedRow, Variant, variants

#: The reference rows: the clone-and-adapt loop, second or first order (the value).
LOOPS = {"loop-MAML": False, "loop-FOMAML": True}
#: learn2learn's MAML on the loop's model, second or first order (the value).
L2L = {"l2l-MAML": False, "l2l-FOMAML": True}
#: The rows compared with a loop rather than measured against one.
REFERENCES = {**LOOPS, **L2L}
#: The memory sweep's rows, by label.
SWEEP_VARIANTS = ["MAML", "MAML-recursion", "MAML-recursion-fwd", "HFMAML", "FOMAML"]
SWEEP_STEPS = [1, 5, 20, 50]
#: Goals of the memory sweep: MAML by recursion against FO-MAML's peak and HF-MAML's time.
MEMORY_GOAL, TIME_GOAL = 1.3, 1.2


def rows() -> dict[str, tuple[Variant, SpeedRow]]:
    """Every registered variant's rows by label (read when asked: a variant registered after
    this module was imported has its rows too)."""
    return {row.label: (variant, row) for variant in variants() for row in variant.speed_rows}


def family() -> list[str]:
    """The rows of ``--variants family``."""
    return [label for label, (_, row) in rows().items() if row.family]


def choices() -> list[str]:
    """Every row ``--variants`` takes: the variants', the reference loops and learn2learn's."""
    return [*rows(), *LOOPS, *L2L]


def learn2learn_installed() -> bool:
    """Whether learn2learn can be imported (looked up, not imported)."""
    return importlib.util.find_spec("learn2learn") is not None


class _StubModule(types.ModuleType):
    """An empty module: a lowercase attribute is its submodule, any other an empty class."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        if name[0].islower():
            return importlib.import_module(f"{self.__name__}.{name}")
        stub = type(name, (), {"__module__": self.__name__})
        setattr(self, name, stub)
        return stub


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds :class:`_StubModule` packages for ``root`` and its submodules."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, name: str, path: object = None, target: object = None):
        if name != self.root and not name.startswith(self.root + "."):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


@functools.cache
def import_learn2learn() -> types.ModuleType:
    """learn2learn, imported; empty stand-ins for torchvision where it is not installed.

    learn2learn imports torchvision's datasets and transforms as it is imported, and its
    algorithms use none of them. The stand-ins stay in ``sys.modules``.

    Raises:
        ModuleNotFoundError: learn2learn is not installed.
    """
    if not learn2learn_installed():
        raise ModuleNotFoundError(
            "learn2learn is not installed; DEVELOPERS.md ('Comparing with learn2learn') says how "
            "to build it into a separate virtual environment"
        )
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("learn2learn")
    finder = _StubFinder("torchvision")
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("learn2learn")
    finally:
        sys.meta_path.remove(finder)


def make_setup(name: str, device: torch.device, meta_batch_size: int | None):
    """Model, loss, task batch and inner_lr of a benchmark setup."""
    g = torch.Generator().manual_seed(0)
    if name == "sinusoid":
        tasks = meta_batch_size or 25
        x = torch.rand(tasks, 20, 1, generator=g) * 10 - 5
        y = torch.sin(x)
        batch = TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
        return MLP(), mse_loss, batch.to(device), 0.01
    if name == "omniglot":
        tasks, ways, queries = meta_batch_size or 32, 5, 15
        x = torch.rand(tasks, ways * (1 + queries), 1, 28, 28, generator=g)
        y = torch.arange(ways).repeat(1 + queries).expand(tasks, -1)
        s = ways
        batch = TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])
        return ConvNet(1, ways, 64, 28), nn.functional.cross_entropy, batch.to(device), 0.4
    raise ValueError(f"unknown setup {name!r}: use sinusoid or omniglot")


class PlainConvNet(nn.Module):
    """Finn et al.'s conv net as a user writes it: ``conv - BatchNorm - ReLU - maxpool``
    blocks, NCHW; the parameters of ``model`` (a :class:`ConvNet`), copied."""

    def __init__(self, model: ConvNet) -> None:
        super().__init__()
        blocks = [m for m in model.features if not isinstance(m, nn.ReLU | nn.MaxPool2d)]
        layers: list[nn.Module] = []
        for conv, norm in zip(blocks[0:-1:2], blocks[1::2], strict=True):
            layers += [conv, norm, nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = model.classifier
        self.load_state_dict(copy.deepcopy(model.state_dict()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def loop_model(model: nn.Module, args) -> nn.Module:
    """The model the loop runs on (``--loop-net``)."""
    if args.loop_net == "plain" and isinstance(model, ConvNet):
        return PlainConvNet(model)
    return model


def clone_module(module: nn.Module) -> nn.Module:
    """A shallow copy whose parameters are differentiable clones (learn2learn's clone_module)."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    clone._buffers = module._buffers.copy()
    clone._modules = {k: clone_module(m) for k, m in module._modules.items()}
    return clone


def loop_adapt(
    model: nn.Module, loss_fn, x, y, inner_lr: float, steps: int, first_order: bool
) -> nn.Module:
    """A clone of ``model`` adapted by ``steps`` gradient steps on ``(x, y)``, its parameters
    graph tensors of ``model``'s (learn2learn's ``clone()`` and ``adapt()``)."""
    learner = clone_module(model)
    for _ in range(steps):
        params = [p for m in learner.modules() for p in m._parameters.values() if p is not None]
        grads = iter(
            torch.autograd.grad(loss_fn(learner(x), y), params, create_graph=not first_order)
        )
        for m in learner.modules():
            for k, p in m._parameters.items():
                if p is not None:
                    g = next(grads)
                    m._parameters[k] = p - inner_lr * (g.detach() if first_order else g)
    return learner


def loop_step(
    model: nn.Module, loss_fn, batch: TaskBatch, inner_lr: float, steps: int, first_order: bool
):
    """One meta-gradient by cloning and adapting task by task (the reference)."""
    model.zero_grad()
    for i in range(batch.num_tasks):
        x, y = batch.support_x[i], batch.support_y[i]
        learner = loop_adapt(model, loss_fn, x, y, inner_lr, steps, first_order)
        (loss_fn(learner(batch.query_x[i]), batch.query_y[i]) / batch.num_tasks).backward()


def l2l_step(maml: nn.Module, loss_fn, batch: TaskBatch, steps: int) -> None:
    """One meta-gradient with learn2learn's ``MAML``: ``clone()``, ``adapt()`` on each task."""
    maml.zero_grad()
    for i in range(batch.num_tasks):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(batch.support_x[i]), batch.support_y[i]))
        (loss_fn(learner(batch.query_x[i]), batch.query_y[i]) / batch.num_tasks).backward()


def reference_step(
    label: str, model: nn.Module, loss_fn, batch: TaskBatch, inner_lr: float, steps: int, args
) -> tuple[nn.Module, Callable[[], None]]:
    """One meta-step of the loop or learn2learn row ``label`` on its own copy of the loop's
    model (``--loop-net``), and that copy, whose ``.grad`` the step fills."""
    net = loop_model(model, args)
    if net is model:
        net = copy.deepcopy(model)
    if label in LOOPS:
        step = functools.partial(loop_step, net, loss_fn, batch, inner_lr, steps, LOOPS[label])
        return net, step
    maml = import_learn2learn().algorithms.MAML(net, lr=inner_lr, first_order=L2L[label])
    return net, functools.partial(l2l_step, maml, loss_fn, batch, steps)


def make_algorithm(
    label: str, inner_lr: float, steps: int, args, model: nn.Module
) -> MetaAlgorithm:
    """The algorithm of row ``label``, with a fresh inner update (an update is bound to one
    model, and each row gets its own) built for ``model``."""
    chunk = "auto" if args.chunk is None else (None if args.chunk == 0 else args.chunk)
    variant, row = rows()[label]
    update = row.inner_update(model) if row.inner_update else variant.new_inner_update()
    options = dict(row.options)
    if update is not None:
        options["inner_update"] = update
    cls = row.algorithm or variant.algorithm
    return cls(inner_lr, inner_steps=steps, task_chunk_size=chunk, compile=args.compile, **options)


def autocast(args) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``--bf16`` (what ``precision="bf16-mixed"`` does in the Trainer)."""
    return torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.bf16)


#: The suffix of a row run with PyTorch's own double backward (``--double-backward both``).
TORCH_SECOND = " [torch 2nd]"


def step_fn(label: str, model, loss_fn, batch, inner_lr, steps, args) -> Callable[[], None]:
    """One meta-step of row ``label``, ready to be timed."""
    if label.endswith(TORCH_SECOND):
        inner = step_fn(
            label.removesuffix(TORCH_SECOND), model, loss_fn, batch, inner_lr, steps, args
        )

        def torch_second() -> None:
            with pytorch_double_backward():
                inner()

        return torch_second
    if label in REFERENCES:
        _, step = reference_step(label, model, loss_fn, batch, inner_lr, steps, args)
    else:
        algorithm = make_algorithm(label, inner_lr, steps, args, model)
        algorithm.bind(model)
        step = functools.partial(algorithm.meta_gradient, model, loss_fn, batch)

    def run() -> None:
        with autocast(args):
            step()

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(step: Callable[[], None], device: torch.device) -> float:
    """The allocator's peak during one call of ``step``, beyond what was held before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # The profiler's CPU allocation events carry the allocator's running total of what was
    # allocated since profiling began (frees of older tensors are not counted).
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak / 2**20


def clock(args) -> Callable[[], float]:
    """Seconds by the wall clock or the process's CPU clock (``--clock``)."""
    return time.process_time if args.clock == "cpu" else time.perf_counter


def meta_step_flops(step: Callable[[], None]) -> int:
    """The floating-point operations of one call of ``step``, as torch.utils.flop_counter
    counts them (matmuls and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _rate(fn: Callable[[], object], flops: float, args) -> float:
    """GFLOP/s of ``fn``: the fastest of a few timed calls after a warm-up."""
    tick = clock(args)
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(max(5, args.repeats)):
        start = tick()
        fn()
        best = min(best, tick() - start)
    return flops / best / 1e9


def machine_rates(args) -> dict[str, float]:
    """The machine's own convolution and matmul rates, GFLOP/s, fp32 and (where native) bf16.

    The convolution has the shape of the Omniglot net's second layer on a query set (75
    images, 64 -> 64 channels, 3x3, 14x14); the matmul is 1024 x 1024 x 1024.
    """
    device = torch.device(args.device)
    rates = {}
    dtypes = [torch.float32]
    if device.type != "cpu" or cpu_bf16_support():
        dtypes.append(torch.bfloat16)
    for dtype in dtypes:
        name = "fp32" if dtype == torch.float32 else "bf16"
        x = torch.randn(75, 64, 14, 14, device=device, dtype=dtype)
        w = torch.randn(64, 64, 3, 3, device=device, dtype=dtype)
        conv_flops = 2 * 75 * 64 * 14 * 14 * 64 * 9
        rates[f"conv_{name}"] = _rate(
            lambda x=x, w=w: (nn.functional.conv2d(x, w, padding=1), sync(device)), conv_flops, args
        )
        a = torch.randn(1024, 1024, device=device, dtype=dtype)
        rates[f"matmul_{name}"] = _rate(lambda a=a: (a @ a, sync(device)), 2 * 1024**3, args)
    return rates


def measure_block(args, variants: list[str], steps: int) -> list[dict]:
    """Times every variant at ``steps`` inner steps in interleaved rounds; peak memory of each."""
    device = torch.device(args.device)
    model, loss_fn, batch, inner_lr = make_setup(args.setup, device, args.meta_batch_size)
    model = model.to(device)
    if args.double_backward == "both":
        # Beside each of our rows, the same row with PyTorch's own double backward.
        paired = []
        for v in variants:
            paired += [v] if v in REFERENCES else [v, v + TORCH_SECOND]
        variants = paired
    runs = {v: step_fn(v, model, loss_fn, batch, inner_lr, steps, args) for v in variants}
    for run in runs.values():
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {v: [] for v in variants}
    tick = clock(args)
    for _ in range(args.repeats):
        for variant, run in runs.items():
            sync(device)
            start = tick()
            run()
            sync(device)
            times[variant].append((tick() - start) * 1e3)
    block = [
        {
            "variant": v,
            "inner_steps": steps,
            "ms": min(times[v]),
            "median_ms": statistics.median(times[v]),
            "peak_mib": peak_memory_mib(runs[v], device),
        }
        for v in variants
    ]
    if args.roofline:
        for row in block:
            row["gflop"] = meta_step_flops(runs[row["variant"]]) / 1e9
            row["gflop_per_s"] = row["gflop"] / row["ms"] * 1e3
    return block


def check_gradients(args) -> list[dict]:
    """The largest absolute difference of each reference row's and of MAML's and FOMAML's
    meta-gradient from the loop of the same order, in float64, at each ``--inner-steps``."""
    device = torch.device(args.device)
    model, loss_fn, batch, inner_lr = make_setup(args.setup, device, args.meta_batch_size)
    model = model.to(device, torch.float64)
    tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    batch = TaskBatch(*(t.double() if t.is_floating_point() else t for t in tensors))
    labels = [*LOOPS, *(L2L if learn2learn_installed() else {}), "MAML", "FOMAML"]
    print("meta-gradients against the loop of the same order, float64, largest |difference|:")
    results = []
    for steps in args.inner_steps:
        grads = {}
        for label in labels:
            if label in REFERENCES:
                net, step = reference_step(label, model, loss_fn, batch, inner_lr, steps, args)
                step()
                grads[label] = {n: p.grad.clone() for n, p in net.named_parameters()}
            else:
                algorithm = make_algorithm(label, inner_lr, steps, args, model)
                algorithm.bind(model)
                grads[label] = dict(algorithm.meta_gradient(model, loss_fn, batch).grads)
        for label in labels:
            if label in LOOPS:
                continue
            loop = "loop-FOMAML" if label.endswith("FOMAML") else "loop-MAML"
            diff = max((grads[label][n] - g).abs().max().item() for n, g in grads[loop].items())
            scale = max(g.abs().max().item() for g in grads[loop].values())
            print(f"  {label:<12} {steps:>3} steps: {diff:.2e} (largest |gradient| {scale:.2e})")
            results.append({"variant": label, "inner_steps": steps, "max_abs_diff": diff})
    return results


def print_block(rows: list[dict]) -> None:
    """Prints a block's rows, each with its speed-up over the loop and over learn2learn.

    A row is compared with the loop (and learn2learn's row) of its own name (FOMAML, and
    learn2learn's FOMAML), the others with MAML's; the loops and learn2learn's rows have no
    speed-up over learn2learn, and the loops none over the loop.
    """
    loops = {r["variant"].removeprefix("loop-"): r["ms"] for r in rows if r["variant"] in LOOPS}
    l2l = {r["variant"].removeprefix("l2l-"): r["ms"] for r in rows if r["variant"] in L2L}
    for row in rows:
        name = row["variant"].removeprefix("l2l-").removesuffix(TORCH_SECOND)
        key = name if name in loops or name in l2l else "MAML"
        base = loops.get(key)
        row["speedup_vs_loop"] = base / row["ms"] if base and row["variant"] not in LOOPS else None
        base = l2l.get(key)
        row["speedup_vs_l2l"] = (
            base / row["ms"] if base and row["variant"] not in REFERENCES else None
        )
        keys = ["speedup_vs_loop", "speedup_vs_l2l"] if l2l else ["speedup_vs_loop"]
        ratio = "".join(f"{f'{row[k]:.2f}x' if row[k] else '':>9}" for k in keys)
        roofline = ""
        if "gflop" in row:
            roofline = f"{row['gflop']:>9.2f}{row['gflop_per_s']:>9.1f}"
        print(
            f"{row['variant']:<20}{row['inner_steps']:>6}{row['ms']:>10.1f}{row['median_ms']:>10.1f}"
            f"{row['peak_mib']:>10.1f}{ratio}{roofline}"
        )


def memory_sweep(args) -> list[dict]:
    """Peak memory and time of each variant over inner steps, and the goals of MAML by recursion."""
    rows, verdicts = [], []
    print(f"{'variant':<20}{'steps':>6}{'min ms':>10}{'med ms':>10}{'peak MiB':>10}")
    for steps in args.inner_steps:
        block = measure_block(args, args.variants, steps)
        print_block(block)
        rows += block
        by = {r["variant"]: r for r in block}
        if {"MAML-recursion", "FOMAML", "HFMAML"} <= by.keys():
            memory = by["MAML-recursion"]["peak_mib"] / by["FOMAML"]["peak_mib"]
            speed = by["MAML-recursion"]["ms"] / by["HFMAML"]["ms"]
            verdicts.append((steps, memory, speed))
    if verdicts:
        print(
            f"\nMAML by recursion against its goals ({MEMORY_GOAL}x FO-MAML's peak memory, "
            f"{TIME_GOAL}x HF-MAML's time per step):"
        )
        for steps, memory, speed in verdicts:
            print(
                f"  {steps:>3} inner steps: memory {memory:.2f}x FO-MAML "
                f"({'met' if memory <= MEMORY_GOAL else 'not met'}), time {speed:.2f}x HF-MAML "
                f"({'met' if speed <= TIME_GOAL else 'not met'})"
            )
    return rows


class Stamps(Callback):
    """Notes the time at the end of every training step."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def on_train_batch_end(self, *args, **kwargs) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())


def measure_trainer(args, variant: str, steps: int) -> dict:
    """The same step through a full Lightning Trainer loop, and the same done by hand."""
    import lightning as L

    from lightning_maml import MetaLearner
    from lightning_maml.callbacks import GradNormMonitor
    from lightning_maml.datamodules.base import MetaDataModule

    device = torch.device(args.device)
    model, loss_fn, batch, inner_lr = make_setup(args.setup, device, args.meta_batch_size)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield batch

    class Fixed(MetaDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(Repeat(), batch_size=None)

    algorithm = make_algorithm(variant, inner_lr, steps, args, model)
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
    stamps = Stamps(device)
    trainer.callbacks.append(stamps)
    if args.monitor:
        # As the recipes have it; it logs on the Trainer's logging steps (every 50 here).
        trainer.callbacks.append(GradNormMonitor(group_by="layer"))
    trainer.fit(learner, datamodule=Fixed(meta_batch_size=batch.num_tasks))
    stamps = stamps.times
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


def measure_recipe(args, recipe: Path) -> dict:
    """A recipe's training loop as shipped (logger, callbacks, progress bar, data) vs its bare step.

    The recipe runs through the ``lightning-maml`` CLI's own class for ``--recipe-steps``
    meta-steps (W&B offline, into a temporary folder), timed from the end of the first step to
    the end of the last, so that set-up is excluded and the loggers' periodic writes are
    included. The bare step is the recipe's algorithm on one of its own batches. Both are means
    over their steps; the two are interleaved ``--recipe-rounds`` times and each reports its
    fastest round.
    """
    from lightning_maml.cli import MetaCLI

    # This script's own command line is not meant for the CLI; it is given its arguments.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    loop, bare = [], []
    for _ in range(args.recipe_rounds):
        with tempfile.TemporaryDirectory() as folder:
            cli = MetaCLI(
                args=[
                    "--config",
                    str(recipe),
                    "--trainer.max_steps",
                    str(args.recipe_steps),
                    "--trainer.default_root_dir",
                    folder,
                    "--trainer.logger.init_args.save_dir",
                    folder,
                    "--trainer.accelerator",
                    torch.device(args.device).type,
                    *args.recipe_args,
                ],
                run=False,
            )
            stamps = Stamps(torch.device(args.device))
            cli.trainer.callbacks.append(stamps)
            # The progress bar draws as it would in a terminal, into a file.
            with (
                open(Path(folder) / "output.txt", "w") as output,
                contextlib.redirect_stdout(output),
                contextlib.redirect_stderr(output),
            ):
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            stamps = stamps.times
            loop.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3)
            for logger in cli.trainer.loggers:
                if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
                    logger.experiment.finish()

            learner, data = cli.model, cli.datamodule
            batch = next(iter(data.train_dataloader())).to(learner.device)
            for _ in range(args.warmup):
                learner.algorithm.meta_gradient(learner.model, learner.loss_fn, batch)
            start, n = time.perf_counter(), args.recipe_steps // 4
            for _ in range(n):
                learner.algorithm.meta_gradient(learner.model, learner.loss_fn, batch)
            sync(torch.device(args.device))
            bare.append((time.perf_counter() - start) / n * 1e3)
    return {"recipe": str(recipe), "loop_ms": min(loop), "bare_ms": min(bare)}


def add_malloc_argument(parser: argparse.ArgumentParser) -> None:
    """``--malloc keep|system``, which :func:`set_malloc` applies (this script's and
    ``bf16_check.py``'s)."""
    parser.add_argument(
        "--malloc",
        choices=["keep", "system"],
        default="keep",
        help="keep: glibc keeps freed memory for reuse, as a CPU fit sets it (lightning_maml.cpu."
        "keep_freed_memory), for every row; system: malloc as the environment leaves it",
    )


def set_malloc(args: argparse.Namespace) -> None:
    """Sets malloc as ``args.malloc`` says, before anything is timed."""
    if args.malloc == "keep":
        keep_freed_memory()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``--variants`` expanded and the defaults of the chosen mode."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", default="sinusoid", choices=["sinusoid", "omniglot"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=None)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=[*choices(), "family"],
        help=f"rows to measure; 'family' for the MAML family's ({', '.join(family())})",
    )
    parser.add_argument("--meta-batch-size", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None, help="task_chunk_size; 0 = all tasks")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--memory-sweep",
        action="store_true",
        help=f"Omniglot conv net over inner steps {SWEEP_STEPS}: {', '.join(SWEEP_VARIANTS)}",
    )
    parser.add_argument("--trainer", action="store_true", help="also time the Lightning loop")
    parser.add_argument(
        "--monitor",
        action="store_true",
        help="the Trainer loop with GradNormMonitor, as in recipes",
    )
    parser.add_argument(
        "--recipe", type=Path, default=None, help="time this recipe's loop as shipped"
    )
    parser.add_argument("--recipe-steps", type=int, default=400)
    parser.add_argument("--recipe-rounds", type=int, default=3)
    parser.add_argument(
        "--recipe-arg",
        action="append",
        default=[],
        dest="recipe_args",
        help="one more CLI argument for the recipe's run, as --recipe-arg=--trainer.logger=false",
    )
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
        "--roofline",
        action="store_true",
        help="FLOPs and GFLOP/s per row, and the machine's conv and matmul rates",
    )
    parser.add_argument(
        "--loop-net",
        default="plain",
        choices=["plain", "same"],
        help="the loop's model: a plain NCHW conv net as a user writes it, or the variants' own",
    )
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="wall clock or process CPU time"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--double-backward",
        choices=["short", "both"],
        default="short",
        help="both: also time each of our rows with PyTorch's own double backward of BatchNorm "
        "and conv2d (lightning_maml.double_backward.pytorch_double_backward), interleaved",
    )
    add_malloc_argument(parser)
    parser.add_argument(
        "--check",
        action="store_true",
        help="first compare the loops', learn2learn's and MAML's / FOMAML's meta-gradients "
        "(float64)",
    )
    parser.add_argument("--output", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.variants and set(args.variants) & L2L.keys() and not learn2learn_installed():
        parser.error(
            "l2l-MAML and l2l-FOMAML need learn2learn, which is not installed here (it is no "
            "dependency of lightning-maml); DEVELOPERS.md, 'Comparing with learn2learn', says "
            "how to build it into a separate virtual environment and run this script there"
        )
    if args.memory_sweep:
        args.setup = "omniglot"
        args.variants = args.variants or SWEEP_VARIANTS
        args.inner_steps = args.inner_steps or SWEEP_STEPS
        if args.meta_batch_size is None and args.device == "cpu":
            args.meta_batch_size = 4
    if args.variants and "family" in args.variants:
        members = family()
        args.variants = [*members, *(v for v in args.variants if v not in [*members, "family"])]
    if not args.variants:
        args.variants = [v for v in choices() if v not in L2L or learn2learn_installed()]
    args.inner_steps = args.inner_steps or [1]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_malloc(args)
    rows: list[dict] = []
    print(
        f"setup={args.setup} device={args.device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} meta_batch={args.meta_batch_size or 'default'} "
        f"bf16={args.bf16} compile={args.compile} rounds={args.repeats} clock={args.clock} "
        f"loop_net={args.loop_net} malloc={args.malloc}"
    )
    if args.device == "cpu":
        print(f"cpu: {cpu_name()}; native bf16: {cpu_bf16_support()}")
    if args.check:
        rows.append({"check": check_gradients(args)})
    if args.roofline:
        rates = machine_rates(args)
        print("machine: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
        rows.append({"machine_gflop_per_s": rates})
    if args.recipe:
        r = measure_recipe(args, args.recipe)
        print(
            f"{r['recipe']}: {r['loop_ms']:.2f} ms per meta-step in the loop as shipped, "
            f"{r['bare_ms']:.2f} ms for the bare algorithm step: {r['loop_ms'] / r['bare_ms']:.2f}x"
        )
        rows.append(r)
    elif args.memory_sweep:
        rows = memory_sweep(args)
    else:
        print(
            f"{'variant':<20}{'steps':>6}{'min ms':>10}{'med ms':>10}{'peak MiB':>10}{'vs loop':>9}"
            + (f"{'vs l2l':>9}" if set(args.variants) & L2L.keys() else "")
            + (f"{'GFLOP':>9}{'GFLOP/s':>9}" if args.roofline else "")
        )
        for steps in args.inner_steps:
            block = measure_block(args, args.variants, steps)
            print_block(block)
            rows += block
            if args.trainer:
                for variant in [v for v in args.variants if v not in REFERENCES]:
                    t = measure_trainer(args, variant, steps)
                    ratio = t["trainer_ms"] / t["direct_ms"]
                    print(
                        f"  Trainer loop {variant}: {t['trainer_ms']:.2f} ms vs direct "
                        f"{t['direct_ms']:.2f} ms: {ratio:.2f}x ({ratio - 1:+.0%})"
                    )
                    rows.append(t)
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
