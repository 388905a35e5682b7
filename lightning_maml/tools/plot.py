"""``lightning-maml plot``: a PNG of the logged curves of one or more runs, without W&B's UI.

Each run is a CSVLogger run (its directory, such as ``lightning_logs/version_0``, or its
``metrics.csv``) or a W&B run written offline or online (its directory, such as
``runs/wandb/offline-run-...`` or ``runs/wandb/latest-run``, or its ``.wandb`` file). One panel
per logged series, one line per run::

    lightning-maml plot runs/wandb/latest-run
    lightning-maml plot lightning_logs/version_0 lightning_logs/version_1 --keys 'grad_norm/*'
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Run",
    "load_run",
    "main",
    "plot_runs",
    "read_csv_run",
    "read_wandb_run",
    "wandb_records",
]

#: The series plotted when ``--keys`` is not given (those that some run logged).
DEFAULT_KEYS = (
    "train/loss",
    "val/loss",
    "train/grad_norm",
    "grad_norm/meta",
    "train/accuracy",
    "val/accuracy",
)
#: Columns and history keys that index the data rather than measure anything.
INDEX_KEYS = frozenset({"step", "epoch", "trainer/global_step"})

#: (steps, values) of one series.
Series = tuple[list[float], list[float]]


@dataclass
class Run:
    """The logged series of one run.

    Attributes:
        label: The run's name in the legend.
        series: Metric name to its (steps, values), in logging order.
    """

    label: str
    series: dict[str, Series]


class NotARunError(ValueError):
    """The path holds no CSVLogger or W&B run."""


def _append(series: dict[str, Series], key: str, step: float, value: float) -> None:
    steps, values = series.setdefault(key, ([], []))
    steps.append(step)
    values.append(value)


# -- CSVLogger -----------------------------------------------------------------------------


def read_csv_run(path: Path) -> dict[str, Series]:
    """The series of a CSVLogger ``metrics.csv``, by the global step of each row.

    Raises:
        NotARunError: If the file has no ``step`` column, or no numeric value to plot.
    """
    series: dict[str, Series] = {}
    numeric_steps = 0
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        columns = list(reader.fieldnames or [])
        if "step" not in columns:
            raise NotARunError(f"{path} has no 'step' column: it is not a CSVLogger metrics.csv.")
        for row in reader:
            step = _number(row["step"])
            if step is None:
                continue
            numeric_steps += 1
            # Each logging call writes its own row; the other metrics' cells stay empty.
            for key, cell in row.items():
                value = _number(cell) if key not in INDEX_KEYS else None
                if value is not None:
                    _append(series, key, step, value)
    if not series:
        metrics = [c for c in columns if c not in INDEX_KEYS]
        if not metrics:
            problem = "it has no metric column besides the index columns"
        elif not numeric_steps:
            problem = "its 'step' column holds no numbers"
        else:
            problem = f"its columns {', '.join(metrics)} hold no numeric values"
        raise NotARunError(
            f"{path}: nothing to plot, {problem}. plot draws each numeric column against the "
            "number in 'step' of the same row, as a CSVLogger metrics.csv holds them."
        )
    return series


def _number(cell: str | None) -> float | None:
    """The number in a CSV cell; None for an empty or non-numeric one."""
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        return None


# -- W&B -----------------------------------------------------------------------------------

# A .wandb file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records,
# each with a 7-byte header (CRC-32 of type byte + data, length, type); a record that does not
# fit in a block is split into FIRST, MIDDLE... LAST pieces; a block's last < 7 bytes are padding.
_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION = b":W&B", 0xBEE1, 0
_RECORD_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[bytes]:
    """The serialized ``wandb.proto`` ``Record`` s of a ``.wandb`` file, in order.

    A file that is still being written ends at its last complete record.

    Raises:
        NotARunError: If the file is not a W&B transaction log.
        ValueError: If a record's checksum does not match (a damaged file).
    """
    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size or _FILE_HEADER.unpack_from(data) != (
        _FILE_IDENT,
        _FILE_MAGIC,
        _FILE_VERSION,
    ):
        raise NotARunError(f"{path} is not a W&B run file (no ':W&B' log header).")
    position, pending = _FILE_HEADER.size, b""
    while True:
        left = _BLOCK - position % _BLOCK
        if left < _RECORD_HEADER.size:
            position += left
            continue
        if position + _RECORD_HEADER.size > len(data):
            return
        checksum, length, kind = _RECORD_HEADER.unpack_from(data, position)
        start = position + _RECORD_HEADER.size
        body = data[start : start + length]
        if kind == 0 or len(body) < length:
            return
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: damaged record at byte {position} (checksum mismatch).")
        position = start + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body


def read_wandb_run(path: Path) -> tuple[dict[str, Series], str]:
    """The history series of a ``.wandb`` file, by ``trainer/global_step``, and the run's label.

    Returns:
        The series, and the run's name (its id when it has none) with its tags.
    """
    from wandb.proto import wandb_internal_pb2

    series: dict[str, Series] = {}
    label = path.stem.removeprefix("run-")
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated, untyped
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name or record.run.run_id or label
            tags = list(record.run.tags)
            label = f"{name} ({', '.join(tags)})" if tags else name
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                value = json.loads(item.value_json)
                # Numbers only: media and tables have no curve.
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = float(value)
            step = row.get("trainer/global_step", record.history.step.num)
            for key, value in row.items():
                if key not in INDEX_KEYS and not key.startswith("_"):
                    _append(series, key, step, value)
    return series, label


# -- finding and plotting runs -------------------------------------------------------------


def _log_file(path: Path) -> Path:
    if path.is_file() and path.suffix in (".csv", ".wandb"):
        return path
    if path.is_dir():
        if (path / "metrics.csv").is_file():
            return path / "metrics.csv"
        found = sorted(path.glob("*.wandb"))
        if len(found) == 1:
            return found[0]
    hint = ""
    if path.is_dir():
        below = sorted({p.parent for p in [*path.rglob("metrics.csv"), *path.rglob("*.wandb")]})
        if below:
            hint = " Runs below it: " + ", ".join(str(p) for p in below[:5])
            hint += ", ..." if len(below) > 5 else "."
    problem = "does not exist" if not path.exists() else "is not a run"
    raise NotARunError(
        f"{path} {problem}: pass a CSVLogger run directory (with metrics.csv) or its "
        f"metrics.csv, or a W&B run directory (with a .wandb file) or its .wandb file.{hint}"
    )


def load_run(path: str | Path) -> Run:
    """Reads the run at ``path`` (see the module docstring for what a run is).

    Raises:
        NotARunError: If ``path`` holds no run.
    """
    path = Path(path)
    log = _log_file(path)
    if log.suffix == ".wandb":
        series, label = read_wandb_run(log)
        if not series:
            raise NotARunError(
                f"{log}: nothing to plot, the run has logged no numeric history (yet)."
            )
    else:
        series = read_csv_run(log)
        # A CSVLogger run directory is <save_dir>/<name>/version_<n>: name and version tell runs apart.
        label = "/".join(log.resolve().parent.parts[-2:])
    return Run(label, series)


def _log_scale(key: str, values: Sequence[float], yscale: str) -> bool:
    if yscale != "auto":
        return yscale == "log"
    # Gradient norms span decades over a run (the paper's measure of progress).
    return "norm" in key and all(v > 0 for v in values)


def plot_runs(
    runs: Sequence[Run], keys: Sequence[str], output: str | Path, yscale: str = "auto"
) -> Path:
    """Draws one panel per key, one line per run, and saves a PNG.

    Args:
        runs: The runs.
        keys: The series to draw, one panel each.
        output: The PNG file to write (its directory is created).
        yscale: ``"auto"`` (log for norms, linear otherwise), ``"linear"`` or ``"log"``.

    Returns:
        The path written.
    """
    # A bare Figure renders through Agg without touching pyplot's global backend state.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure = Figure(figsize=(4.8 * columns, 3.4 * rows), layout="constrained")
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, columns, index + 1)
        values_seen: list[float] = []
        for run in runs:
            if key not in run.series:
                continue
            steps, values = run.series[key]
            values_seen += values
            # Few points (validation curves) need markers to be seen at all.
            axes.plot(steps, values, label=run.label, marker="." if len(steps) <= 50 else None)
        if _log_scale(key, values_seen, yscale):
            axes.set_yscale("log")
        axes.set_title(key)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if len(runs) > 1:
            axes.legend(fontsize="small")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", dpi=100)
    return output


def _select(runs: Sequence[Run], patterns: Sequence[str] | None) -> list[str]:
    available = sorted({key for run in runs for key in run.series})
    listing = ", ".join(available) or "nothing"
    if not patterns:
        keys = [key for key in DEFAULT_KEYS if key in available]
        if not keys:
            raise NotARunError(
                f"None of {', '.join(DEFAULT_KEYS)} was logged; choose with --keys from: {listing}."
            )
        return keys
    keys = []
    for pattern in patterns:
        matched = [key for key in available if fnmatch.fnmatchcase(key, pattern)]
        if not matched:
            raise NotARunError(f"No logged series matches {pattern!r}; logged: {listing}.")
        keys += [key for key in matched if key not in keys]
    return keys


def main(argv: list[str]) -> int:
    """``lightning-maml plot RUN [RUN ...] [--output PATH] [--keys KEY ...] [--yscale ...]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-maml plot",
        description="Draw the logged curves of runs (CSVLogger or W&B files) into a PNG.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="a run directory, metrics.csv or .wandb file"
    )
    parser.add_argument(
        "--output", "-o", default="curves.png", help="the PNG to write (curves.png)"
    )
    parser.add_argument(
        "--keys",
        nargs="+",
        metavar="KEY",
        help="series to draw; shell-style patterns such as 'grad_norm/*' (default: "
        + ", ".join(DEFAULT_KEYS)
        + ", those logged)",
    )
    parser.add_argument(
        "--yscale",
        choices=("auto", "linear", "log"),
        default="auto",
        help="y axis: auto (log for norms, linear otherwise), linear or log",
    )
    args = parser.parse_args(argv)
    try:
        runs = [load_run(path) for path in args.runs]
        keys = _select(runs, args.keys)
    except NotARunError as error:
        parser.error(str(error))
    output = plot_runs(runs, keys, args.output, args.yscale)
    print(f"Wrote {output} ({len(keys)} series of {len(runs)} run{'s' * (len(runs) > 1)}).")
    return 0
