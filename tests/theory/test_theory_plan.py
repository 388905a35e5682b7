"""The planner against a hand computation, its refusal for FO-MAML, and `lightning-maml plan`."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from lightning_maml.cli import main
from lightning_maml.theory import (
    FOMAML_CONSTANTS,
    HFMAML_CONSTANTS,
    MAML_CONSTANTS,
    Unreachable,
    compute_plan,
    explain_plan,
    format_plan,
)

SETTING = {"L": 1.0, "rho": 10.0, "sigma": 2.0, "sigma_tilde": 5.0, "sigma_H": 20.0}


def test_maml_plan_against_a_hand_computation():
    plan = compute_plan(MAML_CONSTANTS, inner_lr=0.5, eps=2.0, **SETTING)
    # By hand: rho alpha sigma / L = 10 * 0.5 * 2 / 1 = 10.
    #   sqrt term: S <= eps^2 / (61 * (1 + 10)) = 4 / 671; linear: S <= eps L / (61 rho alpha)
    #   = 2 / 305 > 4 / 671, so the sqrt term binds. Each of the 3 shares is 4 / 2013.
    #   B    = sigma^2 / share = 4 * 2013 / 4 = 2013 (exactly: no rounding up)
    #   D_in = sigma_tilde^2 / share = 25 * 2013 / 4 = 12581.25 -> 12582
    #   D_o  = sigma_tilde^2 / (B share) = 25 / 4 = 6.25 -> 7
    #   D_h  = 2 (alpha sigma_H)^2 = 2 * 100 = 200
    #   B'   = 0.5 (rho alpha sigma / L)^2 = 0.5 * 100 = 50
    #   D_beta = (2 rho alpha sigma_tilde / L)^2 = 50^2 = 2500
    #   iterations = (L + rho alpha (sigma + eps)) / eps^2 = (1 + 5 * 4) / 4 = 5.25 -> 6
    assert (plan.task_batch, plan.inner_shots, plan.query_shots) == (2013, 12582, 7)
    assert (plan.hessian_shots, plan.step_tasks, plan.step_shots) == (200, 50, 2500)
    assert plan.iterations == 6
    assert plan.step_size_constant == pytest.approx(1 / 12)
    assert plan.max_step == pytest.approx(1 / 48)  # c / (4 L)
    assert plan.inner_lr_max == 1.0
    assert plan.delta_coefficient is None and plan.floor == 0.0
    # With the rounded sizes S = 4/2013 + 25/(2013 * 7) + 25/12582, and the bound stays below eps.
    s = 4 / 2013 + 25 / (2013 * 7) + 25 / 12582
    assert plan.guaranteed == pytest.approx(math.sqrt(671 * s))
    assert plan.guaranteed <= 2.0
    rows = {line.name: line for line in plan.lines}
    assert "sqrt term binds" in rows["S budget"].how
    assert "12581.25 -> 12582" in rows["D_in"].how.replace("1.258e+04", "12581.25")
    assert "6.25 -> 7" in rows["D_o"].how


def test_hfmaml_constants_and_delta():
    plan = compute_plan(HFMAML_CONSTANTS, inner_lr=0.1, eps=2.0, **SETTING)
    # HF-MAML: 6 and 36 instead of 61 and 61; ratio = 10 * 0.1 * 2 = 2.
    #   sqrt: 4 / (6 * 3) = 0.2222; linear: 2 * 1 / (36 * 10 * 0.1) = 0.0556 -> the linear term binds.
    #   share = 0.0556 / 3 = 1/54; B = 4 * 54 = 216; D_h = 36 (0.1 * 20)^2 = 144.
    assert plan.task_batch == 216
    assert plan.hessian_shots == 144
    assert plan.delta_coefficient == pytest.approx(1 / (6 * 10 * 0.1))
    assert plan.inner_lr_max == pytest.approx(1 / 6)
    assert "linear term binds" in {line.name: line for line in plan.lines}["S budget"].how


def test_fomaml_is_refused_below_its_floor():
    with pytest.raises(Unreachable, match=r"cannot reach eps = 2 .* floor 6\.1") as refusal:
        compute_plan(FOMAML_CONSTANTS, inner_lr=0.05, eps=2.0, **SETTING)
    # The floor: S' = 20 alpha^2 L^2 sigma^2 = 0.2; linear term 61 * 10 * 0.05 * 0.2 / 1 = 6.1
    # beats the sqrt term sqrt(61 * (1 + 1) * 0.2) = 4.94.
    assert refusal.value.floor == pytest.approx(6.1)
    needed = refusal.value.inner_lr_needed
    assert compute_plan(FOMAML_CONSTANTS, inner_lr=0.999 * needed, eps=2.0, **SETTING).floor < 2.0
    with pytest.raises(Unreachable):
        compute_plan(FOMAML_CONSTANTS, inner_lr=1.01 * needed, eps=2.0, **SETTING)


def test_fomaml_plan_spends_what_the_floor_leaves():
    setting = {**SETTING, "rho": 0.0}
    plan = compute_plan(FOMAML_CONSTANTS, inner_lr=0.001, eps=2.0, **setting)
    # floor = sqrt(61 * 20 * (0.001 * 1 * 2)^2) = 0.0699; budget = 4 / 61 - 20 * 4e-6, so
    # share = 0.021831 and B = 4 / share = 183.2 -> 184.
    assert plan.floor == pytest.approx(math.sqrt(61 * 20) * 0.002)
    assert plan.task_batch == 184
    assert plan.hessian_shots is None
    assert "the task spread dominates" in {line.name: line for line in plan.lines}["B"].how
    # A loose eps leaves B at the theorem's minimum of 20.
    loose = compute_plan(FOMAML_CONSTANTS, inner_lr=0.001, eps=20.0, **setting)
    assert loose.task_batch == 20
    assert "B >= 20 dominates" in {line.name: line for line in loose.lines}["B"].how


def test_inner_lr_outside_the_range_is_flagged_and_constants_are_parameters():
    plan = compute_plan(MAML_CONSTANTS, inner_lr=1.5, eps=2.0, **SETTING)
    assert "OUTSIDE" in plan.lines[0].how
    custom = dataclasses.replace(MAML_CONSTANTS, step_size=0.5)
    assert compute_plan(custom, inner_lr=0.5, eps=2.0, **SETTING).step_size_constant == 0.5


def test_the_numbers_explain_themselves_and_a_name_is_refused():
    plan = compute_plan(HFMAML_CONSTANTS, inner_lr=0.1, eps=2.0, **SETTING)
    text = format_plan(plan, "HF-MAML").splitlines()
    assert text[0] == "HF-MAML"
    lines = explain_plan(plan)
    assert len(text) == 1 + len(lines)
    assert all(row.startswith(line.name) for row, line in zip(text[1:], lines, strict=True))
    assert text[1 + [line.name for line in lines].index("B")].split()[1] == "216"
    with pytest.raises(ValueError, match=r"VariantConstants \(lightning_maml\.variants"):
        compute_plan("maml", inner_lr=0.1, eps=2.0, **SETTING)


def test_plan_command_from_json(tmp_path, capsys):
    source = tmp_path / "estimate.json"
    source.write_text(json.dumps({**SETTING, "inner_lr": 0.05, "tasks": 10}))
    assert main(["plan", "--from", str(source), "--eps", "2", "--variants", "maml", "hfmaml"]) == 0
    out = capsys.readouterr().out
    assert "MAML" in out and "HF-MAML" in out and "FO-MAML" not in out
    assert main(["plan", "--from", str(source), "--eps", "2", "--inner_lr", "0.5"]) == 2
    out = capsys.readouterr().out
    assert "REFUSED: FO-MAML cannot reach eps = 2" in out
    assert "D_beta" in out  # MAML and HF-MAML still planned


def test_plan_command_needs_every_constant(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--L", "1", "--eps", "0.1"])
    assert "missing --rho" in capsys.readouterr().err
