"""How fast the Omniglot conv meta-step could get by speeding up its query passes alone.

A meta-step of MAML or FO-MAML is two kinds of work: the *inner part* (each task's inner
steps on its support set, and for MAML the second-order pass back through them) and the
*query part* (each task's query forward and backward at its adapted point). This script times
both apart, interleaved in one process, with the library's whole step and the clone-and-adapt
loop's (speed.py's ``loop-MAML`` / ``loop-FOMAML`` on the plain NCHW net), and derives:

- **Against the loop.** ``floor / loop = (inner + query floor) / loop step``, where the query
  floor is the query part's FLOPs (``torch.utils.flop_counter``) at the machine's best measured
  fp32 rate (the larger of speed.py's convolution and matmul rates, measured in the same run):
  the least ours / loop can be with our inner part as it is, were every convolution of the query
  pass at that rate and its BatchNorm, pooling and ReLU free. ``inner / loop inner`` compares the
  inner parts, which run the same PyTorch kernels on the same 5-image support sets.
- **bf16-mixed.** ``precision="bf16-mixed"`` runs the query part in bf16 and keeps the inner
  part in fp32: in bf16 the inner gradients move the adapted point enough to turn the
  meta-gradient (``bf16_check.py``'s ``inner`` and ``all`` policies). Its speed-up is then at
  most ``step / inner`` (``bf16 query free``); ``bf16 at floor`` takes the query part's FLOPs at
  the best measured bf16 rate instead, and ``bf16 at s`` the query part's own measured bf16
  speed-up ``s``: ``step / (step - query + query / s)``.

The inner part is timed by replacing each task's query loss with ``<w_k, v>`` (a fixed random
``v``): the same inner steps, and for MAML the same second-order pass through them (the
meta-backward carries ``v`` in place of the query gradient), with no query pass. The query part
is each task's query loss and its gradient at a detached adapted point, in the layout and
precision the library uses. ``tests/test_ceiling.py`` checks in float64 that the two parts add
up to the library's meta-gradient, and that the loop's inner part computes the same as ours.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/ceiling.py --threads 1 --inner-steps 1 5 --repeats 8

The batch is speed.py's Omniglot setup (meta-batch 4 by default, 5-way 1-shot, 15 queries).
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import (
    PlainConvNet,
    loop_adapt,
    loop_step,
    machine_rates,
    make_setup,
    meta_step_flops,
)

from lightning_maml import FOMAML, MAML, TaskBatch
from lightning_maml.cpu import cpu_bf16_support, cpu_name, keep_freed_memory
from lightning_maml.functional import Params, TaskModel

ALGORITHMS = {"MAML": MAML, "FOMAML": FOMAML}


def bf16(enabled: bool = True):
    """bf16 autocast on the CPU, as a ``bf16-mixed`` Trainer enters it."""
    return torch.autocast("cpu", torch.bfloat16, enabled=enabled)


def random_directions(named: dict[str, Tensor], tasks: int) -> list[Params]:
    """One fixed random ``v`` (seeded) for every task, shaped as the parameters ``named``."""
    generator = torch.Generator().manual_seed(1)
    fixed = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in named.items()}
    return [fixed] * tasks


def add_gradient(total: Params, point: Params, direction: Params, origin: Params) -> None:
    """Adds to ``total`` the gradient of ``<point, direction>`` with respect to ``origin``."""
    surrogate = sum((point[n] * direction[n]).sum() for n in origin)
    for n, g in zip(origin, torch.autograd.grad(surrogate, list(origin.values())), strict=True):
        total[n] += g


def surrogate_gradients(
    params: Params,
    tasks: int,
    adapt: Callable[[int], Params],
    first_order: bool,
    directions: list[Params] | None,
) -> Callable[[], Params]:
    """A run that adapts each task (``adapt(i)``, the adapted point as a dictionary named as
    ``params``) and, unless ``first_order``, sums over tasks the gradients of ``<w_k, v_i>``
    with respect to ``params`` (``v_i``: ``directions[i]``, by default
    :func:`random_directions`), task by task as the library's per-task path runs them (one
    task's graph at a time). First order, the run returns an empty dictionary."""
    directions = directions or random_directions(params, tasks)

    def run() -> Params:
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in range(tasks):
            adapted = adapt(i)
            if not first_order:
                add_gradient(total, adapted, directions[i], params)
        return {} if first_order else total

    return run


def inner_part(
    task: TaskModel,
    batch: TaskBatch,
    inner_lr: float,
    steps: int,
    first_order: bool,
    directions: list[Params] | None = None,
) -> Callable[[], Params]:
    """Each task's inner steps and, for MAML, the backward through them of ``<w_k, v>``.

    ``directions`` holds each task's ``v`` (by default :func:`random_directions`); the run
    returns the sum over tasks of the gradients of ``<w_k, v>`` with respect to ``w_0`` (MAML),
    or an empty dictionary (FO-MAML, whose meta-gradient does not pass back through the loop).
    """
    params = dict(task.model.named_parameters())
    step_sizes = [{n: inner_lr for n in params}] * steps

    def adapt(i: int) -> Params:
        x, y = batch.support_x[i], batch.support_y[i]
        return task.adapt(params, x, y, step_sizes, first_order=first_order)[0]

    return surrogate_gradients(params, batch.num_tasks, adapt, first_order, directions)


def query_part(
    task: TaskModel, batch: TaskBatch, inner_lr: float, steps: int, precision: str
) -> Callable[[], list[Params]]:
    """Each task's query loss and its gradient at the task's adapted point (kept detached);
    the run returns those gradients, one dictionary per task."""
    params = {n: p.detach() for n, p in task.model.named_parameters()}
    step_sizes = [{n: inner_lr for n in params}] * steps
    points: list[Params] = []
    for i in range(batch.num_tasks):
        adapted, _ = task.adapt(
            params, batch.support_x[i], batch.support_y[i], step_sizes, first_order=True
        )
        points.append({n: w.detach().requires_grad_() for n, w in adapted.items()})

    def run() -> list[Params]:
        grads = []
        with bf16(precision == "bf16"):
            for i, point in enumerate(points):
                loss = task.loss(point, batch.query_x[i], batch.query_y[i])
                grads.append(
                    dict(zip(point, torch.autograd.grad(loss, list(point.values())), strict=True))
                )
        return grads

    return run


def loop_inner_part(
    net: nn.Module,
    loss_fn,
    batch: TaskBatch,
    inner_lr: float,
    steps: int,
    first_order: bool,
    directions: list[Params] | None = None,
) -> Callable[[], Params]:
    """The clone-and-adapt loop's inner part (speed.py's ``loop_adapt``), as
    :func:`inner_part` measures ours, and with the same result."""
    params = dict(net.named_parameters())

    def adapt(i: int) -> Params:
        x, y = batch.support_x[i], batch.support_y[i]
        learner = loop_adapt(net, loss_fn, x, y, inner_lr, steps, first_order)
        # The clone's parameters come in the order of the net's named parameters.
        adapted = [p for m in learner.modules() for p in m._parameters.values() if p is not None]
        return dict(zip(params, adapted, strict=True))

    return surrogate_gradients(params, batch.num_tasks, adapt, first_order, directions)


def library_step(
    model: nn.Module, loss_fn, batch: TaskBatch, inner_lr: float, steps: int, name: str, half: bool
) -> Callable[[], None]:
    """The library's meta-gradient of ``name``, in fp32 or under bf16 autocast."""
    algorithm = ALGORITHMS[name](inner_lr, inner_steps=steps)
    algorithm.bind(model)

    def run() -> None:
        with bf16(half):
            algorithm.meta_gradient(model, loss_fn, batch)

    return run


def measure(args, name: str, steps: int) -> dict[str, float]:
    """The fastest of ``args.repeats`` interleaved rounds of every part, in ms."""
    model, loss_fn, batch, inner_lr = make_setup(
        "omniglot", torch.device("cpu"), args.meta_batch_size
    )
    first_order = name == "FOMAML"
    task = TaskModel(model, loss_fn)
    loop_net = PlainConvNet(copy.deepcopy(model))
    runs = {
        "step": library_step(model, loss_fn, batch, inner_lr, steps, name, False),
        "step bf16": library_step(model, loss_fn, batch, inner_lr, steps, name, True),
        "inner": inner_part(task, batch, inner_lr, steps, first_order),
        "query": query_part(task, batch, inner_lr, steps, "fp32"),
        "query bf16": query_part(task, batch, inner_lr, steps, "bf16"),
        "loop": functools.partial(
            loop_step, loop_net, loss_fn, batch, inner_lr, steps, first_order
        ),
        "loop inner": loop_inner_part(loop_net, loss_fn, batch, inner_lr, steps, first_order),
    }
    if not args.bf16:
        for key in ("step bf16", "query bf16"):
            del runs[key]
    for run in runs.values():
        for _ in range(args.warmup):
            run()
    best = {key: float("inf") for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            start = time.process_time()
            run()
            best[key] = min(best[key], (time.process_time() - start) * 1e3)
    best["query gflop"] = meta_step_flops(runs["query"]) / 1e9
    return best


def rates(args) -> dict[str, float]:
    """The machine's best measured rate, GFLOP/s, fp32 and (where native) bf16: the larger of
    speed.py's convolution (the second layer's shape) and 1024^3 matmul rates."""
    measured = machine_rates(argparse.Namespace(device="cpu", repeats=args.repeats, clock="cpu"))
    best = {"fp32": max(measured["conv_fp32"], measured["matmul_fp32"])}
    if "conv_bf16" in measured:
        best["bf16"] = max(measured["conv_bf16"], measured["matmul_bf16"])
    return best


def row(name: str, steps: int, ms: dict[str, float], peak: dict[str, float]) -> list[str]:
    """The printed cells of one row (see :data:`HEADER`)."""
    floor = ms["query gflop"] / peak["fp32"] * 1e3
    cells = [f"{name}, {steps} step{'s' * (steps > 1)}"]
    cells += [f"{ms[k]:.1f}" for k in ("step", "inner", "query", "loop", "loop inner")]
    cells += [
        f"{floor:.1f}",
        f"{ms['step'] / ms['loop']:.2f}",
        f"{(ms['inner'] + floor) / ms['loop']:.2f}",
        f"{ms['inner'] / ms['loop inner']:.2f}",
    ]
    if "bf16" in peak:
        bf16_floor = ms["query gflop"] / peak["bf16"] * 1e3
        at_s = ms["step"] / (ms["step"] - ms["query"] + ms["query bf16"])
        cells += [
            f"{ms['step bf16']:.1f}",
            f"{ms['query bf16']:.1f}",
            f"{ms['step'] / ms['step bf16']:.2f}x",
            f"{at_s:.2f}x (s={ms['query'] / ms['query bf16']:.2f})",
            f"{ms['step'] / (ms['inner'] + bf16_floor):.2f}x",
            f"{ms['step'] / ms['inner']:.2f}x",
        ]
    return cells


#: The columns: times in ms; ``query floor`` is the query part's FLOPs at the machine's best
#: fp32 rate; ``floor / loop`` the least ours / loop can be with our inner part as it is; the
#: bf16 speed-ups are measured, predicted from the query part's own (``s``), with the query part
#: at the best bf16 rate, and with the query part free.
HEADER = [
    "row",
    "step",
    "inner",
    "query",
    "loop",
    "loop inner",
    "query floor",
    "ours / loop",
    "floor / loop",
    "inner / loop inner",
]
BF16_HEADER = [
    "step bf16",
    "query bf16",
    "bf16",
    "bf16 at s",
    "bf16 at floor",
    "bf16 query free",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    args.bf16 = cpu_bf16_support()
    print(f"cpu: {cpu_name()}; threads={torch.get_num_threads()}; torch={torch.__version__}")
    if not args.bf16:
        print("this CPU lacks native bf16 (avx512_bf16, amx_bf16): the bf16 columns are left out")
    peak = rates(args)
    print(
        "machine's best rate, GFLOP/s: "
        + ", ".join(f"{kind} {rate:.0f}" for kind, rate in peak.items())
    )
    print("ms, the fastest of the interleaved rounds (process CPU clock)")
    print(" | ".join(HEADER + (BF16_HEADER if args.bf16 else [])))
    for steps in args.inner_steps:
        for name in args.algorithms:
            torch.manual_seed(0)
            print(" | ".join(row(name, steps, measure(args, name, steps), peak)), flush=True)


if __name__ == "__main__":
    main()
