"""benchmarks/fidelity.py: its measures and kink counts against independent computations."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from torch import nn
from torch.autograd.functional import hvp

from lightning_maml import MAML, TaskBatch
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("fidelity", REPO / "benchmarks" / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
sys.modules["fidelity"] = fidelity
_spec.loader.exec_module(fidelity)

TASKS, SHOTS, ALPHA = 3, 6, 0.3


def tasks64() -> TaskBatch:
    g = torch.Generator().manual_seed(1)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(TASKS, SHOTS, 2, generator=g, dtype=torch.float64)
        return x, torch.sin(x.sum(-1, keepdim=True))

    return TaskBatch(*sample(), *sample())


def mlp(activation: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), activation(), nn.Linear(8, 1)).double()


def test_relative_error_and_cosine():
    exact = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    estimate = {"a": torch.tensor([3.0, 5.0]), "b": torch.tensor([4.0])}
    assert fidelity.relative_error(estimate, exact) == pytest.approx(1.0)
    assert fidelity.cosine(estimate, exact) == pytest.approx(25 / (5 * math.sqrt(50)))
    assert fidelity.relative_error(exact, exact) == 0.0


def test_smooth_copy_keeps_weights_and_replaces_kinks():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)
    )
    for net, act, pool in [
        ("relu", nn.ReLU, nn.MaxPool2d),
        ("gelu", nn.GELU, nn.MaxPool2d),
        ("smooth", nn.GELU, nn.AvgPool2d),
    ]:
        copy = fidelity.smooth_copy(model, net)
        assert isinstance(copy[1], act) and isinstance(copy[2], pool)
        assert all(
            torch.equal(p, q) for p, q in zip(copy.parameters(), model.parameters(), strict=True)
        )
    assert isinstance(model[1], nn.ReLU) and isinstance(model[2], nn.MaxPool2d)
    with pytest.raises(ValueError, match="net must be one of"):
        fidelity.smooth_copy(model, "tanh")


def test_cast_tasks_keeps_labels():
    batch = TaskBatch(
        torch.zeros(2, 3, 4),
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(2, 1, 4),
        torch.zeros(2, 1, dtype=torch.long),
    )
    cast = fidelity.cast_tasks(batch, torch.float64)
    assert cast.support_x.dtype == torch.float64 and cast.support_y.dtype == torch.long


def _flat_pieces(model: nn.Module):
    """The model's loss as a function of one flat parameter vector, by plain tensor algebra."""
    shapes = [p.shape for p in model.parameters()]
    activation = model[1]

    def loss(theta, x, y):
        parts, i = [], 0
        for shape in shapes:
            parts.append(theta[i : i + shape.numel()].view(shape))
            i += shape.numel()
        w1, b1, w2, b2 = parts
        return (((activation(x @ w1.T + b1) @ w2.T + b2) - y) ** 2).mean()

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return loss, theta, shapes


def _grad(f, theta, *args):
    theta = theta.detach().requires_grad_(True)
    return torch.autograd.grad(f(theta, *args), theta)[0]


def test_fo_maml_error_is_the_dropped_hessian_term():
    # MAML - FO-MAML = -alpha * mean_i H_i v_i (one step, Hessian on the support set); the
    # Hessian-vector products here come from torch.autograd, not from the library.
    model, batch = mlp(nn.Tanh), tasks64()
    loss, theta, _ = _flat_pieces(model)
    dropped, exact = [], []
    for t in range(TASKS):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        u = theta - ALPHA * _grad(loss, theta, sx, sy)
        v = _grad(loss, u, qx, qy)
        _, hv = hvp(lambda th, sx=sx, sy=sy: loss(th, sx, sy), theta, v)
        dropped.append(-ALPHA * hv)
        exact.append(v - ALPHA * hv)
    dropped, exact = torch.stack(dropped).mean(0), torch.stack(exact).mean(0)
    expected = float(dropped.norm() / exact.norm())

    rows = fidelity.measure(
        model,
        nn.functional.mse_loss,
        batch,
        MAML(ALPHA),
        [],
        dtypes=[torch.float64],
        nets=["relu"],
        kinks=False,
    )
    (fo,) = rows
    assert fo.method == "FO-MAML"
    assert fo.relative_error == pytest.approx(expected, rel=1e-9)
    assert fo.exact_norm == pytest.approx(float(exact.norm()), rel=1e-9)


def test_hf_maml_error_on_a_smooth_net_falls_as_delta_squared():
    rules = [fidelity.Rule("scale", c) for c in (1e-2, 1e-3)]
    rows = fidelity.measure(
        mlp(nn.Tanh),
        nn.functional.mse_loss,
        tasks64(),
        MAML(ALPHA),
        rules,
        dtypes=[torch.float64],
        nets=["relu"],
        kinks=False,
    )
    coarse, fine = (r.relative_error for r in rows[1:])
    # The central difference's truncation error is O(delta^2) on a smooth loss.
    assert 50 < coarse / fine < 200
    assert fine < 1e-5


def test_hf_maml_is_exact_on_a_quadratic_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1)).double()
    rows = fidelity.measure(
        model,
        nn.functional.mse_loss,
        tasks64(),
        MAML(ALPHA),
        [fidelity.Rule("scale", 0.1), fidelity.Rule("fixed", 1.0)],
        dtypes=[torch.float64],
        nets=["relu"],
        kinks=False,
    )
    assert rows[0].relative_error > 1e-3  # FO-MAML drops a real Hessian term
    assert all(r.relative_error < 1e-12 for r in rows[1:])


def test_relu_flips_match_a_direct_count():
    model, batch = mlp(nn.ReLU), tasks64()
    loss, theta, shapes = _flat_pieces(model)
    n1 = shapes[0].numel()
    for scale in (1e-4, 0.3):
        flipped = total = 0
        for t in range(TASKS):
            sx, sy, qx, qy = (
                batch.support_x[t],
                batch.support_y[t],
                batch.query_x[t],
                batch.query_y[t],
            )
            u = theta - ALPHA * _grad(loss, theta, sx, sy)
            v = _grad(loss, u, qx, qy)
            delta = scale / v.norm()
            signs = []
            for point in (theta + delta * v, theta - delta * v):
                w1 = point[:n1].view(shapes[0])
                b1 = point[n1 : n1 + shapes[1].numel()]
                signs.append(sx @ w1.T + b1 > 0)
            flipped += int((signs[0] != signs[1]).sum())
            total += signs[0].numel()
        algorithm = fidelity.Rule("scale", scale).algorithm(ALPHA, 1, "inner")
        counts = fidelity.kink_fractions(model, nn.functional.mse_loss, batch, algorithm)
        assert counts["relu"] == flipped / total
        assert math.isnan(counts["pool"])
        if scale == 0.3:
            assert flipped > 0


def test_pool_flips_counted_and_one_step_required():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)
    ).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(2, -1)
    batch = TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    loss = nn.functional.cross_entropy
    tiny = fidelity.kink_fractions(
        model, loss, batch, fidelity.Rule("fixed", 1e-12).algorithm(0.4, 1, "inner")
    )
    assert tiny == {"relu": 0.0, "pool": 0.0}
    large = fidelity.kink_fractions(
        model, loss, batch, fidelity.Rule("scale", 1.0).algorithm(0.4, 1, "inner")
    )
    assert 0 < large["relu"] < 1 and 0 < large["pool"] < 1
    with pytest.raises(ValueError, match="inner_steps=2"):
        fidelity.kink_fractions(
            model, loss, batch, fidelity.Rule("scale", 1.0).algorithm(0.4, 2, "inner")
        )


def test_summary_and_table():
    rows = [
        fidelity.Row("init", b, "float64", "relu", "FO-MAML", 0.1 * (b + 1), 0.9, 2.0)
        for b in range(2)
    ]
    (entry,) = fidelity.summarize(rows)
    assert entry["relative_error"] == pytest.approx(0.15) and entry["batches"] == 2
    table = fidelity.markdown([entry])
    assert "| FO-MAML | 0.15 (0.9000) |  |  |" in table


@pytest.mark.slow
def test_script_on_the_sinusoid_recipe(tmp_path):
    learner, _ = fidelity.load_recipe(str(REPO / "recipes" / "sinusoid" / "maml.yaml"), [])
    with torch.no_grad():
        for p in learner.parameters():
            p.mul_(0.5)
    checkpoint = tmp_path / "half.ckpt"
    torch.save({"state_dict": learner.state_dict(), "global_step": 7}, checkpoint)
    output = tmp_path / "fidelity.json"
    argv = [
        "--config",
        str(REPO / "recipes" / "sinusoid" / "maml.yaml"),
        "--checkpoints",
        "init",
        str(checkpoint),
        "--batches",
        "2",
        "--scales",
        "1e-3",
        "--fixed",
        "0.01",
        "--nets",
        "relu",
        "gelu",
        "--output",
        str(output),
    ]
    assert fidelity.main(argv) == 0
    result = json.loads(output.read_text())
    points = {s["point"] for s in result["summary"]}
    assert points == {"init (step 0)", "half.ckpt (step 7)"}
    methods = {s["method"] for s in result["summary"]}
    assert methods == {
        "FO-MAML",
        "HF-MAML delta_scale=0.001",
        "HF-MAML delta=0.01",
        fidelity.NOISE,
    }
    norms = {s["point"]: s["exact_norm"] for s in result["summary"] if s["method"] == "FO-MAML"}
    assert norms["init (step 0)"] != norms["half.ckpt (step 7)"]
    # 2 batches x 2 points x 2 nets x 2 dtypes x 3 methods, and as many noise rows
    assert len(result["rows"]) == 48 + 16
    noise = [r for r in result["rows"] if r["method"] == fidelity.NOISE]
    assert len(noise) == 16 and all(r["relative_error"] > 0.05 for r in noise)
    # On the smooth net in float64, a small step leaves only a tiny truncation error.
    smooth = [
        r["relative_error"]
        for r in result["rows"]
        if (r["dtype"], r["net"], r["method"]) == ("float64", "gelu", "HF-MAML delta_scale=0.001")
    ]
    assert len(smooth) == 4 and max(smooth) < 1e-5


@pytest.mark.slow
def test_smoothing_rules_rows_kinks_and_timing():
    batch = tasks64()
    rules = fidelity.rules_from([0.01], [], None, radii=[1e-3], samples=[2])
    assert [r.name for r in rules] == ["delta_scale=0.01", "smoothing mu=0.001 b=2"]
    # On a ReLU net the finite difference's rows count kinks; the smoothing rule has no step to
    # count them along.
    rows = fidelity.measure(
        mlp(nn.ReLU),
        nn.functional.mse_loss,
        batch,
        MAML(ALPHA),
        rules,
        dtypes=[torch.float64],
        nets=["relu"],
    )
    fd, smoothing = rows[1:]
    assert smoothing.method == "HF-MAML smoothing mu=0.001 b=2"
    assert not math.isnan(fd.relu_flips) and math.isnan(smoothing.relu_flips)
    # Many directions on a smooth 33-parameter net: close to MAML, far from FO-MAML's error.
    many = fidelity.rules_from([], [], None, radii=[1e-3], samples=[1000])
    rows = fidelity.measure(
        mlp(nn.Tanh),
        nn.functional.mse_loss,
        batch,
        MAML(ALPHA),
        many,
        dtypes=[torch.float64],
        nets=["relu"],
    )
    assert rows[1].relative_error < 0.5 * rows[0].relative_error

    model = mlp(nn.Tanh)
    times = fidelity.time_methods(model, nn.functional.mse_loss, batch, MAML(ALPHA), rules[:1], 1)
    assert set(times) == {"MAML (exact)", "FO-MAML", "HF-MAML delta_scale=0.01"}
    assert all(0 < ms < 60_000 for ms in times.values())
    table = fidelity.markdown(fidelity.summarize(rows), {rows[0].point: times})
    assert "| ms / meta-step |" in table and "| FO-MAML |" in table
