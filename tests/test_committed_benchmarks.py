"""The CPU-kernel, accuracy, small-layer, model and GPU figures the performance page quotes
come from the committed benchmarks/results/cpu_kernels.json, accuracy.json,
small_layers.json, half_layers.json, models.json (``make bench``) and cuda_bench.json
(``benchmarks/gpu_check.sh``), not from memory:
the tables regenerated from those files appear verbatim in docs/performance.md, and the
files show what the page says of them."""

from __future__ import annotations

import json

from conftest import ROOT, benchmark_module


def test_performance_page_quotes_the_committed_accuracy_run():
    accuracy = benchmark_module("accuracy")
    result = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    assert result["relu_flips"], "a full run, not a quick one"
    assert accuracy.table(result) in (ROOT / "docs" / "performance.md").read_text()
    cpp = [row for row in result["errors"] if row["contender"] == "ours_cpp"]
    assert len(cpp) == 24  # three layouts it takes, four means, two thread counts
    for row in cpp:  # the dispatch's path there: a few float32 roundings at every mean
        assert max(row["y"], row["dx"], row["dweight"]) < 1e-6, row


def test_relu_flips_explain_the_gradient_errors_through_a_relu():
    """What the page's correction says: through a ReLU, ATen's large dx errors come with
    flipped masks, and without the flipped channels its dx is right to float32 rounding."""
    result = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    for row in result["relu_flips"]:
        if row["contender"] == "aten":
            assert row["flips"] > 0 and row["dx"] > 1e-2
            assert row["largest_flipped_pre_activation"] < 1e-5
        assert row["dx_without_flipped_channels"] < 1e-5


def test_performance_page_quotes_the_committed_cpu_kernel_run():
    """`make bench`'s batchnorm bench run: its tables, as batchnorm.cli.bench_report.markdown
    writes them, are the page's, and it is a full run (every case, every mode)."""
    from batchnorm.cli import bench, bench_report

    result = json.loads((ROOT / "benchmarks" / "results" / "cpu_kernels.json").read_text())
    assert not result["quick"]
    cases = {(row["label"], row["mode"]) for row in result["results"]}
    assert cases == {(case[0], mode) for case in bench.SHAPES for mode in bench.MODES}
    assert bench_report.markdown(result) in (ROOT / "docs" / "performance.md").read_text()


def test_performance_page_quotes_the_committed_small_layer_run():
    module = benchmark_module("small_layers")
    result = json.loads((ROOT / "benchmarks" / "results" / "small_layers.json").read_text())
    assert result["reps"] >= 41, "a full run"
    assert module.table(result) in (ROOT / "docs" / "performance.md").read_text()


def test_performance_page_quotes_the_committed_half_precision_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports small_layers' runner
    module = benchmark_module("half_layers")
    result = json.loads((ROOT / "benchmarks" / "results" / "half_layers.json").read_text())
    assert result["reps"] >= 21, "a full run"
    assert len(result["results"]) == 2 * 2 * len(module.CASES) * 3  # threads, dtypes, modes
    assert module.table(result) in (ROOT / "docs" / "performance.md").read_text()


def test_performance_page_quotes_the_committed_model_run():
    module = benchmark_module("models")
    result = json.loads((ROOT / "benchmarks" / "results" / "models.json").read_text())
    assert result["reps"] >= module.REPS and len(result["bn_layers"]) == 12, "a full run"
    page = (ROOT / "docs" / "performance.md").read_text()
    assert module.steps_table(result) in page
    assert module.bn_layers_table(result) in page


def test_performance_page_quotes_the_committed_gpu_run():
    from batchnorm.cli import bench_cuda

    result = json.loads((ROOT / "benchmarks" / "results" / "cuda_bench.json").read_text())
    assert result["level"] == "full" and "H200" in result["device"]
    page = (ROOT / "docs" / "performance.md").read_text()
    assert bench_cuda.summary(result) in page
    # what the page says of the run: Triton only where the dispatch chose it, and faster there
    for row in result["cases"]:
        ours = row["speedup_vs_torch"]["ours"]
        assert ours >= 0.9, (row["shape"], row["mode"], ours)
        if row["dispatch"] == "triton":
            assert row["mode"] != "eval" and row["layout"] == "contiguous" and ours > 2
