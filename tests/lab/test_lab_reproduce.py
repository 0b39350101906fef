"""The Ioffe & Szegedy (2015) reproduction at its defaults shows the paper's two claims."""

from __future__ import annotations

import json

from batchnorm.cli import main


def test_ioffe2015_defaults_bn_learns_faster_and_drifts_less(tmp_path, cache_env, capsys):
    out = tmp_path / "ioffe"
    assert main(["reproduce", "ioffe2015", "--out", str(out), "--no-plots", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    with_bn, without = metrics["results"]["with BN"], metrics["results"]["without BN"]
    assert metrics["settings"]["steps"] == 6000 and metrics["settings"]["batch size"] == 60

    # Figure 1(a): with BN the network reaches 50 % test accuracy in fewer steps.
    assert with_bn["steps_to_threshold"] is not None
    never = metrics["settings"]["steps"] + 1
    assert with_bn["steps_to_threshold"] < (without["steps_to_threshold"] or never)
    # Figure 1(b, c): without BN the sigmoid inputs' median drifts more.
    assert without["median_drift_mean"] > with_bn["median_drift_mean"]
    assert "steps to 50%" in capsys.readouterr().out
