"""``lightning-maml plot``: PNGs from CSV-logged runs, and clear errors for what is not a run."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread

from lightning_maml import FOMAML, MetaLearner
from lightning_maml.callbacks import GradNormMonitor
from lightning_maml.cli import main
from lightning_maml.datamodules import SinusoidDataModule
from lightning_maml.models import MLP
from lightning_maml.tools.plot import DEFAULT_KEYS, load_run


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A CSV-logged fit of 4 meta-steps with validation at steps 2 and 4."""
    directory = tmp_path_factory.mktemp("csv")
    trainer = L.Trainer(
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(directory, name="sinusoid"),
        log_every_n_steps=1,
        callbacks=[GradNormMonitor(group_by="layer")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = SinusoidDataModule(meta_batch_size=2, shots=5, query_shots=5, num_val_tasks=4)
    trainer.fit(MetaLearner(MLP(hidden=8), FOMAML(0.01)), datamodule=data)
    return directory / "sinusoid" / "version_0"


def test_plot_writes_a_png_from_a_csv_logged_run(csv_run, tmp_path, capsys):
    png = tmp_path / "out" / "curves.png"
    assert main(["plot", str(csv_run), "--output", str(png)]) == 0
    assert png.stat().st_size > 1000
    height, width, _ = imread(png).shape
    assert height > 100 and width > 100
    assert "Wrote" in capsys.readouterr().out


def test_the_run_reads_back_with_its_steps(csv_run):
    run = load_run(csv_run / "metrics.csv")
    assert run.label == "sinusoid/version_0"
    assert run.series["train/loss"][0] == [0, 1, 2, 3]
    assert run.series["val/loss"][0] == [1, 3]
    assert {"train/loss", "val/loss", "train/grad_norm", "grad_norm/meta"} <= set(run.series)
    assert "step" not in run.series and "epoch" not in run.series
    assert set(DEFAULT_KEYS) - set(run.series) == {"train/accuracy", "val/accuracy"}


def test_several_runs_and_chosen_series(csv_run, tmp_path):
    png = tmp_path / "compare.png"
    argv = ["plot", str(csv_run), str(csv_run / "metrics.csv"), "-o", str(png)]
    assert main([*argv, "--keys", "grad_norm/*", "loss/query_after", "--yscale", "log"]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing", "missing does not exist"),
        (lambda d: d, "is not a run: pass a CSVLogger run directory"),
        (lambda d: _write(d / "other.csv", "a,b\n1,2\n"), "no 'step' column"),
        (lambda d: _write(d / "run-x.wandb", "not a log"), "not a W&B run file"),
        # Before: "None of train/loss, ... was logged; choose with --keys from: nothing."
        (
            lambda d: _write(d / "metrics.csv", "step,train/loss,note\n0,n/a,x\n1,-,y\n"),
            "metrics.csv: nothing to plot, its columns train/loss, note hold no numeric values. "
            "plot draws each numeric column against the number in 'step'",
        ),
        (
            lambda d: _write(d / "metrics.csv", "step,train/loss\nfirst,0.5\n"),
            "metrics.csv: nothing to plot, its 'step' column holds no numbers",
        ),
    ],
    ids=["missing", "empty-dir", "foreign-csv", "foreign-wandb", "text-values", "text-steps"],
)
def test_what_is_not_a_run_gets_a_clear_error(make, match, tmp_path, capsys):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(path), "-o", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_directory_above_runs_names_them(csv_run, capsys):
    with pytest.raises(SystemExit):
        main(["plot", str(csv_run.parent)])
    assert f"Runs below it: {csv_run}" in capsys.readouterr().err


def test_unknown_series_lists_the_logged_ones(csv_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["plot", str(csv_run), "--keys", "val/accuracy", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert "No logged series matches 'val/accuracy'" in err
    assert "grad_norm/meta/model.0" in err


def _write(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.slow
def test_the_readme_plot_commands_find_the_runs_where_the_recipes_write_them(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    recipe = str(repo / "recipes" / "sinusoid" / "maml.yaml")
    short = [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.num_val_tasks=4",
    ]
    runs = tmp_path / "runs"
    # The recipe's own logger (W&B, offline in tests), then the README's CSVLogger line.
    assert (
        main(["fit", "--config", recipe, f"--trainer.logger.init_args.save_dir={runs}", *short])
        is None
    )
    csv_logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger"]
    assert (
        main(
            ["fit", "--config", recipe, *csv_logger, "--trainer.logger.save_dir", str(runs), *short]
        )
        is None
    )
    readme = (repo / "README.md").read_text()
    commands = re.findall(r"^lightning-maml plot (runs/\S+)", readme, flags=re.MULTILINE)
    assert len(commands) == 2
    for pattern in commands:
        found = glob.glob(str(tmp_path / pattern))
        assert len(found) == 1, (pattern, sorted(p.name for p in runs.rglob("*")))
        png = tmp_path / "curves.png"
        assert main(["plot", *found, "--output", str(png)]) == 0
        assert png.stat().st_size > 1000
