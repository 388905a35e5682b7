"""Gradient fidelity: how close FO-MAML's and HF-MAML's meta-gradients come to MAML's exact one.

On real task batches of a recipe, at checkpoints of a run, this computes MAML's exact
meta-gradient ``g`` (``MAML.meta_gradient``) and, against it, the relative error
``||g' - g|| / ||g||`` and the cosine of FO-MAML's ``g'`` and of HF-MAML's under each rule for the
finite-difference step delta, in float32 and in float64. The gradients compared are the
meta-batch means, what the meta-optimizer receives.

Where HF-MAML's error comes from is read off three comparisons:

- float32 against float64 (same weights, same data): rounding, which grows as delta shrinks;
- the same weights in a smooth network (``--nets``): ``gelu`` replaces every ReLU by a GELU,
  ``smooth`` also every max-pool by an average pool. Without kinks, what is left in float64 is
  the curvature (third-derivative) error of the central difference, which grows as delta^2;
- kink counts: the fraction of ReLU inputs whose sign differs, and of max-pool windows whose
  maximum moves, between ``w + delta v`` and ``w - delta v`` on the data of the finite difference.
  Each such kink changes the gradient by a jump that the difference divides by ``2 delta``; the
  exact meta-gradient sees none of them (ReLU'' = 0 almost everywhere).

HF-MAML's Gaussian-smoothing estimator (``hvp="gaussian_smoothing"``, ``--smoothing-radii``
and ``--smoothing-samples``) is measured beside the finite differences: one draw of its
directions per batch, as a training step would take it. ``--timing N`` also measures each
method's meta-gradient time on the first batch of each point (the recipe's net and precision),
the methods interleaved N times and the fastest kept, so that a machine's other load weighs
on all of them alike.

For scale, the row "MAML, next meta-batch" compares MAML's exact meta-gradient on the next
meta-batch with this one's: the sampling noise that every step carries anyway.

Usage (Omniglot 5-way 1-shot at the recipe's initial weights and two checkpoints of a run)::

    python benchmarks/fidelity.py --config recipes/omniglot/maml_5w1s.yaml \\
        --data-root ../shared/data/omniglot --query-shots 15 \\
        --checkpoints init RUN/step=750.ckpt RUN/step=1500.ckpt --output fidelity.json

``init`` stands for the weights the recipe starts from (its model built under its
``seed_everything``, as ``lightning-maml fit`` builds it). The batches are the run's own training
meta-batches from the checkpoint's step on (``TrainTaskStream.batch(global_step + b)``). Kink
counts need ``inner_steps = 1`` (the paper's setting and the image recipes').
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_maml import FOMAML, HFMAML, MAML, MetaAlgorithm, TaskBatch
from lightning_maml.functional import LossFn, Params, TaskModel, axpy, tree_norm

#: The delta_scale values swept by default (delta = c / ||v||).
DEFAULT_SCALES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: The method name of the sampling-noise rows.
NOISE = "MAML, next meta-batch"
#: The networks compared by default: as trained, ReLU -> GELU, and GELU with average pooling.
NETS = ("relu", "gelu", "smooth")


# -- measures ------------------------------------------------------------------------------


def _flat(tree: Params) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def relative_error(estimate: Params, exact: Params) -> float:
    """``||estimate - exact|| / ||exact||`` over all parameters taken as one vector."""
    a, b = _flat(estimate).double(), _flat(exact).double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def cosine(estimate: Params, exact: Params) -> float:
    """The cosine of the angle between two parameter dictionaries taken as vectors."""
    a, b = _flat(estimate).double(), _flat(exact).double()
    return float(a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))


# -- networks and data ---------------------------------------------------------------------


def smooth_copy(model: nn.Module, net: str) -> nn.Module:
    """A copy of ``model`` with the same weights and its kinks smoothed as ``net`` says.

    Args:
        model: The network.
        net: ``"relu"`` (an unchanged copy), ``"gelu"`` (every ``nn.ReLU`` becomes ``nn.GELU``)
            or ``"smooth"`` (also every ``nn.MaxPool2d`` an ``nn.AvgPool2d`` of the same window).
    """
    if net not in NETS:
        raise ValueError(f"net must be one of {NETS}, got {net!r}.")
    model = copy.deepcopy(model)
    if net == "relu":
        return model
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            # ConvNet pools before its ReLU (they commute); a GELU does not commute with
            # pooling, so the smooth nets take the activation first, as Finn et al.'s blocks do.
            children = list(module)
            for i in range(len(children) - 1):
                if isinstance(children[i], nn.MaxPool2d) and isinstance(children[i + 1], nn.ReLU):
                    module[i], module[i + 1] = children[i + 1], children[i]
                    children[i], children[i + 1] = children[i + 1], children[i]
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.GELU())
            elif net == "smooth" and isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    return model


def cast_tasks(tasks: TaskBatch, dtype: torch.dtype) -> TaskBatch:
    """The batch with its floating-point tensors (inputs, regression targets) cast to ``dtype``."""
    return TaskBatch(
        **{
            name: t.to(dtype) if t.is_floating_point() else t
            for name, t in tasks.named_tensors().items()
        }
    )


# -- the step rules ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One Hessian-vector product rule of HF-MAML: a finite-difference step, or Gaussian smoothing.

    Attributes:
        kind: ``"scale"`` (delta = value / ||v||), ``"fixed"`` (delta = value), ``"theory"``
            (delta = 1 / (6 rho alpha ||v||), value = rho) or ``"smoothing"``
            (``hvp="gaussian_smoothing"`` with radius mu = value and ``samples`` directions).
        value: The rule's number.
        samples: The number of directions of a ``"smoothing"`` rule.
    """

    kind: str
    value: float
    samples: int = 0

    @property
    def name(self) -> str:
        if self.kind == "smoothing":
            return f"smoothing mu={self.value:g} b={self.samples}"
        label = {"scale": "delta_scale", "fixed": "delta", "theory": "theory rho"}[self.kind]
        return f"{label}={self.value:g}"

    def algorithm(self, inner_lr: float, inner_steps: int, hessian_batch: str) -> HFMAML:
        """HF-MAML with this rule."""
        common = {"inner_lr": inner_lr, "inner_steps": inner_steps, "hessian_batch": hessian_batch}
        if self.kind == "smoothing":
            return HFMAML(
                **common,
                hvp="gaussian_smoothing",
                smoothing_radius=self.value,
                smoothing_samples=self.samples,
            )
        if self.kind == "scale":
            return HFMAML(**common, delta_scale=self.value)
        if self.kind == "fixed":
            return HFMAML(**common, delta=self.value)
        return HFMAML(**common, delta="theory", rho=self.value)


def rules_from(
    scales: Sequence[float],
    fixed: Sequence[float],
    rho: float | None,
    radii: Sequence[float] = (),
    samples: Sequence[int] = (),
) -> list[Rule]:
    """The rules to measure, in the order given; a smoothing rule for each radius and count."""
    rules = [Rule("scale", c) for c in scales] + [Rule("fixed", d) for d in fixed]
    if rho is not None:
        rules.append(Rule("theory", rho))
    rules += [Rule("smoothing", mu, b) for b in samples for mu in radii]
    return rules


# -- kinks ---------------------------------------------------------------------------------


@contextmanager
def _kink_recorder(model: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Records, at every forward, each ReLU's input signs and each max-pool's chosen indices."""
    record: dict[str, list[Tensor]] = {"relu": [], "pool": []}

    def on_relu(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        record["relu"].append(inputs[0].detach() > 0)

    def on_pool(module: nn.MaxPool2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        _, index = F.max_pool2d(
            inputs[0].detach(),
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            ceil_mode=module.ceil_mode,
            return_indices=True,
        )
        record["pool"].append(index)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            handles.append(module.register_forward_hook(on_relu))
        elif isinstance(module, nn.MaxPool2d):
            handles.append(module.register_forward_hook(on_pool))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def kink_fractions(
    model: nn.Module, loss_fn: LossFn, tasks: TaskBatch, algorithm: HFMAML
) -> dict[str, float]:
    """The fraction of kinks crossed by HF-MAML's finite differences, over all tasks.

    For each task, with ``v`` the outer gradient at the adapted point and ``delta`` the
    algorithm's step for it, the network runs on the finite difference's data at ``w + delta v``
    and at ``w - delta v``.

    Returns:
        ``relu``: the fraction of ReLU inputs whose sign differs between the two points;
        ``pool``: the fraction of max-pool windows whose maximum is at another position
        (``nan`` where the network has no such layer).

    Raises:
        ValueError: If the algorithm takes more than one inner step.
    """
    if algorithm.inner_steps != 1:
        raise ValueError(
            "Kink counts follow the finite difference of one inner step; got inner_steps="
            f"{algorithm.inner_steps}. Run with a one-step recipe (or skip them with --no-kinks)."
        )
    task = TaskModel(model, loss_fn)
    params = task.params()
    split = "hessian" if algorithm.hessian_batch == "independent" else "support"
    changed = {"relu": 0, "pool": 0}
    total = {"relu": 0, "pool": 0}
    for t in range(tasks.num_tasks):
        data = {name: tensor[t] for name, tensor in tasks.named_tensors().items()}
        one_step = [dict.fromkeys(params, algorithm.inner_lr)]
        adapted, _ = task.adapt(params, data["support_x"], data["support_y"], one_step)
        direction = grad(task.loss)(adapted, data["query_x"], data["query_y"])
        delta = algorithm.step_size(tree_norm(direction))
        with torch.no_grad(), _kink_recorder(model) as record:
            task.predict(axpy(delta, direction, params), data[f"{split}_x"])
            plus = {k: list(v) for k, v in record.items()}
            for v in record.values():
                v.clear()
            task.predict(axpy(-delta, direction, params), data[f"{split}_x"])
            minus = record
        for kind in changed:
            for a, b in zip(plus[kind], minus[kind], strict=True):
                changed[kind] += int((a != b).sum())
                total[kind] += a.numel()
    return {k: changed[k] / total[k] if total[k] else math.nan for k in changed}


# -- the measurement -----------------------------------------------------------------------


@dataclass
class Row:
    """One estimate against MAML's exact meta-gradient on one batch."""

    point: str
    batch: int
    dtype: str
    net: str
    method: str
    relative_error: float
    cosine: float
    exact_norm: float
    relu_flips: float = math.nan
    pool_flips: float = math.nan


def _row(
    where: tuple[str, int, str, str],
    method: str,
    estimate: Params,
    exact: Params,
    flips: dict[str, float] | None = None,
) -> Row:
    flips = flips or {"relu": math.nan, "pool": math.nan}
    return Row(
        *where,
        method,
        relative_error(estimate, exact),
        cosine(estimate, exact),
        float(tree_norm(exact)),
        flips["relu"],
        flips["pool"],
    )


def _exact(network: nn.Module, loss_fn: LossFn, data: TaskBatch, reference: MetaAlgorithm):
    algorithm = MAML(reference.inner_lr, reference.inner_steps, reference.hessian_batch)
    return algorithm.meta_gradient(network, loss_fn, data).grads


def exact_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    tasks: TaskBatch,
    reference: MetaAlgorithm,
    dtypes: Sequence[torch.dtype],
    nets: Sequence[str],
) -> dict[tuple[str, str], Params]:
    """MAML's meta-gradient for each net and dtype, by ``(net, dtype name)``."""
    grads = {}
    for net in nets:
        base = smooth_copy(model, net)
        for dtype in dtypes:
            network = copy.deepcopy(base).to(dtype)
            name = str(dtype).removeprefix("torch.")
            grads[net, name] = _exact(network, loss_fn, cast_tasks(tasks, dtype), reference)
    return grads


def measure(
    model: nn.Module,
    loss_fn: LossFn,
    tasks: TaskBatch,
    reference: MetaAlgorithm,
    rules: Sequence[Rule],
    point: str = "",
    batch: int = 0,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    nets: Sequence[str] = NETS,
    kinks: bool = True,
    exact_out: dict[tuple[str, str], Params] | None = None,
) -> list[Row]:
    """FO-MAML's and HF-MAML's meta-gradients against MAML's on one batch, for each dtype and net.

    Args:
        model: The network at the point measured (not modified).
        loss_fn: The task loss.
        tasks: The meta-batch.
        reference: The recipe's algorithm: its ``inner_lr``, ``inner_steps`` and
            ``hessian_batch`` set all three variants.
        rules: HF-MAML's step rules.
        point: The label of the weights (``init``, a checkpoint), for the rows.
        batch: The batch's index, for the rows.
        dtypes: The precisions.
        nets: The networks (see :func:`smooth_copy`).
        kinks: Also count the kinks each rule's finite differences cross (float64 only: a
            geometric property of the weights, not of the rounding).
        exact_out: If given, receives MAML's meta-gradient for each ``(net, dtype name)``.
    """
    inner_lr, steps = reference.inner_lr, reference.inner_steps
    hessian_batch = reference.hessian_batch
    rows = []
    for net in nets:
        base = smooth_copy(model, net)
        for dtype in dtypes:
            network = copy.deepcopy(base).to(dtype)
            data = cast_tasks(tasks, dtype)
            exact = _exact(network, loss_fn, data, reference)
            name = str(dtype).removeprefix("torch.")
            where = (point, batch, name, net)
            if exact_out is not None:
                exact_out[net, name] = exact
            fo = FOMAML(inner_lr, steps).meta_gradient(network, loss_fn, data).grads
            rows.append(_row(where, "FO-MAML", fo, exact))
            for rule in rules:
                algorithm = rule.algorithm(inner_lr, steps, hessian_batch)
                estimate = algorithm.meta_gradient(network, loss_fn, data).grads
                # The kinks of a finite difference; smoothing has no step to count them along.
                count = (
                    kinks
                    and dtype == torch.float64
                    and net != "smooth"
                    and rule.kind != "smoothing"
                )
                flips = kink_fractions(network, loss_fn, data, algorithm) if count else None
                rows.append(_row(where, f"HF-MAML {rule.name}", estimate, exact, flips))
    return rows


def time_methods(
    model: nn.Module,
    loss_fn: LossFn,
    tasks: TaskBatch,
    reference: MetaAlgorithm,
    rules: Sequence[Rule],
    repeats: int,
) -> dict[str, float]:
    """Milliseconds per meta-gradient of MAML, FO-MAML and each HF-MAML rule on one batch.

    The methods run in turn, ``repeats`` rounds after one warm-up round, and each keeps its
    fastest round: the machine's other load slows some rounds, and interleaving spreads it over
    all methods alike.
    """
    inner_lr, steps, hessian_batch = (
        reference.inner_lr,
        reference.inner_steps,
        reference.hessian_batch,
    )
    methods: dict[str, MetaAlgorithm] = {
        "MAML (exact)": MAML(inner_lr, steps, hessian_batch),
        "FO-MAML": FOMAML(inner_lr, steps),
    }
    methods |= {f"HF-MAML {r.name}": r.algorithm(inner_lr, steps, hessian_batch) for r in rules}
    best = dict.fromkeys(methods, math.inf)
    for round_ in range(repeats + 1):
        for name, algorithm in methods.items():
            start = time.perf_counter()
            algorithm.meta_gradient(model, loss_fn, tasks)
            elapsed = time.perf_counter() - start
            if round_:  # the first round warms caches and allocators
                best[name] = min(best[name], elapsed)
    return {name: 1000 * seconds for name, seconds in best.items()}


def summarize(rows: Sequence[Row]) -> list[dict]:
    """The rows averaged over batches: one entry per point, dtype, net and method."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.point, r.dtype, r.net, r.method), []).append(r)
    summary = []
    for (point, dtype, net, method), group in groups.items():
        mean = {
            key: sum(getattr(r, key) for r in group) / len(group)
            for key in ("relative_error", "cosine", "exact_norm", "relu_flips", "pool_flips")
        }
        summary.append(
            {"point": point, "dtype": dtype, "net": net, "method": method, "batches": len(group)}
            | mean
        )
    return summary


def markdown(summary: Sequence[dict], timings: dict[str, dict[str, float]] | None = None) -> str:
    """One table per point: a row per method, a column per (net, dtype), then the kink counts
    and, where ``timings`` has the point, the milliseconds per meta-step."""
    lines = []
    timings = timings or {}
    for point in dict.fromkeys(s["point"] for s in summary):
        entries = [s for s in summary if s["point"] == point]
        columns = list(dict.fromkeys((s["net"], s["dtype"]) for s in entries))
        methods = list(dict.fromkeys(s["method"] for s in entries))
        by_key = {(s["method"], s["net"], s["dtype"]): s for s in entries}
        times = timings.get(point, {})
        norm = by_key.get(("FO-MAML", "relu", "float64")) or entries[0]
        lines += [
            f"{point} (||MAML meta-gradient|| {norm['exact_norm']:.3g}, {norm['net']} "
            f"{norm['dtype']}): "
            "relative error (cosine) against MAML; ReLU / max-pool kinks crossed (float64)",
            "",
            "| method | "
            + " | ".join(f"{net} {dtype}" for net, dtype in columns)
            + " | ReLU flips | pool flips |"
            + (" ms / meta-step |" if times else ""),
            "| --- " * (len(columns) + 3 + bool(times)) + "|",
        ]
        for method in methods:
            cells = []
            for net, dtype in columns:
                s = by_key.get((method, net, dtype))
                cells.append(f"{s['relative_error']:.3g} ({s['cosine']:.4f})" if s else "")
            flips = by_key.get((method, "relu", "float64"), {})
            relu, pool = flips.get("relu_flips", math.nan), flips.get("pool_flips", math.nan)
            cells.append("" if math.isnan(relu) else f"{relu:.2e}")
            cells.append("" if math.isnan(pool) else f"{pool:.2e}")
            if times:
                key = "MAML (exact)" if method == NOISE else method
                cells.append(f"{times[key]:.0f}" if key in times else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# -- the recipe, its checkpoints and its batches --------------------------------------------


def load_recipe(config: str, overrides: Sequence[str]):
    """The recipe's MetaLearner (at its initial weights) and datamodule, as ``fit`` builds them."""
    from lightning_maml.cli import MetaCLI

    args = ["--config", config, *overrides, "--trainer.logger", "false"]
    with warnings.catch_warnings():
        # This script's own command line is not LightningCLI's: it gets only ``args``.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = MetaCLI(args=args, run=False)
    return cli.model, cli.datamodule


def training_batches(datamodule, start: int, count: int) -> list[TaskBatch]:
    """The training meta-batches of global steps ``start .. start + count - 1``."""
    from lightning_maml.datamodules.base import TrainTaskStream

    datamodule.setup("fit")
    stream = TrainTaskStream(
        datamodule.task_sampler("train"), datamodule.meta_batch_size, datamodule.seed
    )
    return [stream.batch(start + b) for b in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Relative error and cosine of FO-MAML's and HF-MAML's meta-gradients "
        "against MAML's exact one, on a recipe's batches at checkpoints of a run."
    )
    parser.add_argument("--config", required=True, help="the recipe (MAML's, or any variant's)")
    parser.add_argument("--data-root", help="--data.init_args.root for the recipe")
    parser.add_argument("--query-shots", type=int, help="--data.init_args.query_shots")
    parser.add_argument("--meta-batch-size", type=int, help="--data.init_args.meta_batch_size")
    parser.add_argument(
        "--checkpoints",
        nargs="+",
        default=["init"],
        metavar="CKPT",
        help="checkpoints of a run of the recipe; 'init' for the recipe's initial weights",
    )
    parser.add_argument("--batches", type=int, default=2, help="meta-batches per point (2)")
    parser.add_argument(
        "--scales",
        nargs="*",
        type=float,
        default=list(DEFAULT_SCALES),
        help="delta_scale values c (delta = c / ||v||)",
    )
    parser.add_argument(
        "--fixed", nargs="*", type=float, default=[], help="fixed delta values (none)"
    )
    parser.add_argument("--rho", type=float, help="also the theorem's delta with this rho")
    parser.add_argument(
        "--smoothing-radii",
        nargs="*",
        type=float,
        default=[],
        help="also HF-MAML with Gaussian smoothing at these radii mu (none)",
    )
    parser.add_argument(
        "--smoothing-samples",
        nargs="+",
        type=int,
        default=[8],
        help="the numbers of directions b of each smoothing radius (8)",
    )
    parser.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="N",
        help="also time every method's meta-gradient, fastest of N interleaved rounds (0: no)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=("float32", "float64"), default=["float32", "float64"]
    )
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--no-kinks", action="store_true", help="skip the kink counts")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--output", help="write every row and the summary to this JSON file")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    if args.timing < 0:
        parser.error("--timing must be >= 0")
    if any(not mu > 0 for mu in args.smoothing_radii):
        parser.error("--smoothing-radii must be > 0")
    if any(b < 1 for b in args.smoothing_samples):
        parser.error("--smoothing-samples must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = []
    for flag, key in [
        ("data_root", "root"),
        ("query_shots", "query_shots"),
        ("meta_batch_size", "meta_batch_size"),
    ]:
        if getattr(args, flag) is not None:
            overrides += [f"--data.init_args.{key}", str(getattr(args, flag))]
    learner, datamodule = load_recipe(args.config, overrides)
    reference = learner.algorithm
    rules = rules_from(
        args.scales, args.fixed, args.rho, args.smoothing_radii, args.smoothing_samples
    )
    dtypes = [getattr(torch, d) for d in args.dtypes]
    initial = {k: v.clone() for k, v in learner.state_dict().items()}

    rows: list[Row] = []
    timings: dict[str, dict[str, float]] = {}
    for point in args.checkpoints:
        if point == "init":
            state, step = initial, 0
        else:
            checkpoint = torch.load(point, map_location="cpu", weights_only=True)
            state, step = checkpoint["state_dict"], checkpoint["global_step"]
        learner.load_state_dict(state)
        label = f"{Path(point).name} (step {step})" if point != "init" else "init (step 0)"
        batches = training_batches(datamodule, step, args.batches + 1)
        if args.timing:
            timings[label] = time_methods(
                learner.model, learner.loss_fn, batches[0], reference, rules, args.timing
            )
            print(f"{label}, timing: {timings[label]}", file=sys.stderr)
        exacts: list[dict[tuple[str, str], Params]] = []
        for b, tasks in enumerate(batches[:-1]):
            start = time.perf_counter()
            exact: dict[tuple[str, str], Params] = {}
            rows += measure(
                learner.model,
                learner.loss_fn,
                tasks,
                reference,
                rules,
                label,
                b,
                dtypes,
                args.nets,
                not args.no_kinks,
                exact,
            )
            exacts.append(exact)
            print(f"{label}, batch {b}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        # The scale of the noise the meta-optimizer sees anyway: MAML's own meta-gradient on
        # the next meta-batch, against each measured batch's.
        exacts.append(
            exact_gradients(
                learner.model, learner.loss_fn, batches[-1], reference, dtypes, args.nets
            )
        )
        for b in range(args.batches):
            for (net, dtype), grads in exacts[b + 1].items():
                rows.append(_row((label, b, dtype, net), NOISE, grads, exacts[b][net, dtype]))
    summary = summarize(rows)
    print(markdown(summary, timings))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        result = {
            "config": args.config,
            "checkpoints": args.checkpoints,
            "batches": args.batches,
            "inner_lr": reference.inner_lr,
            "inner_steps": reference.inner_steps,
            "hessian_batch": reference.hessian_batch,
            "torch": torch.__version__,
            "summary": summary,
            "ms_per_meta_step": timings,
            "rows": [asdict(r) for r in rows],
        }
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
