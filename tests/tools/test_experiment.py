"""The theorems' claims on a small instance of the experiment, and the experiment's plumbing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_maml.theory import LinearTaskFamily
from lightning_maml.tools.experiment import (
    bound_with_unit_constant,
    final_level,
    linear_curves,
    log_wandb,
    main,
    plot_sinusoid,
    sinusoid_part,
    steps_to_eps,
)

STEPS, TAIL = 2000, 500


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids synchronisation costs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_theorems_claims_on_linear_tasks():
    """Fixed seed 0; B = 20 tasks and 50 examples per data batch, 4x = 80 and 200."""
    small = linear_curves([("fomaml", 0.025), ("fomaml", 0.05), ("maml", 0.05)], steps=STEPS)
    large = linear_curves(
        [("fomaml", 0.05), ("maml", 0.05), ("hfmaml", 0.05)], tasks=80, shots=200, steps=STEPS
    )
    small = {run: final_level(curve, TAIL) for run, curve in small.items()}
    large = {run: final_level(curve, TAIL) for run, curve in large.items()}

    # FO-MAML's final ||grad F|| grows between 1.5x and 2.5x when inner_lr doubles ...
    assert 1.5 <= small[("fomaml", 0.05)] / small[("fomaml", 0.025)] <= 2.5
    # ... and changes by less than 20% when the batch sizes grow 4x: a floor, near the exact one.
    assert abs(large[("fomaml", 0.05)] / small[("fomaml", 0.05)] - 1) < 0.2
    floor = LinearTaskFamily().fomaml_floor(0.05)
    assert large[("fomaml", 0.05)] == pytest.approx(floor, rel=0.1)
    # MAML's falls at least 1.5x when the batch sizes grow 4x.
    assert small[("maml", 0.05)] / large[("maml", 0.05)] >= 1.5
    # At the largest inner_lr with the larger batches, MAML and HF-MAML end 3x below FO-MAML.
    assert large[("fomaml", 0.05)] >= 3 * large[("maml", 0.05)]
    assert large[("fomaml", 0.05)] >= 3 * large[("hfmaml", 0.05)]


def test_curves_start_at_the_exact_value_and_share_the_task_stream():
    curves = linear_curves([("maml", 0.025), ("hfmaml", 0.025)], tasks=4, shots=5, steps=3)
    exact = LinearTaskFamily().grad_F_norm(np.zeros(10), 0.025)
    assert all(len(c) == 4 and c[0] == pytest.approx(exact) for c in curves.values())
    # rho = 0: HF-MAML's finite difference is exact, so on the same tasks with the same step it
    # would match MAML; its smaller c (1/25 against 1/12) is the only difference here.
    maml, hfmaml = curves[("maml", 0.025)], curves[("hfmaml", 0.025)]
    assert maml[1] < hfmaml[1] < maml[0]


def test_final_level_is_the_tail_mean():
    assert final_level(np.array([9.0, 1.0, 2.0, 3.0]), 3) == 2.0


def test_command_writes_figure_and_results(tmp_path, capsys):
    threads = str(torch.get_num_threads())  # main() sets it; leave it as the session had it
    args = ["--output", str(tmp_path), "--steps", "6", "--tail", "2", "--threads", threads]
    assert main([*args, "--sinusoid_steps", "0", "--no_wandb"]) == 0
    assert (tmp_path / "linear.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["variant"], r["inner_lr"], r["spread"], r["tasks"]) for r in results["linear"]}
    assert len(runs) == 2 * 9 + 2 * 2  # 3 variants x 3 inner_lr x 2 batch sizes; 2 spreads x 2
    assert "exact FO-MAML floor =" in capsys.readouterr().out


def test_sinusoid_part_and_wandb_run(tmp_path):
    result = sinusoid_part(
        steps=4, every=2, seed=0, probe_tasks=4, probe_shots=10, monitor_tasks=4, monitor_shots=10
    )
    assert set(result["histories"]) == {"maml", "fomaml", "hfmaml"}
    assert [s for s, _, _ in result["histories"]["maml"]] == [0, 2, 4]
    assert result["step_tasks"] >= 1 and result["step_shots"] >= 1
    assert set(result["hfmaml_relative_error"]) >= {"theory", "delta_scale=0.01", "FO-MAML"}
    figure = tmp_path / "sinusoid.png"
    plot_sinusoid(result, figure)
    assert figure.stat().st_size > 10_000
    linear = {
        "curves": {
            (v, a, 1.0, s): np.ones(3)
            for v in ("maml", "fomaml", "hfmaml")
            for a in (0.0125, 0.025, 0.05)
            for s in (1, 4)
        },
        "records": [{"variant": "maml", "final": 1.0}],
    }
    log_wandb(tmp_path, linear, result, [figure])  # WANDB_MODE=offline (tests/conftest.py)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Before, --steps 0 wrote tables and figures whose "final" level was the start.
        (
            ["--steps", "0"],
            "argument --steps: must be an integer >= 1, got 0 (with no step the final level is "
            "the starting point's)",
        ),
        (["--steps", "10", "--tail", "11"], "--tail 11 is more than --steps 10"),
        (["--tail", "0"], "argument --tail: must be an integer >= 1, got 0"),
        (["--every", "-5"], "argument --every: must be an integer >= 1, got -5"),
        (["--sinusoid_steps", "-1"], "argument --sinusoid_steps: must be an integer >= 0"),
        (["--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    ],
    ids=[
        "zero-steps",
        "tail-over-steps",
        "zero-tail",
        "negative-every",
        "negative-sinusoid",
        "zero-threads",
        "negative-seed",
    ],
)
def test_settings_that_would_give_meaningless_results_are_refused(args, message, tmp_path, capsys):
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", str(output), "--no_wandb", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()  # refused before anything is written


@pytest.mark.usefixtures("one_thread")
def test_steps_to_eps_records_the_first_step_at_each_eps():
    run = steps_to_eps("maml", 0.025, [8.5, 8.2, 0.001], tasks=4, shots=10, max_steps=40)
    family = LinearTaskFamily()
    assert run["start"] == pytest.approx(family.grad_F_norm(np.zeros(10), 0.025))
    assert run["Delta"] == pytest.approx(
        family.F(np.zeros(10), 0.025) - family.F(family.maml_optimum(0.025), 0.025)
    )
    assert 0 < run["reached"][8.5] < run["reached"][8.2] < 40
    assert run["reached"][0.001] is None and run["steps"] == 40  # not reached: ran to max_steps
    assert run["beta"] == pytest.approx(1 / 12 / 16)
    # The bound with O(1) = 1 on this family: Delta L / eps^2 (L = 4), and at N steps
    # (1 + 1/N)^(2N) / 4 times that.
    assert bound_with_unit_constant(2.0, 4.0, 0.5) == pytest.approx(32.0)
    assert bound_with_unit_constant(2.0, 4.0, 0.5, 2) == pytest.approx(32.0 * 1.5**4 / 4)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_constant_command_writes_what_plan_reads(tmp_path, capsys):
    args = ["--constant", "--output", str(tmp_path), "--no_wandb", "--max_steps", "30"]
    assert main([*args, "--eps", "8.6", "8.4", "8.2"]) == 0
    record = json.loads((tmp_path / "constant.json").read_text())
    assert set(record["per_variant"]) == {"maml", "hfmaml"}
    assert record["iteration_constant"] == max(record["per_variant"].values())
    maml = [r for r in record["rows"] if r["variant"] == "maml"]
    assert [r["eps"] for r in maml] == [8.6, 8.4, 8.2]
    for row in maml:
        assert row["ratio"] == pytest.approx(row["reached"] / row["bound_1"])
    assert record["per_variant"]["maml"] == max(r["ratio"] for r in maml)
    forced = record["forced"]["fomaml"]
    assert forced["exact_fomaml_floor"] == pytest.approx(LinearTaskFamily().fomaml_floor(0.05))
    assert [r["inner_steps"] for r in record["multistep"]] == [1, 2, 5, 10]
    capsys.readouterr()
    from lightning_maml.cli import main as cli_main

    plan = ["--L", "4", "--rho", "0", "--sigma", "1", "--sigma_tilde", "2", "--sigma_H", "1"]
    plan += ["--inner_lr", "0.025", "--eps", "1", "--variants", "maml"]
    assert cli_main(["plan", *plan, "--constant_from", str(tmp_path / "constant.json")]) == 0
    assert "per_variant.maml, linear family" in capsys.readouterr().out
