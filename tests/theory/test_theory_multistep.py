"""The N-step planner and step size against hand computations; N = 1 is the one-step plan.

What Ji, Yang and Liang (JMLR 2022) could be read for here is their abstracts only (the theorem
statements were not reachable; see :mod:`lightning_maml.theory.multistep`), so the tests against
the paper check the two claims the abstracts make, written out here independently of the module:
the inner step size inversely proportional to N, and a complexity linear in N at such a step
size. The constants are checked against hand computations of this project's formulas.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lightning_maml.cli import main
from lightning_maml.theory import HFMAML_CONSTANTS, MAML_CONSTANTS, compute_plan
from lightning_maml.theory.multistep import (
    curvature_factor,
    hessian_chain_factor,
    inner_lr_bound,
)
from lightning_maml.theory.step_size import local_smoothness, theory_step_size

SETTING = {"L": 1.0, "rho": 10.0, "sigma": 2.0, "sigma_tilde": 5.0, "sigma_H": 20.0}


def test_the_factors_by_hand():
    assert curvature_factor(1) == 4.0  # (1 + 1)^2: Fallah et al.'s 4 L
    assert curvature_factor(2) == pytest.approx(1.5**4)  # 5.0625
    assert curvature_factor(10) == pytest.approx(1.1**20)  # 6.7275
    assert hessian_chain_factor(1) == 1.0
    assert hessian_chain_factor(2) == pytest.approx(2 * 1.5**3)  # 6.75
    assert hessian_chain_factor(5) == pytest.approx(5 * 1.2**12)
    assert inner_lr_bound(1 / 6, 4.0, 5) == pytest.approx(1 / 120)


@pytest.mark.parametrize("constants", [MAML_CONSTANTS, HFMAML_CONSTANTS])
def test_inner_lr_bound_is_inversely_proportional_to_n(constants):
    # Ji et al. 2022, JMLR abstract: "an inner-stage stepsize needs to be chosen inversely
    # proportional to the number N of inner-stage steps". N = 1 is Fallah et al.'s bound.
    one = compute_plan(constants, inner_lr=0.01, eps=2.0, **SETTING).inner_lr_max
    assert one == constants.inner_lr_factor / SETTING["L"]
    for n in (2, 3, 10, 64):
        plan = compute_plan(constants, inner_lr=0.01, eps=2.0, inner_steps=n, **SETTING)
        assert plan.inner_lr_max == pytest.approx(one / n)


def test_complexity_is_linear_in_n_at_the_largest_inner_lr():
    # Ji, Yang and Liang, arXiv 2002.07836v2 abstract: "N-step MAML attains the convergence with
    # linearly increasing complexity with N under a properly chosen inner stepsize". With
    # alpha = 1 / (N L) the planned iterations stay below an N-free bound, so N inner gradients
    # per task and iteration cost O(N). The bound, written out: (1 + 1/N)^(2N) < e^2 and
    # N (1 + 1/N)^(3(N - 1)) alpha < e^3 / L in the iteration formula of the one-step plan
    # (Delta (L + rho alpha (sigma + eps)) / eps^2, Fallah et al. 2020).
    L, rho, sigma, eps = SETTING["L"], SETTING["rho"], SETTING["sigma"], 2.0
    bound = (math.e**2 / 4 * L + math.e**3 * rho / L * (sigma + eps)) / eps**2
    iterations = []
    for n in (1, 2, 5, 10, 100, 1000):
        alpha = MAML_CONSTANTS.inner_lr_factor / (n * L)
        plan = compute_plan(MAML_CONSTANTS, inner_lr=alpha, eps=eps, inner_steps=n, **SETTING)
        assert plan.raw_iterations < bound
        iterations.append(plan.raw_iterations)
    # Bounded, and settling: from N = 100 to 1000 the count changes by under 5 %, so the cost
    # N * iterations grows like N.
    assert iterations[-1] == pytest.approx(iterations[-2], rel=0.05)


def test_n_step_plan_against_a_hand_computation():
    one = compute_plan(MAML_CONSTANTS, inner_lr=0.1, eps=2.0, **SETTING)
    two = compute_plan(MAML_CONSTANTS, inner_lr=0.1, eps=2.0, inner_steps=2, **SETTING)
    # By hand, N = 2, L = 1, rho = 10, alpha = 0.1, sigma = 2, eps = 2:
    #   inner_lr_max = 1 / (2 * 1) = 0.5
    #   max_step = (1/12) / (1.5^4 * 1) = 1 / 60.75 = 0.016461
    #   iterations = (1.5^4 / 4 * 1 + 2 * 1.5^3 * 10 * 0.1 * (2 + 2)) / 4
    #              = (1.265625 + 27) / 4 = 7.0664 -> 8
    assert two.inner_lr_max == 0.5
    assert two.max_step == pytest.approx(1 / 60.75)
    assert two.raw_iterations == pytest.approx(7.06640625)
    assert two.iterations == 8
    # The batch sizes are the one-step theorem's (see the multistep module).
    for field in ("task_batch", "inner_shots", "query_shots", "hessian_shots", "step_tasks"):
        assert getattr(two, field) == getattr(one, field)
    rows = {line.name: line.how for line in two.lines}
    assert "1 / (N L), N = 2" in rows["inner_lr"]
    assert "(1 + 1/N)^(2N)" in rows["iterations"]


@pytest.mark.parametrize("constants", [MAML_CONSTANTS, HFMAML_CONSTANTS])
def test_one_inner_step_is_the_one_step_plan(constants):
    default = compute_plan(constants, inner_lr=0.1, eps=2.0, **SETTING)
    explicit = compute_plan(constants, inner_lr=0.1, eps=2.0, inner_steps=1, **SETTING)
    assert dataclasses.asdict(default) == dataclasses.asdict(explicit)
    assert default.max_step == constants.step_size / 4  # c / (4 L), L = 1
    assert default.raw_iterations == pytest.approx((1 + 10 * 0.1 * 4) / 4)


def test_n_step_smoothness_and_step_size_by_hand():
    norms = torch.tensor([1.0, 3.0])  # mean 2
    # N = 1: 4 L + 2 rho alpha mean = 4 * 2 + 2 * 0.5 * 0.1 * 2 = 8.2
    assert local_smoothness(2.0, 0.5, 0.1, norms) == pytest.approx(8.2)
    # N = 5: 1.2^10 * 2 + 5 * 1.2^12 * 2 * 0.5 * 0.1 * 2
    expected = 1.2**10 * 2 + 5 * 1.2**12 * 0.2
    assert local_smoothness(2.0, 0.5, 0.1, norms, inner_steps=5) == pytest.approx(expected)
    beta, L_tilde = theory_step_size(2.0, 0.0, 0.1, 1 / 12, None, inner_steps=10)
    assert L_tilde == pytest.approx(1.1**20 * 2)
    assert beta == pytest.approx(1 / 12 / L_tilde)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_inner_steps_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1"):
        compute_plan(MAML_CONSTANTS, inner_lr=0.1, eps=2.0, inner_steps=bad, **SETTING)


def test_plan_command_takes_inner_steps(tmp_path, capsys):
    args = ["--L", "4", "--rho", "0", "--sigma", "1", "--sigma_tilde", "2", "--sigma_H", "1"]
    args += ["--inner_lr", "0.02", "--eps", "2", "--variants", "maml", "--inner_steps", "10"]
    assert main(["plan", *args, "--write_config", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    assert "inner_lr <= 1 / (N L), N = 10" in out  # 0.025: 0.02 is inside
    assert "inner_steps: 10" in (tmp_path / "p.yaml").read_text()


@pytest.mark.parametrize("inner_lr, warns", [(0.02, False), (0.05, True)])
def test_theory_step_size_with_n_inner_steps(tmp_path, inner_lr, warns):
    import functools
    import warnings

    from lightning.pytorch import Trainer

    from datamodules import LinearTasksDataModule
    from lightning_maml import MAML, MetaLearner
    from lightning_maml.callbacks import TheoryStepSize

    module = MetaLearner(
        torch.nn.Linear(10, 1, bias=False),
        MAML(inner_lr, inner_steps=10, hessian_batch="independent"),
        loss="mse",
        meta_optimizer=functools.partial(torch.optim.SGD, lr=1.0),
    )
    step_size = TheoryStepSize(L=4.0, rho=0.0)
    trainer = Trainer(
        max_steps=1,
        callbacks=[step_size],
        logger=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    data = LinearTasksDataModule(shots=5, query_shots=5, hessian_shots=5, meta_batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    messages = [str(w.message) for w in caught if "above the theorem's" in str(w.message)]
    # 1 / (N L) = 1 / 40 = 0.025: 0.02 is inside, 0.05 outside.
    assert bool(messages) is warns
    if warns:
        assert "inner_lr 0.05 is above the theorem's 1 / (inner_steps L) = 0.025" in messages[0]
    assert step_size.L_tilde == pytest.approx(1.1**20 * 4)
    assert step_size.beta == pytest.approx(1 / 12 / (1.1**20 * 4))
