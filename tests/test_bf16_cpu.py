"""bf16 on a CPU: native support read from /proc/cpuinfo, a warning where it is emulated."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from lightning_maml import FOMAML, MetaLearner
from lightning_maml.cpu import cpu_bf16_support, cpu_name, read_cpu_flags, warn_bf16_on_cpu
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.functional import TaskModel, mse_loss
from lightning_maml.models import MLP

CPUINFO = """processor\t: 0
model name\t: Some Xeon
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16

processor\t: 1
model name\t: Some Xeon
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16
"""
OLD = frozenset({"fpu", "sse2", "avx2", "avx512f"})


def test_flags_and_name_are_read_from_cpuinfo():
    flags = read_cpu_flags(CPUINFO)
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= flags
    assert cpu_name(CPUINFO) == "Some Xeon"
    assert read_cpu_flags("") == frozenset()
    assert isinstance(read_cpu_flags(), frozenset)  # this machine's, whatever it has


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        (OLD, False),
        (OLD | {"avx512_bf16"}, True),
        (OLD | {"amx_bf16"}, True),
        (frozenset(), False),
    ],
)
def test_bf16_support_needs_avx512_bf16_or_amx(flags, native):
    assert cpu_bf16_support(flags) is native


def test_warns_for_bf16_on_a_cpu_without_it():
    with pytest.warns(UserWarning, match="without native bf16.*precision='32-true'"):
        assert warn_bf16_on_cpu("bf16-mixed", "cpu", OLD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_bf16_on_cpu("bf16-mixed", "cpu", OLD | {"amx_bf16"})
        assert not warn_bf16_on_cpu("32-true", "cpu", OLD)
        assert not warn_bf16_on_cpu("bf16-mixed", "cuda", OLD)


def test_bf16_mixed_trainer_step_runs_and_warns_only_without_native_bf16(recwarn):
    learner = MetaLearner(MLP(), FOMAML(0.01), "mse")
    L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2))
    assert learner.last_meta_step is not None and torch.isfinite(learner.last_meta_step.loss)
    warned = any("without native bf16" in str(w.message) for w in recwarn)
    assert warned is not cpu_bf16_support()


def test_the_inner_loop_runs_in_fp32_under_bf16_autocast():
    # bf16 inner gradients turned the conv net's meta-gradient (cosine 0.98 to fp32's); the
    # query passes alone take bf16.
    torch.manual_seed(0)
    task = TaskModel(MLP(), mse_loss)
    x, y = torch.randn(10, 1), torch.randn(10, 1)
    step_sizes = [dict.fromkeys(task.params(), 0.1)] * 2
    exact, _ = task.adapt(task.params(), x, y, step_sizes)
    with torch.autocast("cpu", torch.bfloat16):
        mixed, _ = task.adapt(task.params(), x, y, step_sizes)
        assert task.predict(mixed, x).dtype == torch.bfloat16
    for n, w in exact.items():
        assert mixed[n].dtype == torch.float32
        torch.testing.assert_close(mixed[n], w, rtol=0, atol=0)
