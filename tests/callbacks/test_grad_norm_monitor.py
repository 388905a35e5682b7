"""GradNormMonitor under real Trainers, against norms computed by hand with torch.autograd."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_maml import FOMAML, HFMAML, MAML, MetaLearner, TaskBatch
from lightning_maml.callbacks import GradNormMonitor
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP

# The tiny fits train on a bare DataLoader: MetaLearner's validation_step has nothing to run.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step`")

ALPHA = 0.1
STEPS = 2
DELTA_SCALE = 0.01
NAMES = ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
LAYERS = {"model.0": [0, 1], "model.2": [2, 3]}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def tiny_tasks() -> TaskBatch:
    """Two regression tasks ``y = sin(x @ w_i)`` with 4 support and 5 query points."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 2, 1, generator=g, dtype=torch.float64)
    sx = torch.randn(2, 4, 2, generator=g, dtype=torch.float64)
    qx = torch.randn(2, 5, 2, generator=g, dtype=torch.float64)
    return TaskBatch(sx, torch.sin(sx @ w), qx, torch.sin(qx @ w))


# -- the reference, written out with torch.autograd -----------------------------------------


def forward(params: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def loss(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    return ((forward(params, x) - y) ** 2).mean()


def gradient(
    params: list[Tensor], x: Tensor, y: Tensor, create_graph: bool = False
) -> list[Tensor]:
    if not create_graph:
        params = [p.detach().requires_grad_() for p in params]
    return list(torch.autograd.grad(loss(params, x, y), params, create_graph=create_graph))


def norm(tensors: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t**2).sum() for t in tensors))


def exact_hvp(params: list[Tensor], vector: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    params = [p.detach().requires_grad_() for p in params]
    grads = gradient(params, x, y, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
    return list(torch.autograd.grad(dot, params))


def by_hand(variant: str, model: nn.Module, tasks: TaskBatch) -> tuple[list[Tensor], dict]:
    """The mean meta-gradient over tasks and every statistic the callback logs."""
    w0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
    metas, stats = [], []
    for i in range(tasks.num_tasks):
        sx, sy = tasks.support_x[i], tasks.support_y[i]
        qx, qy = tasks.query_x[i], tasks.query_y[i]
        s = {"support": [], "inner_norm": [], "delta": [], "hvp_norm": []}
        w, points = w0, []
        for _ in range(STEPS):
            s["support"].append(loss(w, sx, sy).detach())
            g = gradient(w, sx, sy, create_graph=variant == "MAML")
            s["inner_norm"].append(norm(g).detach())
            points.append([p.detach() for p in w])
            w = [p - ALPHA * gp for p, gp in zip(w, g, strict=True)]
        s["before"] = loss(w0, qx, qy).detach()
        s["after"] = loss(w, qx, qy).detach()
        if variant == "MAML":
            meta = list(torch.autograd.grad(loss(w, qx, qy), w0))
        else:
            meta = gradient(w, qx, qy)
        if variant == "HFMAML":
            # Backwards along the inner trajectory, a central difference in the direction meta.
            for point in reversed(points):
                delta = DELTA_SCALE / norm(meta)
                plus = gradient([p + delta * v for p, v in zip(point, meta, strict=True)], sx, sy)
                minus = gradient([p - delta * v for p, v in zip(point, meta, strict=True)], sx, sy)
                hvp = [(a - b) / (2 * delta) for a, b in zip(plus, minus, strict=True)]
                # It is an estimate of the Hessian-vector product (error O(delta^2) here).
                for estimate, exact in zip(hvp, exact_hvp(point, meta, sx, sy), strict=True):
                    torch.testing.assert_close(estimate, exact, rtol=1e-3, atol=1e-6)
                meta = [v - ALPHA * h for v, h in zip(meta, hvp, strict=True)]
                s["delta"].insert(0, delta)
                s["hvp_norm"].insert(0, norm(hvp))
        metas.append(meta)
        stats.append(s)
    mean_meta = [sum(m[k] for m in metas) / len(metas) for k in range(len(w0))]
    mean = lambda key, j=None: float(  # noqa: E731
        sum(s[key] if j is None else s[key][j] for s in stats) / len(stats)
    )
    expected = {
        "grad_norm/meta": float(norm(mean_meta)),
        "loss/query_before": mean("before"),
        "loss/query_after": mean("after"),
    }
    for j in range(STEPS):
        expected[f"grad_norm/inner_step_{j}"] = mean("inner_norm", j)
        expected[f"loss/support_step_{j}"] = mean("support", j)
        if variant == "HFMAML":
            expected[f"hfmaml/delta_step_{j}"] = mean("delta", j)
            expected[f"hfmaml/hvp_norm_step_{j}"] = mean("hvp_norm", j)
    return mean_meta, expected


# -- the callback under a real Trainer -----------------------------------------------------


def algorithm(variant: str):
    if variant == "HFMAML":
        return HFMAML(ALPHA, STEPS, delta_scale=DELTA_SCALE, track_loss_before=True)
    return {"MAML": MAML, "FOMAML": FOMAML}[variant](ALPHA, STEPS, track_loss_before=True)


def fit_one_step(variant: str, monitor: GradNormMonitor, tmp_path, **learner_kwargs) -> dict:
    """One meta-step on the tiny tasks; returns what was logged, as floats."""
    learner = MetaLearner(
        tiny_model(),
        algorithm(variant),
        "mse",
        meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        **learner_kwargs,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, DataLoader([tiny_tasks()], batch_size=None))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("variant", ["MAML", "FOMAML", "HFMAML"])
def test_logged_numbers_equal_a_hand_computation(variant, tmp_path):
    logged = fit_one_step(variant, GradNormMonitor(group_by="tensor"), tmp_path)
    meta, expected = by_hand(variant, tiny_model(), tiny_tasks())
    for name, tensor in zip(NAMES, meta, strict=True):
        expected[f"grad_norm/meta/{name}"] = float(torch.linalg.vector_norm(tensor))
    assert set(expected) <= set(logged)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # Without clipping there is no separate clipped norm; the learner's own norm agrees.
    assert "grad_norm/meta_clipped" not in logged
    assert logged["train/grad_norm"] == pytest.approx(expected["grad_norm/meta"], rel=1e-9)
    # Only HF-MAML has finite differences.
    assert any(k.startswith("hfmaml/") for k in logged) == (variant == "HFMAML")


@pytest.mark.parametrize("norm_type", [1, "inf"])
def test_any_norm_type_per_layer(norm_type, tmp_path):
    logged = fit_one_step("MAML", GradNormMonitor(norm_type, group_by="layer"), tmp_path)
    meta, _ = by_hand("MAML", tiny_model(), tiny_tasks())
    p = float(norm_type)
    flat = torch.cat([t.flatten() for t in meta])
    assert logged["grad_norm/meta"] == pytest.approx(float(torch.linalg.vector_norm(flat, p)))
    for layer, indices in LAYERS.items():
        entries = torch.cat([meta[i].flatten() for i in indices])
        value = float(torch.linalg.vector_norm(entries, p))
        assert logged[f"grad_norm/meta/{layer}"] == pytest.approx(value, rel=1e-9), layer
    assert not any(name in key for key in logged for name in NAMES)


def test_clipping_logs_both_the_meta_gradient_and_what_the_optimizer_applies(tmp_path):
    logged = fit_one_step("FOMAML", GradNormMonitor(), tmp_path, gradient_clip_val=1e-3)
    _, expected = by_hand("FOMAML", tiny_model(), tiny_tasks())
    assert expected["grad_norm/meta"] > 1e-2
    assert logged["grad_norm/meta"] == pytest.approx(expected["grad_norm/meta"], rel=1e-9)
    assert logged["grad_norm/meta_clipped"] == pytest.approx(1e-3, rel=1e-5)


def test_logs_every_step_through_the_logger(tmp_path):
    learner = MetaLearner(MLP(hidden=8), HFMAML(0.01, 2))
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[GradNormMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2, shots=5, query_shots=5))
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for key in [
        "grad_norm/meta",
        "grad_norm/inner_step_1",
        "hfmaml/delta_step_1",
        "loss/query_after",
    ]:
        column = header.index(key)
        values = [line.split(",")[column] for line in lines[1:]]
        assert len([v for v in values if v]) == 3, key
        assert all(math.isfinite(float(v)) for v in values if v)


def test_tensorboard_gets_the_same_series(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner = MetaLearner(MLP(hidden=8), HFMAML(0.01, 2))
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=TensorBoardLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[GradNormMonitor(group_by="layer")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2, shots=5, query_shots=5))
    events = EventAccumulator(str(trainer.logger.log_dir))
    events.Reload()
    for key in ["grad_norm/meta", "grad_norm/meta/model.2", "hfmaml/delta_step_1", "train/loss"]:
        assert [e.step for e in events.Scalars(key)] == [0, 1, 2], key


class CountingMonitor(GradNormMonitor):
    """Records the global step of every norm computation."""

    def __init__(self) -> None:
        super().__init__()
        self.computed_at: list[int] = []
        self.trainer: L.Trainer | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        self.trainer = trainer

    def _grad_norms(self, pl_module):
        self.computed_at.append(self.trainer.global_step)
        return super()._grad_norms(pl_module)


def test_norms_are_computed_only_on_logging_steps(tmp_path):
    monitor = CountingMonitor()
    learner = MetaLearner(MLP(hidden=8), FOMAML(0.01))
    trainer = L.Trainer(
        max_steps=7,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=3,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2, shots=5, query_shots=5))
    # Computed (before and after clipping) on the logging steps 2 and 5 only, not on all 7.
    assert monitor.computed_at == [2, 2, 5, 5]
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    logged = {int(r["step"]): r for r in rows if r.get("grad_norm/meta")}
    # Lightning writes steps 2 and 5 (every third step); the monitor's norms are there, and
    # equal to the learner's own norm of the same step.
    assert sorted(logged) == [2, 5]
    for row in logged.values():
        assert float(row["grad_norm/meta"]) == pytest.approx(float(row["train/grad_norm"]))


def test_fast_dev_run_logs_the_norms():
    learner = MetaLearner(MLP(hidden=8), FOMAML(0.01))
    trainer = L.Trainer(fast_dev_run=True, callbacks=[GradNormMonitor()], enable_progress_bar=False)
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=2, shots=5, query_shots=5))
    assert "grad_norm/meta" in trainer.callback_metrics


def test_other_modules_get_gradient_norms_and_a_warning(tmp_path):
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        log_every_n_steps=1,
        callbacks=[GradNormMonitor(group_by="layer")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="records no `last_meta_step`"):
        trainer.fit(BoringModel())
    assert {"grad_norm/meta", "grad_norm/meta/layer"} <= set(trainer.callback_metrics)
    assert not any(key.startswith("loss/") for key in trainer.callback_metrics)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm_type": 0}, "norm_type=0"),
        ({"norm_type": -2.0}, "positive number"),
        ({"norm_type": "l2"}, "'inf' for the largest entry"),
        ({"norm_type": True}, "norm_type=True"),
        ({"group_by": "module"}, "'none' .*'tensor' .*'layer'"),
    ],
)
def test_bad_arguments_say_how_to_fix_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradNormMonitor(**kwargs)


def _fit_sinusoid(devices: int) -> dict[str, float]:
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        log_every_n_steps=1,
        callbacks=[GradNormMonitor(group_by="layer")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    learner = MetaLearner(MLP(hidden=8), HFMAML(0.05, 2, track_loss_before=True))
    trainer.fit(learner, datamodule=SinusoidDataModule(meta_batch_size=4, shots=5, query_shots=5))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_log_what_one_process_logs_for_the_same_meta_batch():
    # meta_batch_size is global: two ranks of 2 tasks see the tasks one process sees.
    single = _fit_sinusoid(devices=1)
    ddp = _fit_sinusoid(devices=2)
    keys = [k for k in single if k.startswith(("grad_norm/", "loss/", "hfmaml/"))]
    assert len(keys) == 14  # meta, 3 layers, 2 query losses, 2 x (support, inner, delta, hvp)
    for key in keys:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
