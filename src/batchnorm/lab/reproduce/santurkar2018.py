"""``batchnorm reproduce santurkar2018``: Santurkar, Tsipras, Ilyas & Madry (2018), "How Does
Batch Normalization Help Optimization?", Figures 2 and 4, on MNIST-1D.

Three versions of one small VGG-like CNN (:func:`batchnorm.lab.models.mnist1d_cnn`), from
the same initial weights and mini-batches, for several seeds: without BN ("standard"),
with BN, and with BN followed by injected covariate shift
(:class:`batchnorm.lab.variants.NoisyBatchNorm`). Figure 2: the noisy network trains about
as well as BN. Figure 4: along the training trajectory of the standard and BN networks,
:class:`batchnorm.lab.landscape.LossLandscape` measures how much the loss and the gradient
change when stepping along the gradient; BN's landscape is smoother.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from batchnorm.lab import plots_papers
from batchnorm.lab.data import Dataset
from batchnorm.lab.fit import History, fit
from batchnorm.lab.landscape import ETA_FACTORS, LossLandscape
from batchnorm.lab.models import batch_norm_1d, copy_shared_weights, mnist1d_cnn
from batchnorm.lab.report import Section, Table
from batchnorm.lab.reproduce import common
from batchnorm.lab.reproduce.common import DEFAULT_OPTIONS, RunOptions
from batchnorm.lab.variants import NoisyBatchNorm

STANDARD, BN, NOISY = "standard", "with BN", "BN + noise"
#: Plain SGD (the landscape's step sizes are then multiples of the step taken). 0.1 trains
#: the network without BN too on MNIST-1D; the paper uses the same rate for both.
LR = 0.1
BATCH_SIZE = 64
#: 1500 steps = 24 epochs of MNIST-1D's 4000 signals: both networks are past their fast
#: phase; three seeds and three networks take about two minutes on one core.
STEPS, SEEDS, EVAL_EVERY, LANDSCAPE_EVERY = 1500, 3, 100, 25
QUICK = {"steps": 300, "seeds": 2, "eval_every": 50, "landscape_every": 25}
#: The injected shift's half-range and the scale's bound (log-uniform in [1/s, s]): large
#: enough that the distributions move by more than training moves them (the paper's
#: Figure 2 shows shifted, widened histograms).
NOISE_MEAN, NOISE_SCALE = 0.5, 1.5
FIGURES = ("figure2.png", "figure4.png")


def train_variants(
    data: Dataset,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int,
    landscape_every: int,
    bn: str = "batchnorm",
    progress: Any = None,
) -> dict[str, History]:
    """The three networks for one seed (same initial weights, same mini-batches); the
    standard and BN ones carry the landscape probe."""
    torch.manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 10_000)
    norms = {
        STANDARD: None,
        BN: lambda c: batch_norm_1d(c, bn),
        NOISY: lambda c: NoisyBatchNorm(batch_norm_1d(c, bn), NOISE_MEAN, NOISE_SCALE, noise),
    }
    models = {
        label: mnist1d_cnn(data.num_features, data.num_classes, n) for label, n in norms.items()
    }
    for label in (BN, NOISY):
        copy_shared_weights(models[STANDARD], models[label])
    runs = {}
    for label, model in models.items():
        model.to(data.x_train.device)
        probes = {}
        if label != NOISY:
            probes["landscape"] = LossLandscape([f * lr for f in ETA_FACTORS], landscape_every)
        runs[label] = fit(
            model, torch.optim.SGD(model.parameters(), lr=lr), data, steps=steps,
            batch_size=batch_size, eval_every=eval_every, probes=probes, seed=seed,
            progress=progress, label=f"{label}, seed {seed}",
        )  # fmt: skip
    return runs


def landscape_summary(h: History) -> dict[str, float]:
    """Means over the trajectory: the loss range over the step sizes, the largest gradient
    change, and the effective β-smoothness (plus its maximum)."""
    result = h.probes["landscape"]
    moved = torch.tensor(result["moved_losses"])
    changes = torch.tensor(result["gradient_changes"])
    beta = torch.tensor(result["beta_smoothness"])
    return {
        "loss_range": float((moved.max(1).values - moved.min(1).values).mean()),
        "gradient_change": float(changes.max(1).values.mean()),
        "beta_mean": float(beta.mean()),
        "beta_max": float(beta.max()),
    }


def findings(table: dict[str, dict[str, Any]], seeds: int) -> list[Section]:
    """What the paper found, what we found (claims only where the seeds do not overlap)."""
    std, bn, noisy = table[STANDARD], table[BN], table[NOISY]

    def apart(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return a["min"] > b["max"] or b["min"] > a["max"]

    ours = [
        f"Test accuracy over {seeds} seeds: standard {_cell(std['test_accuracy'])}, with BN "
        f"{_cell(bn['test_accuracy'])}, BN + noise {_cell(noisy['test_accuracy'])}. "
        + (
            "BN beats the standard network beyond the seed spread. "
            if bn["test_accuracy"]["min"] > std["test_accuracy"]["max"]
            else "BN and the standard network overlap over the seeds. "
        )
        + f"On average the noisy network ends {_versus(noisy, bn)} BN and "
        f"{_versus(noisy, std)} the standard network.",
    ]
    for key, name in (("loss_range", "loss variation"), ("gradient_change", "gradient change"),
                      ("beta_mean", "effective beta-smoothness")):  # fmt: skip
        ratio = std[key]["mean"] / max(bn[key]["mean"], 1e-12)
        verdict = "beyond the seed spread" if apart(std[key], bn[key]) else "within the seed spread"
        size = f"{ratio:.1f} times smaller" if ratio >= 1 else f"{1 / ratio:.1f} times larger"
        ours.append(
            f"{name.capitalize()}: standard {_cell(std[key])}, with BN {_cell(bn[key])}: "
            f"{size} with BN, {verdict}."
        )
    return [
        Section("What the paper found", [
            "Santurkar et al. trained VGG on CIFAR-10 with and without BN, and with BN followed "
            "by noise of non-zero mean and non-unit variance that changes at every step. The "
            "noisy network had far more internal covariate shift, yet trained about as fast and "
            "as well as BN, and far better than the network without BN (Figure 2): the control of "
            "the layers' distributions is not what makes BN work.",
            "Along the training trajectory, the loss and its gradient vary much less with BN "
            "when moving along the gradient (Figure 4): smaller loss variation, more predictive "
            "gradients, a smaller effective beta-smoothness. BN makes the landscape smoother, "
            "which allows larger steps.",
        ]),
        Section("What we found", ours),
        Section("Where and why it differs", [
            "Scale: a 4-convolution CNN with a 64-unit head (27k weights) on MNIST-1D (4000 "
            "signals of length 40) for a minute or two on a CPU, not VGG on CIFAR-10 for hours on "
            "GPUs. Without BN our network is only 6 layers deep and still learns (slowly) at the "
            "same learning rate, so its gap to BN is smaller than the paper's.",
            "Noise: the paper draws i.i.d. noise per activation from a distribution redrawn at "
            "every step; we redraw a shift and a scale per channel at every step (the "
            "distribution change that defines covariate shift) and switch the noise off at "
            "evaluation.",
            "Landscape: measured on the step's own mini-batch every few steps, with step sizes "
            f"{', '.join(f'{f:g}' for f in ETA_FACTORS)} times the learning rate; the paper uses "
            "a denser grid. Early in training the standard network's landscape is flat (it has "
            "not started to learn), which lowers its averages.",
        ]),
    ]  # fmt: skip


def results(runs: dict[int, dict[str, History]]) -> dict[str, dict[str, Any]]:
    """Per network: final test / train accuracy and (standard, BN) the landscape, each as
    its spread over the seeds."""
    table: dict[str, dict[str, Any]] = {}
    for label in (STANDARD, BN, NOISY):
        histories = [per_seed[label] for per_seed in runs.values()]
        row = {
            "test_accuracy": common.spread([h.test_accuracy[-1] for h in histories]),
            "train_accuracy": common.spread([h.train_accuracy[-1] for h in histories]),
        }
        if "landscape" in histories[0].probes:
            summaries = [landscape_summary(h) for h in histories]
            row.update({key: common.spread([s[key] for s in summaries]) for key in summaries[0]})
        table[label] = row
    return table


def _cell(s: dict[str, Any] | None, digits: int = 3) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _versus(a: dict[str, Any], b: dict[str, Any]) -> str:
    """ "0.012 below" / "0.020 above": test accuracy of row ``a`` against row ``b``."""
    diff = a["test_accuracy"]["mean"] - b["test_accuracy"]["mean"]
    return f"{abs(diff):.3f} {'below' if diff < 0 else 'above'}"


def summary_table(table: dict[str, dict[str, Any]]) -> str:
    cols = ("test acc", "train acc", "loss range", "grad change", "beta-smoothness")
    keys = ("test_accuracy", "train_accuracy", "loss_range", "gradient_change", "beta_mean")
    lines = [f"{'':<11}" + "".join(f"{c:>24}" for c in cols)]
    for label, row in table.items():
        lines.append(f"{label:<11}" + "".join(f"{_cell(row.get(k)):>24}" for k in keys))
    return "\n".join(lines) + (
        "\n\nmean (min-max) over the seeds. Landscape, along the trajectory (means over it): "
        "loss range = max - min of\nL(w - eta g) over the step sizes; grad change = max over "
        "them of |grad L(w - eta g) - g|;\nbeta-smoothness = max over them of that change / "
        "|eta g|."
    )


def run_santurkar2018(
    data: Dataset | str = "mnist1d",
    data_dir: str | Path | None = None,
    steps: int | None = None,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seeds: int | None = None,
    quick: bool = False,
    bn: str = "batchnorm",
    options: RunOptions = DEFAULT_OPTIONS,
) -> dict[str, Any]:
    """Run the reproduction (``quick``: the test-sized run), print its table, write the
    report folder (default ``batchnorm-report/santurkar2018``), return the metrics."""
    defaults = {"steps": STEPS, "seeds": SEEDS, "eval_every": EVAL_EVERY,
                "landscape_every": LANDSCAPE_EVERY}  # fmt: skip
    p = common.plan(data, data_dir, options, defaults, QUICK, quick, steps=steps, seeds=seeds)
    data, dev, sizes, seed_list = p.data, p.device, p.sizes, p.seeds
    header = p.header(
        "batchnorm reproduce santurkar2018: Santurkar et al. (2018), Figures 2 and 4",
        f"       norm: none (standard) / BatchNorm1d / BatchNorm1d + noise: shift "
        f"U(-{NOISE_MEAN:g}, {NOISE_MEAN:g}), scale log-U(1/{NOISE_SCALE:g}, {NOISE_SCALE:g}),",
        "       per channel, redrawn at every step (off in evaluation)",
        f"train  SGD lr {lr:g}, batch {batch_size}, {sizes['steps']} steps, seeds "
        f"{seed_list}, {dev}; landscape every {sizes['landscape_every']} steps",
    )  # fmt: skip
    options.print(header + "\n")
    total = 3 * sizes["steps"] * len(seed_list)
    with common.progress_bar("santurkar2018", total, options.progress) as bar:
        runs = {
            seed: train_variants(
                data,
                sizes["steps"],
                batch_size,
                lr,
                seed,
                sizes["eval_every"],
                sizes["landscape_every"],
                bn,
                bar,
            )  # fmt: skip
            for seed in seed_list
        }
    table = results(runs)
    settings = common.settings_of(
        data, dev, **{"optimizer": f"SGD, lr {lr:g}", "batch size": batch_size,
                      "steps": sizes["steps"], "seeds": seed_list, "noise mean": NOISE_MEAN,
                      "noise scale": NOISE_SCALE, "landscape every": sizes["landscape_every"],
                      "landscape step sizes": [f * lr for f in ETA_FACTORS], "quick": quick},
    )  # fmt: skip
    metrics = {
        "command": "reproduce santurkar2018",
        "settings": settings,
        "results": table,
        "runs": {str(s): {label: h.to_dict() for label, h in r.items()} for s, r in runs.items()},
    }
    out = options.folder("batchnorm-report/santurkar2018")
    figures = []
    if options.plots:
        out.mkdir(parents=True, exist_ok=True)
        figures = [
            (plots_papers.curves_over_seeds(runs, out / FIGURES[0], [
                ("train_accuracy", "training accuracy (train mode, since last evaluation)"),
                ("test_accuracy", "test accuracy (eval mode)")],
                f"Santurkar et al. (2018), Figure 2, on {data.name}: BN with injected covariate "
                "shift trains like BN"),
             "Mean over seeds (line) and min-max over seeds (shaded). 'BN + noise': every BN "
             "layer followed by a per-channel shift and scale redrawn at every step."),
            (plots_papers.landscape(runs, out / FIGURES[1], (STANDARD, BN),
                f"Santurkar et al. (2018), Figure 4, on {data.name}: the landscape along the "
                "trajectory"),
             "(a) Loss at w - eta g over the step sizes (shaded: min to max over them, averaged "
             "over the seeds). (b) Gradient predictiveness: |grad L(w - eta g) - grad L(w)|, "
             "shaded over the step sizes. (c) Effective beta-smoothness: mean over seeds, "
             "shaded min-max over seeds."),
        ]  # fmt: skip
    keys = ("test_accuracy", "train_accuracy", "loss_range", "gradient_change", "beta_mean")
    results_table = Table(
        "Means over the seeds (metrics.json: results.<network>.<number>.mean); the spread "
        "is in the printed table.",
        ["", "test accuracy", "train accuracy", "loss range", "gradient change", "beta-smoothness"],
        [(label, [(("results", label, k, "mean") if k in row else None, ".3f") for k in keys])
         for label, row in table.items()],
    )  # fmt: skip
    return common.finish(
        options, out, "batchnorm reproduce santurkar2018", header, summary_table(table),
        metrics, figures, [results_table], findings(table, len(seed_list)),
    )  # fmt: skip
