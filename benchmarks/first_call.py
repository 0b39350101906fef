"""The first call of the Numba kernels, in fresh processes: with an empty cache (Numba
compiles) and with the cache the first process left (Numba loads); and ``batchnorm compile``
(every specialization) on an empty cache, then on the full one.

    python benchmarks/first_call.py [--repeats 3] [--out benchmarks/results/first_call.json]

Each repeat uses a new empty NUMBA_CACHE_DIR. The call is the issue's: a training-mode
forward + backward of ``batchnorm.BatchNorm2d(64)`` on a (16, 64, 32, 32) float32 NCHW
input, which runs the parallel channels-first forward and backward kernels and the
running-statistics update. Times are wall seconds, measured inside the child process
(``import`` of torch and batchnorm, the first call, the second call) and around it for
``batchnorm compile``. The machine's 1-minute load average before each run is recorded:
compiling is CPU-bound, so a busy machine stretches it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import json, sys, time
start = time.perf_counter()
import torch, batchnorm
imported = time.perf_counter()
bn = batchnorm.BatchNorm2d(64)
x = torch.randn(16, 64, 32, 32, requires_grad=True)
times = []
for _ in range(2):
    t = time.perf_counter()
    bn(x).sum().backward()
    times.append(time.perf_counter() - t)
print(json.dumps({"import_s": imported - start, "first_call_s": times[0],
                  "second_call_s": times[1]}))
"""


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _child(cache: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    load = _load()
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    result = json.loads(done.stdout)
    result["notice_shown"] = "batchnorm: compiling" in done.stderr
    result["load_average_before"] = load
    return result


def _compile_all(cache: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    load = _load()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "batchnorm", "compile"], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    seconds = time.perf_counter() - start
    # its count line ("N specializations: ..."), not its last (the C++ kernels' since 2026-12-05)
    summary = next(line for line in done.stdout.splitlines() if " specializations: " in line)
    return {"wall_s": seconds, "summary": summary, "load_average_before": load}


def run(repeats: int) -> dict:
    import numba
    import torch

    rows = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            rows.append({"cache": "empty", **_child(cache)})
            rows.append({"cache": "warm", **_child(cache)})
    with tempfile.TemporaryDirectory() as cache:
        compile_runs = {"empty": _compile_all(cache), "warm": _compile_all(cache)}
    return {
        "benchmark": "first call of the Numba kernels in a fresh process",
        "call": "BatchNorm2d(64), (16, 64, 32, 32) float32 NCHW, training forward + backward",
        "environment": {
            "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numba": numba.__version__,
            "cores": os.cpu_count(),
        },
        "first_call": rows,
        "batchnorm_compile": compile_runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "first_call.json"))
    args = parser.parse_args()
    results = run(args.repeats)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for row in results["first_call"]:
        print(f"{row['cache']:>5} cache: import {row['import_s']:.2f} s, first call "
              f"{row['first_call_s']:.2f} s, second {row['second_call_s'] * 1e3:.1f} ms, "
              f"notice {row['notice_shown']}, load {row['load_average_before']}")  # fmt: skip
    for cache, run_ in results["batchnorm_compile"].items():
        print(f"batchnorm compile, {cache} cache: {run_['wall_s']:.1f} s ({run_['summary']})")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
