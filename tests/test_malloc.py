"""glibc's malloc keeps freed activations for reuse in CPU training (lightning_maml.cpu).

Each check runs in a fresh Python process: malloc's parameters belong to the process, and
the page faults counted are that process's own.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="malloc's parameters are glibc's (Linux)"
)

#: Page faults of ten forward and backward passes of the Omniglot conv net on a query set
#: (75 images; activations of up to 15 MiB, alive together until the backward), after six
#: passes of warm-up; the child process prints them.
FAULTS = """
import resource, torch
from lightning_maml.models import ConvNet
torch.manual_seed(0)
model, x = ConvNet(1, 5, 64, 28), torch.randn(75, 1, 28, 28)
def step():
    model(x).logsumexp(1).sum().backward()
def faults():
    for _ in range(6):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""


def run(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.pop("GLIBC_TUNABLES", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout.split()[-1]


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    # Returned to the system, freed activations are faulted in again by the next pass. glibc
    # adapts its threshold to the blocks it sees, so how often depends on the process's history;
    # MALLOC_MMAP_THRESHOLD_ at its initial value (128 KiB) fixes it, for a count that repeats.
    returned = int(run(FAULTS + "print(faults())", MALLOC_MMAP_THRESHOLD_="131072"))
    kept = int(
        run(
            "from lightning_maml.cpu import keep_freed_memory\n"
            "assert keep_freed_memory()\n" + FAULTS + "print(faults())"
        )
    )
    # Kept, they are reused: at most the odd growth of the heap (measured: 0 to 1,838 faults in
    # ten passes, against 274,000 returned).
    assert returned > 10 * 10_000
    assert kept < returned / 20


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    ],
)
def test_the_environments_malloc_settings_stand(env):
    code = "from lightning_maml.cpu import keep_freed_memory\nprint(keep_freed_memory())"
    assert run(code, **env) == "False"
    assert run(code) == "True"


def test_a_cpu_fit_keeps_freed_memory():
    code = """
        import lightning as L
        from lightning_maml import FOMAML, MetaLearner
        from lightning_maml.cpu import keep_freed_memory
        from lightning_maml.datamodules import SinusoidDataModule
        from lightning_maml.models import MLP
        learner = MetaLearner(MLP(), FOMAML(0.01), loss="mse")
        trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(learner, SinusoidDataModule(meta_batch_size=2, num_workers=0))
        print(keep_freed_memory.cache_info().currsize)
    """
    assert run(code) == "1"
