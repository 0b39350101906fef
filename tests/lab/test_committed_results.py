"""The numbers the docs quote for santurkar2018 and renorm2017 come from the committed
``metrics.json`` of a full default run (benchmarks/results/), not from memory: the printed
table, regenerated from the committed file, appears verbatim in docs/lab.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchnorm.lab.reproduce import renorm2017, santurkar2018

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "lab.md"


@pytest.mark.parametrize("module", [santurkar2018, renorm2017], ids=lambda m: m.__name__)
def test_docs_quote_the_committed_default_run(module):
    name = module.__name__.rsplit(".", 1)[-1]
    metrics = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    assert metrics["command"] == f"reproduce {name}"
    assert metrics["settings"]["quick"] is False  # a default run, not a test-sized one
    assert metrics["settings"]["steps"] == module.STEPS
    assert len(metrics["settings"]["seeds"]) == module.SEEDS
    table = module.summary_table(metrics["results"]).split("\n\n")[0]
    assert table in DOCS.read_text(encoding="utf-8")
