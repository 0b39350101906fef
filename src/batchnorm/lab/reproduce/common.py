"""What every lab command shares: its run options, the data on its device, the seed
statistics, and the end of a run (the printed summary, ``metrics.json``, ``report.html``)."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from batchnorm._progress import Progress
from batchnorm.lab.data import Dataset, load_dataset
from batchnorm.lab.fit import resolve_device
from batchnorm.lab.report import Section, Table, write_report

#: The model of santurkar2018 and renorm2017 (batchnorm.lab.models.mnist1d_cnn), as printed.
CNN_DESCRIPTION = (
    "model  VGG-like CNN: 2 x [2 x (Conv1d(3) -> norm -> ReLU) -> MaxPool] -> "
    "Linear(64) -> norm -> ReLU -> Linear(10)"
)


@dataclass(frozen=True)
class RunOptions:
    """Options of every lab command (the command line's ``--seed --device --out --no-plots
    --quiet``). ``out`` None: the command's own default folder; ``progress`` None: a live
    bar on a terminal, a line per tenth elsewhere; ``stream``: where the summary is
    printed (None: stdout)."""

    seed: int = 0
    device: str = "cpu"
    out: str | Path | None = None
    plots: bool = True
    progress: bool | None = None
    stream: TextIO | None = None

    def folder(self, default: str) -> Path:
        return Path(self.out if self.out is not None else default)

    def print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)


#: The defaults (a module-level instance: the dataclass is frozen, so sharing it is safe).
DEFAULT_OPTIONS = RunOptions()


def prepare(
    data: Dataset | str, data_dir: str | Path | None, device: str | torch.device
) -> tuple[Dataset, torch.device]:
    """The data set (loaded by name if need be) on the checked ``device``."""
    dev = resolve_device(device)
    if isinstance(data, str):  # concurrent processes may load it: the cache is atomic
        data = load_dataset(data, data_dir)
    return data.to(dev), dev


@dataclass(frozen=True)
class Plan:
    """What a multi-seed reproduction runs: its data on its device, its sizes, its seeds."""

    data: Dataset
    device: torch.device
    sizes: dict[str, int]
    seeds: list[int]

    def header(self, title: str, *lines: str) -> str:
        """The printed header: the title, the data, the CNN, then ``lines``."""
        return "\n".join([title, f"data   {self.data.describe()}", CNN_DESCRIPTION, *lines])


def plan(
    data: Dataset | str,
    data_dir: str | Path | None,
    options: RunOptions,
    sizes: dict[str, int],
    quick_sizes: dict[str, int],
    quick: bool,
    **given: int | None,
) -> Plan:
    """The sizes (``quick_sizes`` with ``quick``, else ``sizes``, then whatever was ``given``
    and not None, e.g. ``steps=``), the data on the device, and ``sizes["seeds"]`` seeds from
    ``options.seed`` on."""
    chosen = dict(quick_sizes if quick else sizes)
    chosen.update({key: value for key, value in given.items() if value is not None})
    loaded, dev = prepare(data, data_dir, options.device)
    return Plan(loaded, dev, chosen, list(range(options.seed, options.seed + chosen["seeds"])))


def settings_of(data: Dataset, dev: torch.device, **settings: Any) -> dict[str, Any]:
    """The report's settings table: the data first, the machine last."""
    return {
        "data": data.describe(),
        "data source": data.source,
        **settings,
        "device": str(dev),
        "torch": torch.__version__,
    }


def progress_bar(label: str, total: int, progress: bool | None) -> Progress:
    """One bar (with ETA) over all the runs of a reproduction: each run's ``fit`` counts
    its steps on it."""
    return Progress(label, total, "steps", progress is not False)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max and the values over seeds: the seed-to-seed spread of a number."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def finish(
    options: RunOptions,
    out: Path,
    title: str,
    header: str,
    summary: str,
    metrics: dict[str, Any],
    figures: Sequence[tuple[Path, str]] = (),
    tables: Sequence[Table] = (),
    sections: Sequence[Section] = (),
) -> dict[str, Any]:
    """Print ``summary`` and where the report went, write ``metrics.json`` and
    ``report.html`` into ``out``, and return ``metrics``."""
    names = [Path(path).name for path, _ in figures] + ["metrics.json"]
    options.print(summary + f"\n\nreport {out / 'report.html'} ({', '.join(names)})")
    write_report(
        out, title, header + "\n\n" + summary, metrics, figures, metrics.get("settings"),
        tables=tables, sections=sections,
    )  # fmt: skip
    return metrics
