"""bf16 meta-gradients on the Omniglot conv net: their cosine to fp32's, and their speed.

On real Omniglot 5-way 1-shot batches (15 queries, meta-batch 4 by default), each row computes
the meta-gradient of MAML or FO-MAML in fp32 and under a bf16 policy from the same parameters,
and reports the cosine between the two (mean and minimum over batches) and the time of a
meta-step against fp32's, measured interleaved in one process (the fastest of the rounds).

The policies (where bf16 autocast is on):

- ``mixed``: the meta-step under autocast, as ``precision="bf16-mixed"`` runs it (the library
  keeps the inner loop in fp32: the same passes as ``outer``);
- ``all``: every forward pass, the inner loop's included;
- ``outer``: the query passes only (the inner loop, its gradient and Hessian terms in fp32);
- ``inner``: the support passes only (the query loss and its backward in fp32);
- ``conv``: every pass, with each convolution's output cast back to fp32 (BatchNorm, pooling,
  ReLU and the loss in fp32, convolutions and their backward in bf16).

A support pass and a query pass are told apart by their size (``ways * shots`` images against
``ways * query_shots``), which holds for these settings.

Usage::

    python benchmarks/bf16_check.py --root /work/shared/data/omniglot --threads 1
    python benchmarks/bf16_check.py --root DATA --policies all outer --inner-steps 1 --batches 4

On a CPU without native bf16 (AVX512-BF16 or AMX), the script says so first: bf16 is emulated
there and slower than fp32.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import add_malloc_argument, set_malloc

from lightning_maml import FOMAML, MAML, TaskBatch
from lightning_maml.cpu import cpu_bf16_support, cpu_name
from lightning_maml.datamodules.omniglot import OmniglotDataModule
from lightning_maml.models import ConvNet

POLICIES = ("mixed", "all", "outer", "inner", "conv")
ALGORITHMS = {"MAML": MAML, "FOMAML": FOMAML}


class BF16Policy(nn.Module):
    """Runs ``net`` under bf16 autocast in the passes that ``policy`` names (see above).

    Args:
        net: The conv net.
        policy: One of :data:`POLICIES`, or ``"fp32"`` for none (``"mixed"`` leaves autocast
            to the caller).
        support_size: The number of images in a support set.
    """

    def __init__(self, net: ConvNet, policy: str, support_size: int) -> None:
        super().__init__()
        self.net, self.policy, self.support_size = net, policy, support_size
        if policy == "conv":
            for module in net.modules():
                if isinstance(module, nn.Conv2d):
                    module.register_forward_hook(lambda m, i, out: out.float())

    def forward(self, x: Tensor) -> Tensor:
        if self.policy == "mixed":
            return self.net(x).float()
        support = x.shape[0] == self.support_size
        on = {"fp32": False, "all": True, "conv": True, "outer": not support, "inner": support}
        with torch.autocast("cpu", torch.bfloat16, enabled=on[self.policy]):
            return self.net(x).float()


def batches(args) -> list[TaskBatch]:
    """``args.batches`` meta-batches of real Omniglot training tasks."""
    data = OmniglotDataModule(
        args.root, ways=5, shots=1, query_shots=15, meta_batch_size=args.meta_batch_size
    )
    data.setup("fit")
    loader = iter(data.train_dataloader())
    return [next(loader) for _ in range(args.batches)]


def autocast_call(enabled: bool, fn, *args):
    """``fn(*args)`` under bf16 autocast when ``enabled`` (what a bf16-mixed Trainer does)."""
    with torch.autocast("cpu", torch.bfloat16, enabled=enabled):
        return fn(*args)


def flat(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.flatten().double() for _, g in sorted(grads.items())])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/work/shared/data/omniglot"))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4, help="meta-batches for the cosine")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_malloc(args)
    native = cpu_bf16_support()
    print(
        f"cpu: {cpu_name()}; threads={torch.get_num_threads()}; torch={torch.__version__}; "
        f"malloc={args.malloc}"
    )
    if not native:
        print("this CPU lacks native bf16 (avx512_bf16, amx_bf16): bf16 is emulated, slower")
    tasks = batches(args)
    print(
        f"{'algorithm':<9}{'steps':>6}{'policy':>8}{'cos mean':>10}{'cos min':>10}"
        f"{'fp32 ms':>10}{'bf16 ms':>10}{'speedup':>9}"
    )
    for steps in args.inner_steps:
        for name in args.algorithms:
            torch.manual_seed(args.seed)
            net = ConvNet(1, 5, 64, 28)
            models = {p: BF16Policy(copy.deepcopy(net), p, 5) for p in ("fp32", *args.policies)}
            runs = {}
            for policy, model in models.items():
                algorithm = ALGORITHMS[name](0.4, inner_steps=steps)
                algorithm.bind(model)
                runs[policy] = functools.partial(
                    autocast_call,
                    policy == "mixed",
                    functools.partial(algorithm.meta_gradient, model, nn.functional.cross_entropy),
                )
            cosines: dict[str, list[float]] = {p: [] for p in args.policies}
            for batch in tasks:
                reference = flat(runs["fp32"](batch).grads)
                for policy in args.policies:
                    grads = flat(runs[policy](batch).grads)
                    cosines[policy].append(
                        float(torch.nn.functional.cosine_similarity(grads, reference, dim=0))
                    )
            times: dict[str, list[float]] = {p: [] for p in runs}
            for _ in range(args.repeats):
                for policy, run in runs.items():
                    start = time.process_time()
                    run(tasks[0])
                    times[policy].append((time.process_time() - start) * 1e3)
            base = min(times["fp32"])
            for policy in args.policies:
                ms = min(times[policy])
                mean = sum(cosines[policy]) / len(cosines[policy])
                print(
                    f"{name:<9}{steps:>6}{policy:>8}{mean:>10.4f}{min(cosines[policy]):>10.4f}"
                    f"{base:>10.1f}{ms:>10.1f}{base / ms:>8.2f}x"
                )


if __name__ == "__main__":
    main()
