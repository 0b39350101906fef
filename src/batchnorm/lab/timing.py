"""How long one epoch of the demo takes with each batch-norm implementation.

:func:`epoch_seconds` trains the article's model with :func:`batchnorm.lab.fit.fit` (the
demo's own loop, without probes) using ``batchnorm.BatchNorm1d``, ``torch.nn.BatchNorm1d``
and no BN, interleaving the implementations so that a machine that slows down or speeds up
during the measurement affects them alike. ``make bench`` reports the result.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from batchnorm.lab.data import Dataset
from batchnorm.lab.fit import adam, fit, resolve_device, torch_threads
from batchnorm.lab.models import article_model

#: MNIST-1D's shape (the demo's default data): 4000 training samples of 40 features, 10
#: classes. The cost of an epoch does not depend on the values, so random data stands in
#: and the measurement needs neither mnist1d nor a cache.
SAMPLES, FEATURES, CLASSES = 4000, 40, 10
IMPLEMENTATIONS = ("batchnorm", "torch", "none")


def synthetic_data(
    samples: int = SAMPLES, features: int = FEATURES, classes: int = CLASSES, seed: int = 0
) -> Dataset:
    """Random features and labels of the given shape (a small test set of 100 samples)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples + 100, features, generator=g)
    y = torch.randint(0, classes, (samples + 100,), generator=g)
    return Dataset("synthetic", x[:samples], y[:samples], x[samples:], y[samples:], classes)


def epoch_seconds(
    implementations: Sequence[str] = IMPLEMENTATIONS,
    epochs: int = 2,
    repeats: int = 5,
    batch_size: int = 100,
    device: str = "cpu",
    threads: int | None = 1,
    data: Dataset | None = None,
) -> dict[str, Any]:
    """Seconds per training epoch of the demo's model (Adam, ``batch_size``) for each
    implementation in ``implementations`` ("batchnorm", "torch", "none" = without BN).

    Each of ``repeats`` rounds trains a fresh model of every implementation for ``epochs``
    epochs (after one untimed warm-up epoch each) and records the time of the training
    steps per epoch. Returns medians and all samples, and the ratio of our median to
    torch.nn's (below 1: ours is faster)."""
    unknown = [i for i in implementations if i not in IMPLEMENTATIONS]
    if unknown or not implementations:
        raise ValueError(f"unknown implementations {unknown}; expected some of {IMPLEMENTATIONS}.")
    dev = resolve_device(device)
    data = (data or synthetic_data()).to(dev)

    def one_run(impl: str, n_epochs: int) -> float:
        torch.manual_seed(0)
        bn = None if impl == "none" else impl
        model = article_model(data.num_features, data.num_classes, bn).to(dev)
        optimizer = adam(model.parameters(), 1e-3)
        total = n_epochs * (len(data.x_train) // batch_size)
        history = fit(
            model, optimizer, data, epochs=n_epochs, batch_size=batch_size, eval_every=total,
            progress=False,
        )  # fmt: skip
        return history.train_seconds / n_epochs

    samples: dict[str, list[float]] = {impl: [] for impl in implementations}
    with torch_threads(threads):
        for impl in implementations:
            one_run(impl, 1)  # warm-up: first-call costs (allocations, lazy init)
        for _ in range(repeats):
            for impl in implementations:
                samples[impl].append(one_run(impl, epochs))
    medians = {impl: statistics.median(v) for impl, v in samples.items()}
    result: dict[str, Any] = {
        "model": f"article_model({data.num_features}, {data.num_classes}): Linear + ReLU -> "
        f"BatchNorm1d(128) -> Linear",
        "data": f"{data.name}: {len(data.x_train)} x {data.num_features}",
        "batch_size": batch_size,
        "steps_per_epoch": len(data.x_train) // batch_size,
        "device": str(dev),
        "threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__,
        "epoch_seconds": {
            impl: {"median": medians[impl], "min": min(v), "samples": v}
            for impl, v in samples.items()
        },
    }
    if "batchnorm" in medians and "torch" in medians:
        result["ratio_batchnorm_to_torch"] = medians["batchnorm"] / medians["torch"]
    return result
