"""CPU eval latency of the ResNet-18-like and MobileNet-like example models, folded vs
unfolded (``batchnorm.fold``), at batch 1 (3x224x224) and batch 32 (3x64x64), in NCHW and
channels_last layouts.

``run(quick)`` returns the results and writes them to ``benchmarks/results/fold.json``
(``fold_quick.json`` for a quick run); ``python benchmarks/fold_bench.py [--quick]`` does
the same from the shell. Folded and unfolded calls alternate
(:func:`batchnorm.lab.timing.time_interleaved`), so both see the same background load, and
the figures are medians.

By default torch runs on ONE thread, and the benchmark records the thread's CPU time as
well as wall-clock time. Our machines have 2 cores shared by several people: when other
work takes a core, torch's OpenMP threads wait on each other and 2-thread wall-clock
timings of the same model swung by 10x between runs, while single-thread CPU time is what
the computation itself costs. ``threads=N`` measures N threads (wall-clock only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
from functools import partial
from pathlib import Path

import torch

import batchnorm
from batchnorm import example_models
from batchnorm.lab.timing import time_interleaved, wall_and_cpu_seconds

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = {
    "resnet18_like": example_models.resnet18_like,
    "mobilenet_like": example_models.mobilenet_like,
}
INPUTS = {"batch 1, 3x224x224": (1, 3, 224, 224), "batch 32, 3x64x64": (32, 3, 64, 64)}
# The layout (contiguous NCHW) and channels_last, where CPU convolutions run faster,
# so the batch-norm passes fold removes weigh more.
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# (warm-up calls, timed calls per variant): a stable median in a few minutes on one core.
FULL = (2, 11)
QUICK = (1, 3)
DEFAULT_THREADS = 1  # see the module docstring


def _median_ms(samples: list[tuple[float, float]], which: int) -> float:
    return 1e3 * statistics.median(s[which] for s in samples)


def run(
    quick: bool = False,
    out_dir: Path | None = RESULTS_DIR,
    threads: int = DEFAULT_THREADS,
    suffix: str = "",
) -> dict:
    """Measure every (model, input, layout); return a JSON-ready dict and write it to
    ``out_dir`` (unless None) as ``fold[_quick]{suffix}.json``."""
    warmup, repeats = QUICK if quick else FULL
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    try:
        for name, factory in MODELS.items():
            model = factory().eval()
            for (label, shape), (layout, memory_format) in itertools.product(
                INPUTS.items(), LAYOUTS.items()
            ):
                x = torch.randn(shape)
                folded, report = batchnorm.fold(model, x)
                model = model.to(memory_format=memory_format)
                folded = folded.to(memory_format=memory_format)
                x = x.to(memory_format=memory_format)
                with torch.inference_mode():
                    expected = model(x)
                    error = (folded(x) - expected).abs().max() / expected.abs().max()
                    runs = {"unfolded": partial(model, x), "folded": partial(folded, x)}
                    times = time_interleaved(
                        runs, reps=repeats, warmup=warmup, measure=wall_and_cpu_seconds
                    )
                unfolded_t, folded_t = times["unfolded"], times["folded"]
                row = {
                    "model": name,
                    "input": label,
                    "layout": layout,
                    "bn_folded": f"{len(report.folded)}/{len(report.folded) + len(report.skipped)}",
                    "max_relative_difference": error.item(),
                    "unfolded_ms": round(_median_ms(unfolded_t, 0), 3),
                    "folded_ms": round(_median_ms(folded_t, 0), 3),
                }
                row["speedup"] = round(row["unfolded_ms"] / row["folded_ms"], 3)
                line = f"wall {row['speedup']:.2f}x"
                if threads == 1:  # the thread's CPU time is the whole computation's
                    row["unfolded_cpu_ms"] = round(_median_ms(unfolded_t, 1), 3)
                    row["folded_cpu_ms"] = round(_median_ms(folded_t, 1), 3)
                    row["speedup_cpu"] = round(row["unfolded_cpu_ms"] / row["folded_cpu_ms"], 3)
                    line = (
                        f"cpu {row['unfolded_cpu_ms']:8.2f} -> {row['folded_cpu_ms']:8.2f} ms "
                        f"{row['speedup_cpu']:.2f}x, {line}"
                    )
                print(f"{name:15s} {label:19s} {layout:13s} {line}", flush=True)
                rows.append(row)
    finally:
        torch.set_num_threads(previous_threads)
    result = {
        "benchmark": "fold: CPU eval latency, folded vs unfolded (medians of interleaved calls)",
        "quick": quick,
        "repeats": repeats,
        "threads": threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
        "baseline": "torch.nn.BatchNorm2d in eval mode",
        "results": rows,
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"fold{'_quick' if quick else ''}{suffix}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads")
    parser.add_argument("--suffix", default="", help="appended to the results file name")
    args = parser.parse_args()
    run(quick=args.quick, threads=args.threads, suffix=args.suffix)
