"""The qualitative findings of santurkar2018 and renorm2017 that hold at ``--quick`` (2 fixed
seeds, 300 steps), each with a margin; the runs are shared with the browser test
(conftest: one run per session).

Only what holds at this size is asserted (and one finding that does not, BatchRenorm's
lead, on the committed full run). The full default runs, whose numbers the docs quote, are
in benchmarks/results/ (test_committed_results checks docs against them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: Margins on accuracies (fractions of the test set): larger than the differences between
#: the two quick seeds' means we saw while building the experiments.
MARGIN = 0.02
ROOT = Path(__file__).resolve().parents[2]


def mean(metrics, *path):
    value = metrics["results"]
    for key in path:
        value = value[key]
    return value["mean"]


def test_santurkar2018_noisy_bn_trains_like_bn_and_far_better_than_no_bn(santurkar_quick):
    _, metrics, printed = santurkar_quick
    assert metrics["settings"]["quick"] is True and metrics["settings"]["seeds"] == [0, 1]
    bn, noisy = (
        mean(metrics, "with BN", "test_accuracy"),
        mean(metrics, "BN + noise", "test_accuracy"),
    )
    standard = mean(metrics, "standard", "test_accuracy")
    # Figure 2: BN with injected covariate shift stays within 0.15 of BN ...
    assert bn - noisy < 0.15
    # ... and both are far above the network without BN (at 300 steps it is still early).
    assert noisy > standard + 0.2 and bn > standard + 0.3
    assert "BN + noise" in printed and "beta-smoothness" in printed


def test_santurkar2018_landscape_is_measured_along_the_trajectory(santurkar_quick):
    _, metrics, _ = santurkar_quick
    for label in ("standard", "with BN"):
        result = metrics["runs"]["0"][label]["probes"]["landscape"]
        assert result["steps"] == list(range(0, 300, 25))
        assert len(result["etas"]) == 4
        assert all(len(row) == 4 for row in result["moved_losses"] + result["gradient_changes"])
        assert min(result["beta_smoothness"]) > 0
        assert mean(metrics, label, "loss_range") > 0
    assert "landscape" not in metrics["runs"]["0"]["BN + noise"]["probes"]


def test_renorm2017_bn_falls_with_micro_batches(renorm_quick):
    _, metrics, _ = renorm_quick
    large = metrics["results"]["large i.i.d."]["BN"]["test_accuracy"]
    micro = metrics["results"]["micro-batches"]["BN"]["test_accuracy"]
    # BN's eval accuracy with 2 samples per device is far below the large-batch one, beyond
    # the seed spread (the ranges do not overlap): the head's BN over 2 values gives +-1.
    assert micro["max"] < large["min"]
    assert micro["mean"] < large["mean"] - 0.3


@pytest.mark.parametrize("variant", ["frozen BN", "GroupNorm"])
def test_renorm2017_variants_recover_part_of_micro_batches(renorm_quick, variant):
    """BN frozen after warm-up and GroupNorm are each above BN with micro-batches by a
    margin and beyond the seed spread. BatchRenorm's lead is checked on the committed full
    run instead (next test): in this quick run its two seeds and BN's train near chance
    (0.17-0.36), where a float32 rounding anywhere changes a run's accuracy by 0.1 either
    way (NCHW training moved to the C++ node, 2026-12-06: BatchRenorm 0.285, 0.215 -> 0.194,
    0.364, BN 0.161, 0.205 -> 0.208, 0.181; a batch's last 2 planes summed together there,
    2026-12-07: BatchRenorm 0.212, 0.171, BN 0.189, 0.226)."""
    _, metrics, _ = renorm_quick
    micro = metrics["results"]["micro-batches"]
    ours, bn = micro[variant]["test_accuracy"], micro["BN"]["test_accuracy"]
    assert ours["mean"] > bn["mean"] + 2 * MARGIN and ours["min"] > bn["max"], (ours, bn)


def test_renorm2017_batch_renorm_recovers_part_of_micro_batches_in_the_full_run():
    """BatchRenorm above BN with micro-batches by a margin and beyond the seed spread, in the
    committed full default run (three seeds, 1,000 steps: benchmarks/results/renorm2017.json,
    whose table docs/lab.md quotes; test_committed_results ties the two)."""
    metrics = json.loads((ROOT / "benchmarks" / "results" / "renorm2017.json").read_text())
    assert metrics["settings"]["quick"] is False and len(metrics["settings"]["seeds"]) == 3
    micro = metrics["results"]["micro-batches"]
    ours, bn = micro["BatchRenorm"]["test_accuracy"], micro["BN"]["test_accuracy"]
    assert ours["mean"] > bn["mean"] + 2 * MARGIN and ours["min"] > bn["max"], (ours, bn)


@pytest.mark.parametrize("variant", ["frozen BN", "GroupNorm"])
def test_renorm2017_batch_independent_variants_have_no_train_eval_gap(renorm_quick, variant):
    """Frozen BN and GroupNorm compute the same in train and eval mode: a zero gap checks the
    measurement itself."""
    _, metrics, _ = renorm_quick
    for regime in ("large i.i.d.", "micro-batches", "non-i.i.d."):
        gap = metrics["results"][regime][variant]["gap"]
        assert max(abs(gap["min"]), abs(gap["max"])) < 1e-9, (regime, gap)
