"""``batchnorm reproduce renorm2017``: Ioffe (2017), "Batch Renormalization: Towards Reducing
Minibatch Dependence in Batch-Normalized Models", sections 4.2 and 4.3, on MNIST-1D.

One small CNN (:func:`batchnorm.lab.models.mnist1d_cnn`) trained in three regimes, with the
same optimizer batch of 32 in each:

1. **large i.i.d.**: every normalization sees the whole shuffled mini-batch;
2. **micro-batches**: the mini-batch is spread over 16 "devices" of 2 samples and each
   device normalizes its own 2 (:class:`batchnorm.lab.variants.PerDevice`: data-parallel
   training without SyncBatchNorm; running statistics of the first device);
3. **non-i.i.d.**: every mini-batch holds 2 classes only
   (:func:`batchnorm.lab.variants.few_class_order`).

and six normalizations: BN, ``BatchRenorm1d`` (the paper's rmax/dmax schedule, compressed to
our training length), ``GhostBatchNorm1d`` (virtual batches of 2), BN frozen after a
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

from batchnorm.lab import plots_papers
from batchnorm.lab.data import Dataset
from batchnorm.lab.fit import evaluate, fit
from batchnorm.lab.models import batch_norm_1d, copy_shared_weights, mnist1d_cnn
from batchnorm.lab.report import Section, Table
from batchnorm.lab.reproduce import common
from batchnorm.lab.reproduce.common import DEFAULT_OPTIONS, RunOptions
from batchnorm.lab.variants import FreezeAt, PerDevice, few_class_order
from batchnorm.nn import BatchRenorm1d, GhostBatchNorm1d
from batchnorm.nn.renorm import paper_dmax, paper_rmax
from batchnorm.tools.recalibrate import recalibrate

LARGE, MICRO, NON_IID = "large i.i.d.", "micro-batches", "non-i.i.d."
REGIMES = (LARGE, MICRO, NON_IID)
BN, RENORM, GHOST, FROZEN, RECALIBRATED, GROUPNORM = (
    "BN", "BatchRenorm", "GhostBatchNorm", "frozen BN", "recalibrated BN", "GroupNorm",
)  # fmt: skip
VARIANTS = (BN, RENORM, GHOST, FROZEN, RECALIBRATED, GROUPNORM)
#: The paper's batch of 32 per worker (section 4.2). Micro-batches of 2 per device, not the
#: paper's 4: in our CNN the convolutions' BN pools every position (a device of 4 signals
#: gives 80 to 160 values per channel) and with 4 per device BN's test accuracy fell within
#: the seed spread; with 2, the head's BN normalizes each unit over 2 values.
BATCH_SIZE, MICRO_BATCH = 32, 2
#: Non-i.i.d. mini-batches: 4 blocks of 8 samples, each block from one class, so at most 4
#: of the 10 classes per batch (section 4.3 builds its batches from few classes too).
CLASSES_PER_BATCH = 4
#: SGD with momentum: trains every variant on MNIST-1D within the default steps.
LR, MOMENTUM = 0.05, 0.9
STEPS, SEEDS, EVAL_EVERY = 1000, 3, 250
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


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, data: Dataset, order: Any, seed: int) -> float:
    """Accuracy on the training set in train mode, with the regime's mini-batches (its
    order, its devices): what the model computes while it trains, on the final weights.
    Running statistics and step counters are restored afterwards."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    n = len(data.x_train)
    perm = (order or (lambda g: torch.randperm(n, generator=g)))(
        torch.Generator().manual_seed(seed)
    )
    perm = perm[: n - n % BATCH_SIZE].to(data.x_train.device)
    model.train()
    correct = 0
    for batch in perm.split(BATCH_SIZE):
        correct += int((model(data.x_train[batch]).argmax(1) == data.y_train[batch]).sum())
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    model.eval()
    return correct / len(perm)


def train_regime(
    data: Dataset, regime: str, steps: int, seed: int, eval_every: int, bn: str, bar: Any
) -> dict[str, dict[str, Any]]:
    """Every variant in one regime for one seed: {variant: {"history",
    "train_mode_accuracy", "eval_train_accuracy"}} (and "test_accuracy" when it is not the
    history's last)."""
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
            "train_mode_accuracy": train_mode_accuracy(model, data, order, seed),
            "eval_train_accuracy": _train_accuracy_eval_mode(model, data),
        }
        if variant == BN:  # PreciseBN on the trained BN model: population statistics
            copied = recalibrate(copy.deepcopy(model), data.x_train.split(100), progress=False)
            test_loss, test_accuracy = evaluate(copied, data.x_test, data.y_test)
            runs[RECALIBRATED] = {
                "history": history, "test_accuracy": test_accuracy,
                "train_mode_accuracy": runs[BN]["train_mode_accuracy"],
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
            train = [r["train_mode_accuracy"] for r in per_seed]
            eval_train = [r["eval_train_accuracy"] for r in per_seed]
            table[regime][variant] = {
                "test_accuracy": common.spread(test),
                "train_accuracy": common.spread(train),
                "eval_train_accuracy": common.spread(eval_train),
                "gap": common.spread([a - b for a, b in zip(train, eval_train, strict=True)]),
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
        "\n\nmean (min-max) over the seeds. train acc: the final model on the training set in "
        "train mode, in the regime's\nmini-batches (batch statistics); gap: that minus the "
        "same in eval mode (running statistics): how much\nthe model relies on its batches' "
        "statistics."
    )


def findings(table: dict[str, Any], seeds: int) -> list[Section]:
    """The paper's findings, ours (a claim only where the seed ranges do not overlap)."""

    def verdict(a: dict[str, float], b: dict[str, float]) -> str:
        if a["min"] > b["max"]:
            return "above, beyond the seed spread"
        if a["max"] < b["min"]:
            return "below, beyond the seed spread"
        return "within the seed spread"

    def test(regime: str, variant: str) -> dict[str, float]:
        return table[regime][variant]["test_accuracy"]

    def versus_bn(regime: str) -> str:
        return "; ".join(
            f"{v} {test(regime, v)['mean']:.3f} ({verdict(test(regime, v), test(regime, BN))})"
            for v in VARIANTS[1:]
        )

    def gaps(regime: str) -> str:
        return ", ".join(f"{v} {table[regime][v]['gap']['mean']:+.3f}" for v in VARIANTS)

    bn_large = test(LARGE, BN)
    ours = [
        f"Means over {seeds} seeds; a difference is called real only where the seed ranges "
        f"do not overlap. BN's test accuracy (eval mode): {bn_large['mean']:.3f} with large "
        f"i.i.d. batches, {test(MICRO, BN)['mean']:.3f} with micro-batches "
        f"({verdict(test(MICRO, BN), bn_large)}), {test(NON_IID, BN)['mean']:.3f} with "
        f"non-i.i.d. batches ({verdict(test(NON_IID, BN), bn_large)}).",
        "The train/eval gap (training-set accuracy in train mode minus eval mode) says how "
        "differently the model behaves with its batch's statistics and with the running ones. "
        f"Micro-batches: {gaps(MICRO)}. Non-i.i.d.: {gaps(NON_IID)}. A negative gap: with "
        "the statistics of a small or skewed batch the trained model does worse than with "
        "population statistics; with non-i.i.d. batches BatchRenorm brings train mode close to "
        "eval mode (frozen BN and GroupNorm are the same in both, a gap of exactly 0). With "
        "micro-batches every gap is small for the BN variants because they train badly in "
        "either mode: BN's failure there is training, not only inference.",
        f"Against BN with micro-batches (BN {test(MICRO, BN)['mean']:.3f}): {versus_bn(MICRO)}.",
        f"Against BN with non-i.i.d. batches (BN {test(NON_IID, BN)['mean']:.3f}): "
        f"{versus_bn(NON_IID)}.",
    ]
    return [
        Section("What the paper found", [
            "Ioffe (2017) trained Inception-v3 on ImageNet. With micro-batches of 4 examples per "
            "worker (section 4.2) BN's validation accuracy fell well below that of the usual 32 "
            "per worker, and Batch Renormalization recovered most of the loss. With non-i.i.d. "
            "mini-batches (section 4.3) BN's accuracy fell further, as the model learns to rely "
            "on the batch it is in and inference takes that batch away; Batch Renormalization "
            "again recovered most of it. The cause named: training normalizes with the batch's "
            "statistics, inference with the population's.",
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
            f"Micro-batches of {MICRO_BATCH}, not the paper's 4: in the convolutions BN pools "
            "every position, so a device of 4 signals gives 80 to 160 values per channel, and "
            "with 4 per device BN's test accuracy fell within the seed spread (0.948 against "
            "0.967 over 3 seeds). With 2, the BN of the fully connected head normalizes each "
            "unit over 2 values: its output is +-1, the sign of the difference between the two "
            "samples, whatever the input. The head then sees only which sample of the pair is "
            "larger and training itself fails (train-mode accuracy is as low): the paper's noisy "
            "statistics at their extreme, not its train/inference mismatch. Without BN in the "
            "head (BN in the convolutions only, as in Inception-v3) 2 per device did not lower "
            "BN's accuracy. BatchRenorm corrects towards the running statistics only within "
            "r in [1/3, 3] and d in [-5, 5]; the standard deviation of 2 samples is below a "
            "third of the population's about a third of the time, and the running statistics "
            "are the first device's, 2 samples per step. With 10 classes and 4 per "
            "batch, non-i.i.d. batches also bias every gradient towards the classes present: "
            "that hurts every variant through the optimizer (GroupNorm most, one seed did not "
            "train at all), not only through the statistics.",
            "Extra variants the paper does not have: BN frozen after a quarter of the training "
            "(training then normalizes as evaluation does), PreciseBN recalibration of the "
            "running statistics (exact population statistics; it cannot undo a model's reliance "
            "on batch statistics), and GroupNorm (no batch dependence at all).",
        ]),
    ]  # fmt: skip


def run_renorm2017(
    data: Dataset | str = "mnist1d", data_dir: str | Path | None = None, *,
    steps: int | None = None, seeds: int | None = None, quick: bool = False,
    bn: str = "batchnorm", options: RunOptions = DEFAULT_OPTIONS,
) -> dict[str, Any]:  # fmt: skip
    """Run the reproduction (``quick``: the test-sized run), print its table, write the
    report folder (default ``batchnorm-report/renorm2017``), return the metrics."""
    defaults = {"steps": STEPS, "seeds": SEEDS, "eval_every": EVAL_EVERY}
    p = common.plan(data, data_dir, options, defaults, QUICK, quick, steps=steps, seeds=seeds)
    data, dev, sizes, seed_list = p.data, p.device, p.sizes, p.seeds
    total = len(REGIMES) * (len(VARIANTS) - 1) * sizes["steps"] * len(seed_list)
    header = p.header(
        "batchnorm reproduce renorm2017: Ioffe (2017), Batch Renormalization, sections 4.2-4.3",
        f"train  SGD lr {LR:g} momentum {MOMENTUM:g}, batch {BATCH_SIZE}, {sizes['steps']} steps, "
        f"seeds {seed_list}, {dev}",
        f"regimes  {LARGE}: BN over the batch of {BATCH_SIZE};  {MICRO}: "
        f"{BATCH_SIZE // MICRO_BATCH} devices x {MICRO_BATCH} samples, BN per device;  "
        f"{NON_IID}: {CLASSES_PER_BATCH} classes per batch",
    )  # fmt: skip
    options.print(header + "\n")
    with common.progress_bar("renorm2017", total, options.progress) as bar:
        runs = {
            seed: {r: train_regime(data, r, sizes["steps"], seed, sizes["eval_every"], bn, bar)
                   for r in REGIMES}
            for seed in seed_list
        }  # fmt: skip
    table = results(runs)
    settings = common.settings_of(data, dev, **{
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
            "error bar: min-max) and its training-set accuracy in train mode, with the "
            "regime's batches (black dash). The farther the dash from the bar, the more the "
            "model's output depends on which batch it is in.",
        )]  # fmt: skip
    tables = [
        Table(f"{regime}: means over the seeds (metrics.json: results.<regime>.<variant>)",
              ["", "test accuracy (eval mode)", "train accuracy (train mode)", "train/eval gap"],
              [(v, [((("results", regime, v, k, "mean")), fmt) for k, fmt in
                    (("test_accuracy", ".3f"), ("train_accuracy", ".3f"), ("gap", "+.3f"))])
               for v in VARIANTS])
        for regime in REGIMES
    ]  # fmt: skip
    return common.finish(
        options, out, "batchnorm reproduce renorm2017", header, summary_table(table), metrics,
        figures, tables, findings(table, len(seed_list)),
    )  # fmt: skip
