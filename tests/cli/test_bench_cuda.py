"""The GPU benchmark's code, run on CPU at its quick size so that it cannot rot between the
sessions that are lent a GPU (its figures come from those sessions only)."""

import json

import pytest
import torch

from batchnorm.cli import bench_cuda


@pytest.fixture(scope="module")
def quick_run():
    """One quick run on CPU, and the parts it reported as it went."""
    parts = []
    results = bench_cuda.run("cpu", quick=True, on_part=lambda *part: parts.append(part))
    return results, parts


def test_quick_run_on_cpu_has_every_case_and_agrees_with_torch(quick_run):
    results, parts = quick_run
    json.dumps(results)  # serializable as the committed JSON
    # every part is reported as it is measured (a run cut short keeps what it measured)
    assert [value for key, value in parts if key == "cases"] == results["cases"]
    assert {key for key, _ in parts} == set(results)
    modes = {row["mode"] for row in results["cases"]}
    assert modes == set(bench_cuda.MODES)
    assert {row["dtype"] for row in results["cases"]} == {str(d) for d in bench_cuda.DTYPES}
    for row in results["cases"]:
        assert {"torch", "ours", "ours_aten", "copy"} <= set(row["median_s"])
        assert row["dispatch"] in results["backends"]
        # outputs and input gradients of magnitude ~1: float32 rounding, or half's (bf16: 2^-8)
        tolerance = 5e-3 if row["dtype"] == "torch.float32" else 5e-2
        for name, error in row["max_error_vs_torch"].items():
            assert error < tolerance, (row["shape"], row["mode"], name, error)
    assert set(results["training_step"]["median_s"]) == {"torch", "ours", "ours_fused"}


def test_bench_device_needs_an_available_gpu():
    """`batchnorm bench --device ...` runs this benchmark on a GPU; elsewhere it says why
    it cannot, and a device name torch does not know is named in the error."""
    from batchnorm.cli import bench

    if torch.cuda.is_available():
        # the error under test exists only without a GPU; with one, gpu_check.sh runs the
        # benchmark itself (through bench_cuda.run, which this command calls)
        pytest.skip("a GPU is present: the run itself is the GPU check's")
    with pytest.raises(SystemExit, match="expected cpu or an available CUDA device"):
        bench.main(["--device", "cuda", "--quick"])
    with pytest.raises(SystemExit, match="--device 'nonsense'"):
        bench.main(["--device", "nonsense"])


def test_summary_has_a_row_per_dtype_layout_and_mode(quick_run):
    results, _ = quick_run
    text = bench_cuda.summary(results)
    groups = {(r["dtype"], r["layout"], r["mode"]) for r in results["cases"]}
    rows = [line for line in text.splitlines() if line.startswith("| float") or
            line.startswith("| bfloat")]  # fmt: skip
    assert len(rows) == len(groups)
    assert "| ours_fused |" in text and "| (256, 16) contiguous | 3 |" in text
