"""Figures of the second round of reproductions (Santurkar et al. 2018, Ioffe 2017): runs
repeated over seeds, drawn as a mean line and a shaded min-max band, as in the papers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from batchnorm.lab.fit import History
from batchnorm.lab.plots import _pyplot, _save, color

#: Runs by seed, then by label: ``{seed: {label: History}}``.
Runs = Mapping[int, Mapping[str, History]]


def _band(ax, x, values: np.ndarray, c: str, label: str | None) -> None:
    """Mean over the first axis as a line, min-max as a shaded band."""
    ax.fill_between(x, values.min(0), values.max(0), color=c, alpha=0.2, linewidth=0)
    ax.plot(x, values.mean(0), color=c, label=label, linewidth=1.8)


def _labels(runs: Runs) -> list[str]:
    return list(next(iter(runs.values())))


def curves_over_seeds(
    runs: Runs, path: Path, panels: Sequence[tuple[str, str]], title: str
) -> Path:
    """One panel per History field in ``panels`` ((field, y label)), against steps."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), layout="constrained")
    axes = np.atleast_1d(axes)
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for i, label in enumerate(_labels(runs)):
            histories = [per_seed[label] for per_seed in runs.values()]
            steps = np.asarray(histories[0].steps)
            rows = np.array(
                [[np.nan if v is None else v for v in getattr(h, key)] for h in histories]
            )
            keep = ~np.isnan(rows).any(0)  # step 0 has no training accuracy
            _band(ax, steps[keep], rows[:, keep], color(label, i), label)
        ax.set(xlabel="training steps", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def landscape(runs: Runs, path: Path, labels: Sequence[str], title: str) -> Path:
    """Santurkar et al. (2018), Figure 4: (a) loss range over the step sizes, (b) gradient
    change range over the step sizes, (c) effective beta-smoothness, along training."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), layout="constrained")
    for i, label in enumerate(labels):
        c = color(label, i)
        results = [per_seed[label].probes["landscape"] for per_seed in runs.values()]
        steps = np.asarray(results[0]["steps"])
        moved = np.array([r["moved_losses"] for r in results])  # (seeds, points, etas)
        changes = np.array([r["gradient_changes"] for r in results])
        beta = np.array([r["beta_smoothness"] for r in results])
        for ax, values in ((axes[0], moved), (axes[1], changes)):
            low, high = values.min(2).mean(0), values.max(2).mean(0)
            ax.fill_between(steps, low, high, color=c, alpha=0.3, linewidth=0, label=label)
        _band(axes[2], steps, beta, c, label)
    axes[0].set(title="(a) loss landscape", ylabel="loss at w - eta g", yscale="log")
    axes[1].set(title="(b) gradient predictiveness", ylabel="|grad(w - eta g) - grad(w)|",
                yscale="log")  # fmt: skip
    axes[2].set(title="(c) effective beta-smoothness", ylabel="max |change of grad| / |eta g|")
    for ax in axes:
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def regime_bars(
    table: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    path: Path,
    regimes: Sequence[str],
    variants: Sequence[str],
    title: str,
) -> Path:
    """Ioffe (2017) at our scale: per regime (panel), per variant (bar), the eval-mode test
    accuracy (mean over seeds, min-max as an error bar) and the train-mode accuracy (dot)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(regimes), figsize=(5.2 * len(regimes), 4.4), layout="constrained", sharey=True
    )
    axes = np.atleast_1d(axes)
    x = np.arange(len(variants))
    for ax, regime in zip(axes, regimes, strict=True):
        for j, variant in enumerate(variants):
            row = table[regime][variant]
            test, train = row["test_accuracy"], row["train_accuracy"]
            err = [[test["mean"] - test["min"]], [test["max"] - test["mean"]]]
            ax.bar(j, test["mean"], color=f"C{j}", alpha=0.85, yerr=err, capsize=3)
            ax.plot(j, train["mean"], "k_", markersize=18, markeredgewidth=2)
        ax.set_xticks(x, variants, rotation=35, ha="right")
        ax.set(title=regime, ylim=(0, 1))
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("accuracy")
    fig.suptitle(
        f"{title}\nbars: test accuracy in eval mode (mean, min-max over seeds); black dash: "
        "training accuracy in train mode"
    )
    return _save(fig, path)
