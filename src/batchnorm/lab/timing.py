"""Timing: the one helper every benchmark uses, and the demo's epoch time.

:func:`time_interleaved` calls the contenders of a benchmark in turn, call by call, so that
a machine that slows down or speeds up during the measurement (our machines are shared)
affects them alike, each round in a new order, so that no contender always follows the
same one; ``batchnorm bench`` and the scripts in ``benchmarks/`` time with it.

:func:`epoch_seconds` trains the article's model with :func:`batchnorm.lab.fit.fit` (the
demo's own loop, without probes) using ``batchnorm.BatchNorm1d``, ``torch.nn.BatchNorm1d``
and no BN, interleaved in the same way. ``make bench`` reports the result.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import torch

from batchnorm.lab.data import Dataset
from batchnorm.lab.fit import adam, fit, resolve_device, torch_threads
from batchnorm.lab.models import article_model

T = TypeVar("T")


def wall_seconds(run: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``run``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def wall_and_cpu_seconds(run: Callable[[], object]) -> tuple[float, float]:
    """(wall-clock seconds, this thread's CPU seconds) of one call of ``run``. With torch on
    one thread the CPU time is the computation's own cost, whatever else the machine runs."""
    cpu = time.thread_time()
    wall = wall_seconds(run)
    return wall, time.thread_time() - cpu


def reported_seconds(run: Callable[[], float]) -> float:
    """The seconds ``run`` returns: for work that times only part of itself (e.g. the
    training steps of an epoch, without evaluation)."""
    return float(run())


def time_interleaved(
    runs: Mapping[str, Callable[[], Any]],
    *,
    reps: int | None = None,
    budget: float = 1.0,
    bounds: tuple[int, int] = (1, 1_000_000),
    warmup: int = 3,
    measure: Callable[[Callable[[], Any]], T] = wall_seconds,
    seed: int = 0,
) -> dict[str, list[T]]:
    """Call the ``runs`` in turn, call by call, and return ``{name: [measure of each call]}``
    (wall-clock seconds by default; see :func:`wall_and_cpu_seconds`,
    :func:`reported_seconds`).

    Each run is first called ``warmup`` times untimed (first-call costs: allocations,
    compilation, caches). Then ``reps`` rounds, or, when ``reps`` is None, as many as take
    about ``budget`` seconds per run at the speed of its slowest warm-up call, within
    ``bounds`` (so a budget needs ``warmup >= 1``).

    Every round calls the runs in an order of its own (shuffled, from ``seed``): a call
    meets the caches, freed memory and threads its predecessor leaves, and in a fixed order
    each run has the same predecessor every time. Measured (``batchnorm bench``'s
    contenders, (32, 128, 32, 32) training forward, 2 threads, 2026-12-04): one layer timed
    in three places of a fixed order took 1.47, 1.30 and 1.26 ms, the same three shuffled
    1.16, 1.16 and 1.15 ms. The same ``seed`` gives the same orders in every process: the
    ranks of a distributed benchmark make their collective calls together."""
    slowest = 0.0
    for run in runs.values():
        for _ in range(warmup):
            slowest = max(slowest, wall_seconds(run))
    if reps is None:
        if warmup < 1:
            raise ValueError("time_interleaved: a time budget needs warmup >= 1 (or give reps).")
        reps = int(min(bounds[1], max(bounds[0], budget / max(slowest, 1e-9))))
    times: dict[str, list[T]] = {name: [] for name in runs}
    order, rng = list(runs), random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            times[name].append(measure(runs[name]))
    return times


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
    steps per epoch. Returns medians and all samples, the ratio of our median to torch.nn's
    and the median of the rounds' own ratios (below 1: ours is faster)."""
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

    with torch_threads(threads):
        for impl in implementations:
            one_run(impl, 1)  # warm-up: first-call costs (allocations, lazy init)
        runs = {impl: partial(one_run, impl, epochs) for impl in implementations}
        samples = time_interleaved(runs, reps=repeats, warmup=0, measure=reported_seconds)
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
        # A round's runs follow each other, where the medians' samples span the whole
        # measurement: the ratio within a round cancels the host's slower drifts (in one
        # run of 21 rounds the epochs of both spread over 20-31 ms).
        pairs = zip(samples["batchnorm"], samples["torch"], strict=True)
        result["paired_ratio_batchnorm_to_torch"] = statistics.median(a / b for a, b in pairs)
    return result
