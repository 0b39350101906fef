"""``batchnorm demo``: the article's model trained with and without batch norm.

Linear(in, 128) + ReLU -> BatchNorm1d(128) -> Linear(128, 10), softmax cross-entropy, Adam,
50 epochs of mini-batches of 100 on MNIST-1D, next to the same model without the BN layer,
from the same seed, the same initial weights and the same mini-batches. It prints a table,
and writes plots, ``metrics.json`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import torch

from batchnorm import distributed as torchrun  # the helpers; `distributed` is an argument here
from batchnorm.lab import plots
from batchnorm.lab.data import Dataset
from batchnorm.lab.fit import History, adam, fit
from batchnorm.lab.models import article_model, copy_shared_weights
from batchnorm.lab.probes import ActivationQuantiles, GradientNorms
from batchnorm.lab.report import Table
from batchnorm.lab.reproduce.common import DEFAULT_OPTIONS, RunOptions, finish, prepare, settings_of

# The article's training set-up (its Keras example: Adam's default learning rate).
EPOCHS = 50
BATCH_SIZE = 100
LR = 1e-3
HIDDEN = 128
#: Layers whose inputs the demo watches (paths in `article_model`).
ACTIVATION_PROBES = {
    "hidden pre-activation (input of the ReLU)": "1",
    "input of the output layer (BN or ReLU output)": "3",
}
#: Run labels, in the order they are trained, printed and plotted.
WITHOUT, WITH = "without BN", "with BN"
FIGURES = ("accuracy.png", "gradients.png", "activations.png")


def train_pair(
    data: Dataset,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = 0,
    bn: str = "batchnorm",
    progress: bool | None = None,
    context: torchrun.DistributedContext | None = None,
) -> dict[str, History]:
    """Train the article's model without and with BN (``bn``: "batchnorm" or "torch") on
    ``data`` (on its device) from the same initial weights and mini-batch order; return the
    two histories, with gradient norms and activation quantiles recorded.

    With a ``context`` (torchrun), each process trains on its share of every mini-batch in
    DistributedDataParallel, with SyncBatchNorm, and the returned training losses are
    averaged over the processes (on the main process)."""
    torch.manual_seed(seed)
    models = {WITHOUT: article_model(data.num_features, data.num_classes, None, HIDDEN)}
    models[WITH] = article_model(data.num_features, data.num_classes, bn, HIDDEN)
    copy_shared_weights(models[WITHOUT], models[WITH])  # same Linear weights
    runs = {}
    for label, model in models.items():
        model.to(data.x_train.device)
        if context is not None:
            model = torchrun.wrap_model(model, context)  # BN -> SyncBatchNorm, then DDP
        optimizer = adam(model.parameters(), lr)
        probes = {
            "activations": ActivationQuantiles(ACTIVATION_PROBES),
            "gradients": GradientNorms(),
        }
        runs[label] = fit(
            model, optimizer, data, epochs=epochs, batch_size=batch_size, probes=probes,
            seed=seed, progress=progress, label=label,
            shard=None if context is None else partial(torchrun.local_slice, context=context),
        )  # fmt: skip
        if context is not None:
            _average_training_curves(runs[label], batch_size, context)
    return runs


def _average_training_curves(history: History, batch_size: int, context) -> None:
    """Replace the main process's training losses and accuracies by the average over all
    processes, weighted by their shares of each mini-batch (test metrics are the same on
    every process: the models are)."""
    keys = ("train_loss", "train_accuracy", "step_loss")
    gathered = torchrun.gather_on_main([getattr(history, key) for key in keys], context)
    if gathered is None:
        return
    shares = [len(range(batch_size)[torchrun.local_slice(batch_size, _rank(context, r))])
              for r in range(context.world_size)]  # fmt: skip
    for index, key in enumerate(keys):
        columns = zip(*(curves[index] for curves in gathered), strict=True)
        setattr(history, key, [
            None if values[0] is None
            else sum(v * w for v, w in zip(values, shares, strict=True)) / batch_size
            for values in columns
        ])  # fmt: skip


def _rank(context, rank: int):
    return dataclasses.replace(context, rank=rank)


def results(runs: dict[str, History]) -> dict[str, dict[str, float]]:
    """The numbers of the printed table, per run: final test accuracy, mean mini-batch loss
    of the last epoch, seconds spent in training steps."""
    return {
        label: {
            "test_accuracy": h.test_accuracy[-1],
            "final_train_loss": h.train_loss[-1],
            "train_seconds": h.train_seconds,
        }
        for label, h in runs.items()
    }


def run_demo(
    data: Dataset | str = "mnist1d", data_dir: str | Path | None = None,
    epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, bn: str = "batchnorm",
    options: RunOptions = DEFAULT_OPTIONS, distributed: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run the demo, print its summary, write the report folder (default
    ``batchnorm-report``) and return the metrics written to its ``metrics.json``.

    ``distributed=True`` (under torchrun): DistributedDataParallel with SyncBatchNorm, each
    process training on its share of every mini-batch of ``batch_size``; the main process
    prints and writes the report, the others return an empty dict."""
    context = torchrun.init_from_env() if distributed else None
    try:
        return _run_demo(data, data_dir, epochs, batch_size, lr, bn, options, context)
    finally:
        if context is not None:
            torchrun.shutdown()


def _run_demo(data, data_dir, epochs, batch_size, lr, bn, options, context) -> dict[str, Any]:
    data, dev = prepare(data, data_dir, options.device if context is None else context.device)
    main = context is None or context.is_main
    seed = options.seed
    bn_class = "batchnorm.BatchNorm1d" if bn == "batchnorm" else "torch.nn.BatchNorm1d"
    steps = epochs * (len(data.x_train) // batch_size)
    header = "\n".join(
        [
            "batchnorm demo: the article's model with and without batch norm",
            f"data   {data.describe()}",
            f"model  Linear({data.num_features}, {HIDDEN}) + ReLU -> BatchNorm1d({HIDDEN}) -> "
            f"Linear({HIDDEN}, {data.num_classes})  [{bn_class}]",
            "       without BN: the same model minus BatchNorm1d, from the same initial weights",
            f"train  Adam lr {lr:g}, batch {batch_size}, {epochs} epochs ({steps} steps), "
            f"seed {seed}, {dev}",
        ]
        + (
            []
            if context is None
            else [
                f"       distributed: {context.world_size} processes ({context.backend}), "
                f"DistributedDataParallel + SyncBatchNorm, each on its share of a batch"
            ]
        )
    )
    if main:
        options.print(header + "\n")

    progress = options.progress if main else False
    runs = train_pair(data, epochs, batch_size, lr, seed, bn, progress, context)
    if not main:
        return {}
    table = results(runs)
    out = options.folder("batchnorm-report")
    settings = settings_of(
        data, dev, **{"batch norm": bn_class, "optimizer": f"Adam, lr {lr:g}",
                      "batch size": batch_size, "epochs": epochs, "seed": seed},
    )  # fmt: skip
    if context is not None:
        settings["distributed"] = (
            f"{context.world_size} processes, {context.backend}, "
            "DistributedDataParallel + SyncBatchNorm"
        )
    metrics = {
        "command": "demo",
        "settings": settings,
        "results": table,
        "runs": {label: h.to_dict() for label, h in runs.items()},
    }
    figures = _figures(runs, out, data.name) if options.plots else []
    results_table = Table(
        "Results (the numbers of metrics.json)",
        ["", "test accuracy", "final train loss", "train seconds"],
        [(label, [(("results", label, "test_accuracy"), ".3f"),
                  (("results", label, "final_train_loss"), ".3f"),
                  (("results", label, "train_seconds"), ".1f")]) for label in table],
    )  # fmt: skip
    return finish(
        options, out, "batchnorm demo", header, summary_table(table), metrics, figures,
        [results_table],
    )  # fmt: skip


def _figures(runs: dict[str, History], out: Path, name: str) -> list[tuple[Path, str]]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        (
            plots.learning_curves(
                runs, out / FIGURES[0], f"The article's model on {name}: with and without "
                f"batch norm",
            ),
            "Test accuracy (model in eval mode, after every epoch) and loss. The train "
            "loss is the mean mini-batch loss of each epoch.",
        ),
        (
            plots.gradient_norms(
                runs, out / FIGURES[1], "gradients", "Gradient norm of each layer's "
                "parameters, every step (line: mean over an epoch)",
            ),
            "Per-layer gradient norms at every step; the BatchNorm1d panel exists only "
            "for the model with BN.",
        ),
        (
            plots.activation_quantiles(
                runs, out / FIGURES[2], "activations", "Distribution of the values "
                "entering two layers, on the test set after every epoch",
            ),
            "Median and 15-85 % band over all units and test samples. With BN, the "
            "output layer's input is the BN output; without, the ReLU output. At epoch 0 "
            "BN still normalizes with its initial running statistics (mean 0, variance 1).",
        ),
    ]  # fmt: skip


def summary_table(table: dict[str, dict[str, float]]) -> str:
    """The side-by-side table the demo prints."""
    lines = [f"{'':<12}{'test accuracy':>15}{'final train loss':>19}{'train time':>13}"]
    for label, r in table.items():
        lines.append(
            f"{label:<12}{r['test_accuracy']:>15.3f}{r['final_train_loss']:>19.3f}"
            f"{r['train_seconds']:>11.1f} s"
        )
    return "\n".join(lines)
