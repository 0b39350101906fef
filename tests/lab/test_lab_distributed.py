"""`torchrun --nproc_per_node=2 -m batchnorm demo --distributed` (gloo, SyncBatchNorm) trains
the same models as the single-process demo and writes the same report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from batchnorm.cli import main

# The two runs do the same arithmetic in a different order (sums split across processes,
# then all-reduced): float32 rounding may move a test prediction or two (1/60 each here).
ACCURACY_TOLERANCE = 0.04
LOSS_TOLERANCE = 1e-3


def test_torchrun_demo_matches_single_process(tmp_path, blobs_npz):
    options = ["--data", "npz", "--data-dir", str(blobs_npz), "--epochs", "3",
               "--batch-size", "40", "--no-progress", "--no-plots"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "batchnorm", "demo", "--distributed",
               "--out", str(tmp_path / "ddp"), *options]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("batchnorm demo:") == 1  # only the main process prints
    assert "distributed: 2 processes (gloo)" in done.stdout
    assert main(["demo", "--out", str(tmp_path / "single"), *options]) == 0
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert "SyncBatchNorm" in ddp["settings"]["distributed"]
    for label, expected in single["results"].items():
        got = ddp["results"][label]
        assert got["test_accuracy"] == pytest.approx(expected["test_accuracy"],
                                                     abs=ACCURACY_TOLERANCE)  # fmt: skip
        assert got["final_train_loss"] == pytest.approx(expected["final_train_loss"],
                                                        rel=LOSS_TOLERANCE)  # fmt: skip
    assert (tmp_path / "ddp" / "report.html").is_file()
