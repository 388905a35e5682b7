"""benchmarks/ceiling.py: its inner and query parts add up to the whole meta-gradient, its loop
computes the same inner part as ours, and it prints a row per algorithm and step count."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_maml import FOMAML, MAML, TaskBatch
from lightning_maml.functional import TaskModel
from lightning_maml.models import ConvNet
from tests.test_variants import load

ceiling = load("ceiling", "benchmarks/ceiling.py")

TASKS, WAYS, LR = 2, 3, 0.3


@pytest.fixture
def setup():
    """A tiny float64 conv net (BatchNorm, max-pool) and a meta-batch of 2 tasks."""
    torch.manual_seed(0)
    model = ConvNet(1, WAYS, hidden=4, image_size=8, blocks=2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TASKS, WAYS * 3, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(WAYS).repeat(3).expand(TASKS, -1)
    batch = TaskBatch(x[:, :WAYS], y[:, :WAYS], x[:, WAYS:], y[:, WAYS:])
    return model, batch


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_is_its_inner_part_carrying_the_query_gradients(setup, steps):
    model, batch = setup
    task = TaskModel(model, nn.functional.cross_entropy)
    query = ceiling.query_part(task, batch, LR, steps, "fp32")()
    inner = ceiling.inner_part(task, batch, LR, steps, first_order=False, directions=query)()
    expected = (
        MAML(LR, inner_steps=steps).meta_gradient(model, nn.functional.cross_entropy, batch).grads
    )
    assert inner.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(inner[name] / TASKS, g, rtol=1e-9, atol=1e-11)
    # The second-order pass matters here: without it the parts would not add up.
    first_order = {n: sum(q[n] for q in query) / TASKS for n in expected}
    assert max((first_order[n] - g).abs().max() for n, g in expected.items()) > 1e-4


def test_fomaml_is_its_query_part(setup):
    model, batch = setup
    task = TaskModel(model, nn.functional.cross_entropy)
    query = ceiling.query_part(task, batch, LR, 2, "fp32")()
    assert ceiling.inner_part(task, batch, LR, 2, first_order=True)() == {}
    expected = (
        FOMAML(LR, inner_steps=2).meta_gradient(model, nn.functional.cross_entropy, batch).grads
    )
    for name, g in expected.items():
        torch.testing.assert_close(sum(q[name] for q in query) / TASKS, g, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("steps", [1, 2])
def test_the_loop_computes_our_inner_part(setup, steps):
    """The clone-and-adapt loop (PyTorch's modules and double backward) against ours."""
    model, batch = setup
    task = TaskModel(model, nn.functional.cross_entropy)
    loop_net = ceiling.PlainConvNet(copy.deepcopy(model))
    ours = ceiling.inner_part(task, batch, LR, steps, first_order=False)()
    loop = ceiling.loop_inner_part(
        loop_net, nn.functional.cross_entropy, batch, LR, steps, first_order=False
    )()
    assert ours.keys() == loop.keys()
    for name, g in loop.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-9, atol=1e-11)


def test_main_prints_a_row(capsys):
    arguments = "--algorithms FOMAML --inner-steps 1 --repeats 1 --warmup 0 --meta-batch-size 1"
    ceiling.main([*arguments.split(), "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("row |"))
    row = next(line for line in lines if line.startswith("FOMAML, 1 step |"))
    assert len(row.split(" | ")) == len(header.split(" | "))
    times = [float(cell) for cell in row.split(" | ")[1:6]]
    assert all(t > 0 for t in times)


def test_the_ceilings_it_derives():
    ms = {"step": 400.0, "inner": 100.0, "query": 280.0, "loop": 600.0, "loop inner": 125.0}
    ms |= {"step bf16": 250.0, "query bf16": 140.0, "query gflop": 15.0}
    cells = ceiling.row("MAML", 5, ms, {"fp32": 150.0, "bf16": 600.0})
    assert len(cells) == len(ceiling.HEADER) + len(ceiling.BF16_HEADER)
    by = dict(zip(ceiling.HEADER + ceiling.BF16_HEADER, cells, strict=True))
    assert by["row"] == "MAML, 5 steps"
    assert by["query floor"] == "100.0"  # 15 GFLOP at 150 GFLOP/s
    assert by["ours / loop"] == "0.67"
    assert by["floor / loop"] == "0.33"  # (100 + 100) / 600
    assert by["inner / loop inner"] == "0.80"
    assert by["bf16"] == "1.60x"
    assert by["bf16 at s"] == "1.54x (s=2.00)"  # 400 / (400 - 280 + 140)
    assert by["bf16 at floor"] == "3.20x"  # 400 / (100 + 25)
    assert by["bf16 query free"] == "4.00x"
    fp32_only = ceiling.row("FOMAML", 1, ms, {"fp32": 150.0})
    assert len(fp32_only) == len(ceiling.HEADER) and fp32_only[0] == "FOMAML, 1 step"
