"""The benchmark's code path on tiny shapes (what it measures, not how fast anything is)."""

import json

from batchnorm import cli
from batchnorm.cli import bench

TINY = [("(6,3,4,4)", (6, 3, 4, 4), False), ("(6,3,4,4) channels_last", (6, 3, 4, 4), True)]


def test_bench_checks_every_contender_and_reports_each_case():
    results = bench.run(shapes=TINY, quick=True, compile_reference=False, log=lambda _: None)
    rows = results["results"]
    cases = {(r["label"], r["mode"], r["contender"]) for r in rows}
    for label, _, _ in TINY:
        for mode in ("forward_train", "eval", "forward_backward"):
            assert {(label, mode, c) for c in ("aten", "ours", "ours_numba")} <= cases
        for mode, activation in bench.ACTIVATION_MODES.items():
            for name in (f"aten+{activation}", f"ours+{activation}", "ours_fused"):
                assert (label, mode, name) in cases
    for r in rows:
        assert r["max_rel_error_vs_baseline"] < bench.CHECK_TOLERANCE, r
        assert r["median_ms"] > 0 and r["calls"] >= bench.REPS_BOUNDS["quick"][0]
        nbytes = 4 * 6 * 3 * 4 * 4
        gbps = bench.TRAFFIC[r["mode"]] * nbytes / r["median_ms"] / 1e6
        assert abs(r["effective_gbps"] - gbps) < 1e-9 * gbps
        assert abs(r["fraction_of_copy"] - r["effective_gbps"] / r["copy_gbps"]) < 1e-12
    fused = [r for r in rows if r["contender"] == "ours_fused"]
    assert all("speedup_vs_ours_unfused" in r for r in fused)
    assert [t for t in results["targets"] if "fused" in t["target"]]
    assert "median ms" in bench.table(results)


def test_bfloat16_cases_report_their_dtype_and_bytes():
    case = [("(6,3,4,4) bfloat16", (6, 3, 4, 4), False, "bfloat16")]
    results = bench.run(shapes=case, modes=("forward_backward",), quick=True,
                        compile_reference=False, log=lambda _: None)  # fmt: skip
    rows = results["results"]
    assert rows and all(r["dtype"] == "bfloat16" for r in rows)
    for r in rows:
        # within two bfloat16 ulps of ATen's result, and bandwidth counted in 2-byte values
        assert r["max_rel_error_vs_baseline"] < bench.CHECK_TOLERANCE_BY_DTYPE["bfloat16"], r
        gbps = bench.TRAFFIC[r["mode"]] * 2 * 6 * 3 * 4 * 4 / r["median_ms"] / 1e6
        assert abs(r["effective_gbps"] - gbps) < 1e-9 * gbps


def test_compiled_reference_contender_agrees_with_aten():
    results = bench.run(shapes=TINY[:1], modes=("forward_backward",), quick=True,
                        compile_reference=True, log=lambda _: None)  # fmt: skip
    compiled = [r for r in results["results"] if r["contender"] == "compiled_reference"]
    assert len(compiled) == 1
    assert compiled[0]["max_rel_error_vs_baseline"] < bench.CHECK_TOLERANCE


def test_cli_bench_quick_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_SHAPES", TINY[:1])
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--out", str(out), "--system-allocator"]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["environment"]["allocator"] == "glibc defaults"
    assert data["environment"]["backend_ours"] == "numba"
    assert "written to" in capsys.readouterr().out


def test_cli_bench_quick_default_out_no_verdicts_and_load_warning(tmp_path, monkeypatch, capsys):
    """Without --out nothing lands in the current folder; --quick judges no target; a busy
    machine is said to be busy."""
    monkeypatch.setattr(bench, "QUICK_SHAPES", TINY[:1])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    assert cli.main(["bench", "--quick", "--no-compile"]) == 0
    out, err = capsys.readouterr()
    written = tmp_path / "cache" / "batchnorm" / "bench" / "cpu_kernels_quick.json"
    assert json.loads(written.read_text())["quick"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert f"written to {written}" in out
    assert "met" not in out and "targets: not judged on a --quick run" in out
    assert "warning: the load average is 7.5 on 2 cores" in err
