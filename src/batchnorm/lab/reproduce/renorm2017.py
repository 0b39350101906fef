"""``batchnorm reproduce renorm2017``: Ioffe (2017), "Batch Renormalization: Towards Reducing
Minibatch Dependence in Batch-Normalized Models", sections 4.2 and 4.3, on MNIST-1D.

One small CNN (:func:`batchnorm.lab.models.mnist1d_cnn`) trained in three regimes, with the
same optimizer batch of 32 in each:

1. **large i.i.d.**: every normalization sees the whole shuffled mini-batch;
2. **micro-batches**: the mini-batch is spread over 8 "devices" of 4 samples and each
   device normalizes its own 4 (:class:`batchnorm.lab.variants.PerDevice`: data-parallel
   training without SyncBatchNorm; running statistics of the first device);
3. **non-i.i.d.**: every mini-batch holds 2 classes only
   (:func:`batchnorm.lab.variants.few_class_order`).

and six normalizations: BN, ``BatchRenorm1d`` (the paper's rmax/dmax schedule, compressed to
our training length), ``GhostBatchNorm1d`` (virtual batches of 4), BN frozen after a
warm-up (``batchnorm.freeze``), the BN model ``recalibrate``d on the training set after
training, and ``torch.nn.GroupNorm`` (independent of the batch). Reported per regime and
variant, over several seeds: eval-mode test accuracy, train-mode training accuracy and the
train/eval gap (train-mode accuracy minus eval-mode accuracy on the training set).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchnorm import BatchRenorm1d, GhostBatchNorm1d, paper_dmax, paper_rmax, recalibrate
from batchnorm.lab import plots_papers
from batchnorm.lab.data import Dataset
from batchnorm.lab.fit import evaluate, fit
from batchnorm.lab.models import batch_norm_1d, copy_shared_weights, mnist1d_cnn
from batchnorm.lab.report import Section, Table
from batchnorm.lab.reproduce.common import (
    DEFAULT_OPTIONS,
    RunOptions,
    finish,
    prepare,
    progress_bar,
    settings_of,
    spread,
)
from batchnorm.lab.variants import FreezeAt, PerDevice, few_class_order

LARGE, MICRO, NON_IID = "large i.i.d.", "micro-batches", "non-i.i.d."
REGIMES = (LARGE, MICRO, NON_IID)
BN, RENORM, GHOST, FROZEN, RECALIBRATED, GROUPNORM = (
    "BN", "BatchRenorm", "GhostBatchNorm", "frozen BN", "recalibrated BN", "GroupNorm",
)  # fmt: skip
VARIANTS = (BN, RENORM, GHOST, FROZEN, RECALIBRATED, GROUPNORM)
#: The paper's batch of 32 per worker; its micro-batches of 4 per worker (section 4.2).
BATCH_SIZE, MICRO_BATCH = 32, 4
#: Non-i.i.d. mini-batches: 2 classes of MNIST-1D's 10, 16 samples each (section 4.3 draws
#: its batches from few classes too; the fewer, the larger BN's train/eval mismatch).
CLASSES_PER_BATCH = 2
#: SGD with momentum: trains every variant on MNIST-1D within the default steps.
LR, MOMENTUM = 0.05, 0.9
STEPS, SEEDS, EVAL_EVERY = 1500, 3, 250
QUICK = {"steps": 300, "seeds": 2, "eval_every": 100}
#: The paper's schedule (rmax 1 -> 3 over 5k-40k steps, dmax 0 -> 5 over 5k-25k) is laid
#: out over its ~160k training steps; we compress it to ours in the same proportion.
PAPER_STEPS = 160_000
#: Frozen BN: trained as BN for the first quarter of the steps, then frozen.
WARMUP_FRACTION = 0.25
GROUPS = 4
FIGURE = "regimes.png"


def make_norm(variant: str, regime: str, steps: int, bn: str = "batchnorm"):
    """The ``norm(channels)`` factory of ``variant`` in ``regime``."""
    scale = PAPER_STEPS / steps

    def renorm(c: int) -> nn.Module:
        return BatchRenorm1d(
            c, rmax=lambda s: paper_rmax(int(s * scale)), dmax=lambda s: paper_dmax(int(s * scale))
        )

    def per_device(layer: nn.Module) -> nn.Module:
        return PerDevice(layer, MICRO_BATCH) if regime == MICRO else layer

    factories = {
        BN: lambda c: per_device(batch_norm_1d(c, bn)),
        RENORM: lambda c: per_device(renorm(c)),
        GHOST: lambda c: GhostBatchNorm1d(c, MICRO_BATCH),
        FROZEN: lambda c: per_device(batch_norm_1d(c, bn)),
        GROUPNORM: lambda c: nn.GroupNorm(GROUPS, c),
    }
    return factories[variant]


def _train_accuracy_eval_mode(model: nn.Module, data: Dataset) -> float:
    return evaluate(model, data.x_train, data.y_train)[1]


def train_regime(
    data: Dataset, regime: str, steps: int, seed: int, eval_every: int, bn: str, bar: Any
) -> dict[str, dict[str, Any]]:
    """Every variant in one regime for one seed: {variant: {"history", "eval_train_accuracy"}}."""
    torch.manual_seed(seed)
    order = (
        few_class_order(data.y_train, BATCH_SIZE, CLASSES_PER_BATCH) if regime == NON_IID else None
    )
    base = mnist1d_cnn(data.num_features, data.num_classes)  # the shared initial weights
    models = {}
    for v in VARIANTS:
        if v != RECALIBRATED:  # recalibrated: the trained BN model, recalibrated
            models[v] = mnist1d_cnn(
                data.num_features, data.num_classes, make_norm(v, regime, steps, bn)
            )
            copy_shared_weights(base, models[v])
    runs: dict[str, dict[str, Any]] = {}
    for variant, model in models.items():
        model.to(data.x_train.device)
        probes = {"freeze": FreezeAt(int(steps * WARMUP_FRACTION))} if variant == FROZEN else {}
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        history = fit(
            model, optimizer, data, steps=steps, batch_size=BATCH_SIZE, eval_every=eval_every,
            probes=probes, seed=seed, progress=bar, label=f"{regime} {variant}", order=order,
        )  # fmt: skip
        runs[variant] = {
            "history": history,
            "eval_train_accuracy": _train_accuracy_eval_mode(model, data),
        }
        if variant == BN:  # PreciseBN on the trained BN model: population statistics
            copied = recalibrate(copy.deepcopy(model), data.x_train.split(100), progress=False)
            test_loss, test_accuracy = evaluate(copied, data.x_test, data.y_test)
            runs[RECALIBRATED] = {
                "history": history, "test_accuracy": test_accuracy,
                "eval_train_accuracy": _train_accuracy_eval_mode(copied, data),
            }  # fmt: skip
    return runs


def results(runs: dict[int, dict[str, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """{regime: {variant: {test_accuracy, train_accuracy, eval_train_accuracy, gap}}}, each
    a spread over the seeds."""
    table: dict[str, Any] = {}
    for regime in REGIMES:
        table[regime] = {}
        for variant in VARIANTS:
            per_seed = [runs[seed][regime][variant] for seed in runs]
            test = [r.get("test_accuracy", r["history"].test_accuracy[-1]) for r in per_seed]
            train = [r["history"].train_accuracy[-1] for r in per_seed]
            eval_train = [r["eval_train_accuracy"] for r in per_seed]
            table[regime][variant] = {
                "test_accuracy": spread(test),
                "train_accuracy": spread(train),
                "eval_train_accuracy": spread(eval_train),
                "gap": spread([a - b for a, b in zip(train, eval_train, strict=True)]),
            }
    return table


def summary_table(table: dict[str, Any]) -> str:
    def cell(s: dict[str, float]) -> str:
        return f"{s['mean']:.3f} ({s['min']:.2f}-{s['max']:.2f})"

    lines = []
    for regime in REGIMES:
        lines.append(
            f"{regime:<18}{'test acc (eval)':>22}{'train acc (train)':>22}{'train/eval gap':>22}"
        )
        for variant in VARIANTS:
            row = table[regime][variant]
            lines.append(
                f"  {variant:<16}{cell(row['test_accuracy']):>22}{cell(row['train_accuracy']):>22}"
                f"{cell(row['gap']):>22}"
            )
    return "\n".join(lines) + (
        "\n\nmean (min-max) over the seeds. gap: accuracy on the training set in train mode "
        "(the last steps' mini-batches)\nminus in eval mode (running statistics): how much the "
        "model relies on its batches' statistics."
    )


def findings(table: dict[str, Any], seeds: int) -> list[Section]:
    """The paper's findings, ours (a claim only where the seed ranges do not overlap)."""

    def compare(regime_a: str, variant_a: str, regime_b: str, variant_b: str) -> str:
        a, b = (
            table[regime_a][variant_a]["test_accuracy"],
            table[regime_b][variant_b]["test_accuracy"],
        )
        if a["min"] > b["max"]:
            verdict = "above, beyond the seed spread"
        elif a["max"] < b["min"]:
            verdict = "below, beyond the seed spread"
        else:
            verdict = "within the seed spread"
        return (f"{variant_a} ({regime_a}) {a['mean']:.3f} vs {variant_b} ({regime_b}) "
                f"{b['mean']:.3f}: {verdict}")  # fmt: skip

    ours = [
        f"Over {seeds} seeds. BN's eval-mode test accuracy: " + "; ".join(
            compare(r, BN, LARGE, BN) for r in (MICRO, NON_IID)) + ".",
        "Micro-batches: " + "; ".join(compare(MICRO, v, MICRO, BN) for v in VARIANTS[1:]) + ".",
        "Non-i.i.d.: " + "; ".join(compare(NON_IID, v, NON_IID, BN) for v in VARIANTS[1:]) + ".",
        "Train/eval gap (mean): " + "; ".join(
            f"{r}: " + ", ".join(f"{v} {table[r][v]['gap']['mean']:+.3f}" for v in VARIANTS)
            for r in REGIMES) + ".",
    ]  # fmt: skip
    return [
        Section("What the paper found", [
            "Ioffe (2017) trained Inception-v3 on ImageNet. With micro-batches of 4 per worker "
            "(section 4.2), BN reached 74.2 % validation accuracy against 78.3 % with 32 per "
            "worker; Batch Renormalization recovered most of it (76.5 %). With non-i.i.d. "
            "mini-batches (section 4.3), BN's accuracy fell to 67 %, as the model learns to rely "
            "on the batch it is in and evaluation removes that batch; Batch Renormalization "
            "reached 76.5 %. The cause named is the difference between the statistics used in "
            "training (the batch's) and in inference (the population's).",
        ]),
        Section("What we found", ours),
        Section("Where and why it differs", [
            "Scale: a 4-convolution CNN on MNIST-1D (4000 signals) for minutes on a CPU, not "
            "Inception on ImageNet; 'devices' are slices of one batch (PerDevice), so every "
            "regime has the same optimizer batch of 32 and the same gradient noise.",
            "Schedule: the paper's rmax/dmax ramps (5k to 40k of about 160k steps) compressed in "
            f"proportion to our steps; no higher moving-average rate. GhostBatchNorm uses virtual "
            f"batches of {MICRO_BATCH}: in the micro-batch regime it is per-device BN computed by "
            "one layer, with running statistics averaged over all devices instead of the first.",
            "Extra variants the paper does not have: BN frozen after a quarter of the training "
            "(training then normalizes as evaluation does), PreciseBN recalibration of the "
            "running statistics (exact population statistics; it cannot undo a model's reliance "
            "on batch statistics), and GroupNorm (no batch dependence at all).",
        ]),
    ]  # fmt: skip


def run_renorm2017(
    data: Dataset | str = "mnist1d",
    data_dir: str | Path | None = None,
    steps: int | None = None,
    seeds: int | None = None,
    quick: bool = False,
    bn: str = "batchnorm",
    options: RunOptions = DEFAULT_OPTIONS,
) -> dict[str, Any]:
    """Run the reproduction (``quick``: the test-sized run), print its table, write the
    report folder (default ``batchnorm-report/renorm2017``), return the metrics."""
    sizes = dict(QUICK) if quick else {"steps": STEPS, "seeds": SEEDS, "eval_every": EVAL_EVERY}
    sizes.update({k: v for k, v in (("steps", steps), ("seeds", seeds)) if v is not None})
    data, dev = prepare(data, data_dir, options.device)
    seed_list = list(range(options.seed, options.seed + sizes["seeds"]))
    header = "\n".join([
        "batchnorm reproduce renorm2017: Ioffe (2017), Batch Renormalization, sections 4.2-4.3",
        f"data   {data.describe()}",
        "model  VGG-like CNN: 2 x [2 x (Conv1d(3) -> norm -> ReLU) -> MaxPool], Linear",
        f"train  SGD lr {LR:g} momentum {MOMENTUM:g}, batch {BATCH_SIZE}, {sizes['steps']} steps, "
        f"seeds {seed_list}, {dev}",
        f"regimes  {LARGE}: BN over the batch of {BATCH_SIZE};  {MICRO}: "
        f"{BATCH_SIZE // MICRO_BATCH} devices x {MICRO_BATCH} samples, BN per device;  "
        f"{NON_IID}: {CLASSES_PER_BATCH} classes per batch",
    ])  # fmt: skip
    options.print(header + "\n")
    total = len(REGIMES) * (len(VARIANTS) - 1) * sizes["steps"] * len(seed_list)
    with progress_bar("renorm2017", total, options.progress) as bar:
        runs = {
            seed: {r: train_regime(data, r, sizes["steps"], seed, sizes["eval_every"], bn, bar)
                   for r in REGIMES}
            for seed in seed_list
        }  # fmt: skip
    table = results(runs)
    settings = settings_of(data, dev, **{
        "optimizer": f"SGD, lr {LR:g}, momentum {MOMENTUM:g}", "batch size": BATCH_SIZE,
        "micro-batch": MICRO_BATCH, "classes per batch (non-i.i.d.)": CLASSES_PER_BATCH,
        "steps": sizes["steps"], "seeds": seed_list,
        "frozen after step": int(sizes["steps"] * WARMUP_FRACTION), "GroupNorm groups": GROUPS,
        "quick": quick,
    })  # fmt: skip
    metrics = {
        "command": "reproduce renorm2017",
        "settings": settings,
        "results": table,
        "runs": {str(seed): {regime: {v: {"history": r["history"].to_dict(),
                                          **{k: x for k, x in r.items() if k != "history"}}
                                      for v, r in per_regime.items() if v != RECALIBRATED}
                             for regime, per_regime in per_seed.items()}
                 for seed, per_seed in runs.items()},
    }  # fmt: skip
    out = options.folder("batchnorm-report/renorm2017")
    figures = []
    if options.plots:
        out.mkdir(parents=True, exist_ok=True)
        figures = [(
            plots_papers.regime_bars(table, out / FIGURE, REGIMES, VARIANTS,
                                     f"Ioffe (2017), sections 4.2-4.3, on {data.name}"),
            "Per regime: each variant's test accuracy in eval mode (bar: mean over seeds; "
            "error bar: min-max) and its training accuracy in train mode (black dash). Where "
            "the dash is far above the bar, the model works only with its batch's statistics.",
        )]  # fmt: skip
    tables = [
        Table(f"{regime}: means over the seeds (metrics.json: results.<regime>.<variant>)",
              ["", "test accuracy (eval mode)", "train accuracy (train mode)", "train/eval gap"],
              [(v, [((("results", regime, v, k, "mean")), fmt) for k, fmt in
                    (("test_accuracy", ".3f"), ("train_accuracy", ".3f"), ("gap", "+.3f"))])
               for v in VARIANTS])
        for regime in REGIMES
    ]  # fmt: skip
    return finish(
        options, out, "batchnorm reproduce renorm2017", header, summary_table(table), metrics,
        figures, tables, findings(table, len(seed_list)),
    )  # fmt: skip
