"""The lab's figures, drawn with matplotlib's Agg backend (files only, no window).

Every figure compares runs given as ``{label: History}``; a run's colour comes from
:func:`color`, so "with BN" and "without BN" look the same in every figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from batchnorm.lab.extras import import_extra
from batchnorm.lab.fit import History

#: Colours by run label; anything else cycles through matplotlib's default palette.
COLORS = {
    "without BN": "tab:red",
    "with BN": "tab:blue",
    "standard": "tab:red",  # Santurkar et al.'s name for the network without BN
    "BN + noise": "tab:green",
}
DPI = 110


def _pyplot():
    import_extra("matplotlib").use("Agg")
    return import_extra("matplotlib.pyplot")


def color(label: str, index: int = 0) -> str:
    return COLORS.get(label, f"C{index}")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def learning_curves(runs: Mapping[str, History], path: Path, title: str) -> Path:
    """Test accuracy and loss (train: mean mini-batch loss per epoch; test: after each
    epoch) against epochs."""
    plt = _pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for i, (label, h) in enumerate(runs.items()):
        c = color(label, i)
        acc_ax.plot(h.epochs, h.test_accuracy, color=c, label=label, linewidth=2)
        loss_ax.plot(h.epochs, h.test_loss, color=c, linestyle="--", label=f"{label}, test")
        train = [(e, v) for e, v in zip(h.epochs, h.train_loss, strict=True) if v is not None]
        loss_ax.plot(*zip(*train, strict=True), color=c, label=f"{label}, train", linewidth=2)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy (eval mode)")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def gradient_norms(runs: Mapping[str, History], path: Path, probe: str, title: str) -> Path:
    """Per-layer gradient norm at every step (faint) and its moving average over one epoch,
    one panel per layer, log scale."""
    plt = _pyplot()
    # Panels in model order: the run with the most layers (the one with BN) sets it.
    per_run = [list(h.probes[probe]["layers"]) for h in runs.values()]
    layers = max(per_run, key=len)
    layers += [name for names in per_run for name in names if name not in layers]
    fig, axes = plt.subplots(
        1, len(layers), figsize=(4 * len(layers), 3.6), layout="constrained", squeeze=False
    )
    for ax, layer in zip(axes[0], layers, strict=True):
        for i, (label, h) in enumerate(runs.items()):
            norms = h.probes[probe]["layers"].get(layer)
            if not norms:
                continue
            c = color(label, i)
            epochs = np.asarray(h.probes[probe]["steps"]) / h.steps_per_epoch
            values = np.asarray(norms)
            ax.plot(epochs, values, color=c, alpha=0.2, linewidth=0.6)
            smooth = _moving_average(values, h.steps_per_epoch)
            ax.plot(epochs[len(epochs) - len(smooth) :], smooth, color=c, label=label)
        where, _, kind = layer.partition(" ")
        ax.set(yscale="log", xlabel="epoch", title=f"layer {where}: {kind}" if kind else layer)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0][0].set_ylabel("gradient L2 norm (per step)")
    fig.suptitle(title)
    return _save(fig, path)


def activation_quantiles(runs: Mapping[str, History], path: Path, probe: str, title: str) -> Path:
    """The median (line) and the 15-85 % band (shaded) of each probed layer's values over
    training, one panel per layer, runs overlaid."""
    plt = _pyplot()
    first = next(iter(runs.values())).probes[probe]
    layers = list(first["layers"])
    fig, axes = plt.subplots(
        1, len(layers), figsize=(5 * len(layers), 4.2), layout="constrained", squeeze=False
    )
    for ax, layer in zip(axes[0], layers, strict=True):
        for i, (label, h) in enumerate(runs.items()):
            result = h.probes[probe]
            q = np.asarray(result["layers"][layer])  # (evaluations, quantiles)
            epochs = np.asarray(result["steps"]) / h.steps_per_epoch
            c = color(label, i)
            ax.fill_between(epochs, q[:, 0], q[:, -1], color=c, alpha=0.18, linewidth=0)
            ax.plot(epochs, q[:, len(first["quantiles"]) // 2], color=c, label=label)
        ax.set(xlabel="epoch", ylabel="value", title=layer)
        ax.grid(alpha=0.3)
    lo, mid, hi = _quantile_names(first["quantiles"])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    fig.suptitle(f"{title}\nline: {mid}; shaded band: {lo} to {hi}")
    return _save(fig, path)


def _quantile_names(quantiles: Sequence[float]) -> tuple[str, str, str]:
    names = [f"{100 * q:g}th percentile" for q in quantiles]
    return names[0], names[len(names) // 2], names[-1]


def ioffe_figure1(
    runs: Mapping[str, History],
    path: Path,
    probe: str,
    layer: str,
    unit: int,
    threshold: float,
    activation: str,
    title: str,
) -> Path:
    """Figure 1 of Ioffe & Szegedy (2015): (a) test accuracy against steps with and without
    BN; (b, c) the 15th, 50th and 85th percentiles of the input of one unit's nonlinearity
    (``activation``) over training, without and with BN, on the same scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(5 + 4 * len(runs), 4), layout="constrained")
    acc_ax, unit_axes = axes[0], axes[1:]
    for i, (label, h) in enumerate(runs.items()):
        acc_ax.plot(h.steps, h.test_accuracy, color=color(label, i), label=label, linewidth=2)
    acc_ax.axhline(threshold, color="gray", linestyle=":", label=f"{threshold:.0%}")
    acc_ax.set(xlabel="training steps", ylabel="test accuracy", title="(a) test accuracy")
    acc_ax.set_ylim(0, 1)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend()
    low, high = np.inf, -np.inf
    panels = zip(unit_axes, "bcdefg", enumerate(runs.items()), strict=False)
    for ax, letter, (i, (label, h)) in panels:
        result = h.probes[probe]
        q = np.asarray(result["layers"][layer])[:, :, unit]  # (evaluations, 3)
        c = color(label, i)
        for j, style in enumerate(("--", "-", "--")):
            ax.plot(result["steps"], q[:, j], color=c, linestyle=style)
        low, high = min(low, q.min()), max(high, q.max())
        ax.set(xlabel="training steps", ylabel=f"{activation} input", title=f"({letter}) {label}")
        ax.grid(alpha=0.3)
    margin = 0.05 * (high - low + 1e-9)
    for ax in unit_axes:
        ax.set_ylim(low - margin, high + margin)
    lo, mid, hi = _quantile_names(next(iter(runs.values())).probes[probe]["quantiles"])
    fig.suptitle(
        f"{title}\n(b, c): input of {activation} unit {unit} of the last hidden layer on the "
        f"test set; solid: {mid}, dashed: {lo} and {hi}"
    )
    return _save(fig, path)
