"""``batchnorm reproduce ioffe2015``: section 4.1 and Figure 1 of Ioffe & Szegedy (2015),
"Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate
Shift".

Their set-up: three fully connected hidden layers of 100 sigmoid units, BN before each
nonlinearity in the BN variant, a 10-way softmax, mini-batches of 60, plain SGD, test
accuracy measured along training. Figure 1 shows (a) test accuracy against steps and
(b, c) the 15th, 50th and 85th percentiles of the input to one sigmoid of the last hidden
layer over training, without and with BN.

Here it runs on MNIST-1D by default (``--data mnist --data-dir DIR`` for MNIST itself), for
fewer steps than the paper's 50 000. The percentiles are taken over the test set at every
evaluation (model in eval mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchnorm.lab import plots
from batchnorm.lab.data import Dataset
from batchnorm.lab.fit import History, fit
from batchnorm.lab.models import ACTIVATIONS, copy_shared_weights, ioffe_mlp
from batchnorm.lab.probes import IOFFE_QUANTILES, ActivationQuantiles
from batchnorm.lab.report import Table
from batchnorm.lab.reproduce.common import DEFAULT_OPTIONS, RunOptions, finish, prepare, settings_of

# Section 4.1 of the paper: 3 hidden layers of 100 units, mini-batches of 60, plain SGD.
HIDDEN, DEPTH, BATCH_SIZE = 100, 3, 60
#: The paper evaluates along 50 000 steps; 6000 suffice on MNIST-1D for the curves to
#: separate (BN passes 50 % within about 2000 steps, no BN stalls near 30 %).
STEPS = 6000
EVAL_EVERY = 250
#: Learning rate of plain SGD (the paper does not state it; 0.1 trains both variants).
LR = 0.1
#: The accuracy whose first crossing the command reports ("steps to 50 %").
THRESHOLD = 0.5
WITHOUT, WITH = "without BN", "with BN"
PROBE = "last hidden layer"
FIGURE = "figure1.png"


def last_activation_path(depth: int = DEPTH) -> str:
    """Path of the last hidden layer's nonlinearity in :func:`ioffe_mlp` (its input is the
    pre-activation the paper plots)."""
    return str(3 * depth - 1)


def steps_to(history: History, threshold: float) -> int | None:
    """The first evaluated step with test accuracy >= ``threshold`` (None: never)."""
    curve = zip(history.steps, history.test_accuracy, strict=True)
    return next((step for step, accuracy in curve if accuracy >= threshold), None)


def median_drift(history: History, probe: str = PROBE) -> np.ndarray:
    """Per unit: how far the median of its pre-activation moved during training, as
    |mean over the last quarter of the evaluations - mean over the first quarter|.

    Averaging a quarter of the evaluations separates a systematic drift from the jitter
    between consecutive evaluations (BN's running statistics follow the last few
    mini-batches). Step 0 is left out: the BN model's running statistics are still at their
    initial values there."""
    result = history.probes[probe]
    values = np.asarray(result["layers"][probe])  # (evaluations, quantiles, units)
    median = values[:, result["quantiles"].index(0.5), :]
    median = median[np.asarray(result["steps"]) > 0]
    if len(median) == 0:
        raise ValueError("median_drift needs at least one evaluation after training started.")
    quarter = max(1, len(median) // 4)
    return np.abs(median[-quarter:].mean(axis=0) - median[:quarter].mean(axis=0))


def train_pair(
    data: Dataset,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    eval_every: int = EVAL_EVERY,
    activation: str = "sigmoid",
    seed: int = 0,
    bn: str = "batchnorm",
    progress: bool | None = None,
) -> dict[str, History]:
    """Train the network without and with BN from the same initial weights and mini-batch
    order; the probe records per-unit percentiles of the last hidden layer's pre-activation
    on the test set at every evaluation."""
    torch.manual_seed(seed)
    models = {WITHOUT: ioffe_mlp(data.num_features, data.num_classes, None, activation)}
    models[WITH] = ioffe_mlp(data.num_features, data.num_classes, bn, activation)
    copy_shared_weights(models[WITHOUT], models[WITH])
    runs = {}
    for label, model in models.items():
        model.to(data.x_train.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        probe = ActivationQuantiles(
            {PROBE: last_activation_path()}, IOFFE_QUANTILES, of="input", per_unit=True
        )
        runs[label] = fit(
            model, optimizer, data, steps=steps, batch_size=batch_size, eval_every=eval_every,
            probes={PROBE: probe}, seed=seed, progress=progress, label=label,
        )  # fmt: skip
    return runs


def results(
    runs: dict[str, History], threshold: float = THRESHOLD, unit: int = 0
) -> dict[str, dict[str, Any]]:
    """The numbers of the printed table, per run."""
    table = {}
    for label, h in runs.items():
        drift = median_drift(h)
        table[label] = {
            "steps_to_threshold": steps_to(h, threshold),
            "final_test_accuracy": h.test_accuracy[-1],
            "best_test_accuracy": max(h.test_accuracy),
            "median_drift_unit": float(drift[unit]),
            "median_drift_mean": float(drift.mean()),
            "train_seconds": h.train_seconds,
        }
    return table


def summary_table(table: dict[str, dict[str, Any]], threshold: float, unit: int) -> str:
    """The table the command prints."""
    reach = f"steps to {threshold:.0%}"
    lines = [
        f"{'':<12}{reach:>14}{'final test acc':>16}{'best':>7}"
        f"{'median drift (unit ' + str(unit) + ' / mean)':>30}{'train time':>12}"
    ]
    for label, r in table.items():
        steps = r["steps_to_threshold"]
        drift = f"{r['median_drift_unit']:.2f} / {r['median_drift_mean']:.2f}"
        lines.append(
            f"{label:<12}{'not reached' if steps is None else steps:>14}"
            f"{r['final_test_accuracy']:>16.3f}{r['best_test_accuracy']:>7.3f}"
            f"{drift:>30}{r['train_seconds']:>10.1f} s"
        )
    return "\n".join(lines)


def run_ioffe2015(
    data: Dataset | str = "mnist1d",
    data_dir: str | Path | None = None,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    eval_every: int = EVAL_EVERY,
    activation: str = "sigmoid",
    threshold: float = THRESHOLD,
    unit: int = 0,
    bn: str = "batchnorm",
    options: RunOptions = DEFAULT_OPTIONS,
) -> dict[str, Any]:
    """Run the reproduction, print its summary, write the report folder (default
    ``batchnorm-report/ioffe2015``) and return the metrics written to its ``metrics.json``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}.")
    if not 0 <= unit < HIDDEN:
        raise ValueError(f"unit must be in 0..{HIDDEN - 1} (a unit of the last hidden layer).")
    data, dev = prepare(data, data_dir, options.device)
    seed = options.seed
    bn_class = "batchnorm.BatchNorm1d" if bn == "batchnorm" else "torch.nn.BatchNorm1d"
    header = "\n".join(
        [
            "batchnorm reproduce ioffe2015: Ioffe & Szegedy (2015), section 4.1 and Figure 1",
            f"data   {data.describe()}",
            f"model  {DEPTH} x (Linear -> BatchNorm1d({HIDDEN}) -> {activation}) -> "
            f"Linear({HIDDEN}, {data.num_classes})  [{bn_class}]",
            "       without BN: the same network minus its BatchNorm1d layers, from the same "
            "initial weights",
            f"train  SGD lr {lr:g}, batch {batch_size}, {steps} steps, test accuracy every "
            f"{eval_every} steps, seed {seed}, {dev}",
        ]
    )
    options.print(header + "\n")

    runs = train_pair(
        data, steps, batch_size, lr, eval_every, activation, seed, bn, options.progress
    )
    table = results(runs, threshold, unit)
    out = options.folder("batchnorm-report/ioffe2015")
    summary = summary_table(table, threshold, unit) + (
        f"\n\nmedian drift: how far the median of a last-hidden-layer {activation} input (on the "
        f"test set) moved\nfrom the first to the last quarter of training, for unit {unit} and "
        f"averaged over all {HIDDEN} units."
    )
    settings = settings_of(
        data, dev, **{
            "batch norm": bn_class, "activation": activation, "optimizer": f"SGD, lr {lr:g}",
            "batch size": batch_size, "steps": steps, "evaluation every": f"{eval_every} steps",
            "threshold": threshold, "plotted unit": unit, "seed": seed,
        },
    )  # fmt: skip
    metrics = {
        "command": "reproduce ioffe2015",
        "settings": settings,
        "results": table,
        "runs": {label: h.to_dict() for label, h in runs.items()},
    }
    figures = []
    if options.plots:
        out.mkdir(parents=True, exist_ok=True)
        path = plots.ioffe_figure1(
            runs, out / FIGURE, PROBE, PROBE, unit, threshold, activation,
            f"Ioffe & Szegedy (2015), Figure 1, on {data.name}",
        )  # fmt: skip
        caption = (
            f"(a) Test accuracy against training steps. (b, c) The 15th, 50th and 85th "
            f"percentiles of the input to {activation} unit {unit} of the last hidden layer, "
            f"over the test set, without and with BN (same scale)."
        )
        figures.append((path, caption))
    columns = ["final test accuracy", "best test accuracy", "median drift (unit)",
               "median drift (mean)", "train seconds"]  # fmt: skip
    keys = [("final_test_accuracy", ".3f"), ("best_test_accuracy", ".3f"),
            ("median_drift_unit", ".2f"), ("median_drift_mean", ".2f"),
            ("train_seconds", ".1f")]  # fmt: skip
    results_table = Table(
        "Results (the numbers of metrics.json)", ["", "steps to threshold", *columns],
        [(label, [(("results", label, "steps_to_threshold"), "d")]
          + [(("results", label, key), fmt) for key, fmt in keys]) for label in table],
    )  # fmt: skip
    return finish(
        options, out, "batchnorm reproduce ioffe2015", header, summary, metrics, figures,
        [results_table],
    )  # fmt: skip
