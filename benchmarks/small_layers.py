"""Per-call time of small batch-norm layers: torch.nn's against this package's, where the
Python around a call is most of its cost (the kernels take a few µs).

Layers of a model's late stages and of MLPs, module calls (``layer(x)``): eval and training
forward without autograd, and forward + backward. Besides ``torch.nn`` and ``batchnorm``,
``batchnorm, general path`` is this package's layer in eval with its shortcut for usual
calls switched off (``functional._layer_call``, see docs/functional.md#dispatch): what an
eval call cost before it. The contenders alternate batch by batch
(:func:`batchnorm.lab.timing.time_interleaved`, each measure a batch of CALLS calls), so the
ratios hold while the machine's speed drifts; the µs do not.

    python benchmarks/small_layers.py [OUT.json] [--reps N]

writes OUT.json (default benchmarks/results/small_layers.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

import batchnorm.nn.base as layer_base
from batchnorm.cli.bench import _layers as bench_layers
from batchnorm.cli.bench import keep_freed_memory
from batchnorm.lab.timing import time_interleaved

RESULTS = Path(__file__).resolve().parent / "results"
#: (label, shape, channels_last): an MLP's (N, C), late 6x6 and 3x3 stages. The (N, C) and
#: channels_last ones run on the C++ backend, (8, 256, 6, 6) and (8, 512, 3, 3) (73,728
#: values) on torch's threads; the NCHW (8, 256, 6, 6) on ATen or the Numba kernels.
CASES = [
    ("(100,128)", (100, 128), False),
    ("(8,64,6,6) channels_last", (8, 64, 6, 6), True),
    ("(8,256,6,6)", (8, 256, 6, 6), False),
    ("(8,256,6,6) channels_last", (8, 256, 6, 6), True),
    ("(8,512,3,3) channels_last", (8, 512, 3, 3), True),
]
MODES = ("eval", "forward_train", "forward_backward")
THREADS = (1, 2)
#: Calls per measure (a call takes 10-100 µs: a batch keeps the timer's own cost out).
CALLS = 50


def _runner(layer: nn.Module, mode: str, x: torch.Tensor, dy: torch.Tensor, general: bool):
    """CALLS calls of ``layer`` in ``mode``; ``general``: with the usual-call shortcut off."""
    layer.train(mode != "eval")
    x_grad = x.detach().clone().requires_grad_()

    def call() -> None:
        if mode == "forward_backward":
            layer(x_grad).backward(dy)
            x_grad.grad = None
        else:
            with torch.no_grad():
                layer(x)

    def run() -> None:
        shortcut = layer_base._layer_call
        if general:
            layer_base._layer_call = lambda *args: None
        try:
            for _ in range(CALLS):
                call()
        finally:
            layer_base._layer_call = shortcut

    return run


def run(reps: int) -> list[dict]:
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for label, shape, channels_last in CASES:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g) * 2 + 1
            dy = torch.randn(shape, generator=g)
            if channels_last:
                x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
            for mode in MODES:
                layers = bench_layers(shape)  # batchnorm bench's: torch.nn's and ours, one state
                runs: dict[str, Callable[[], None]] = {
                    "torch.nn": _runner(layers["aten"], mode, x, dy, False),
                    "batchnorm": _runner(layers["ours"], mode, x, dy, False),
                }
                if mode == "eval":
                    runs["batchnorm, general path"] = _runner(layers["ours"], mode, x, dy, True)
                keys = {"threads": threads, "label": label, "mode": mode}
                row, us = timed_row(runs, reps, keys)
                if "batchnorm, general path" in us:
                    row["torch.nn / general path"] = round(
                        us["torch.nn"] / us["batchnorm, general path"], 3
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def timed_row(
    runs: dict[str, Callable[[], None]], reps: int, keys: dict
) -> tuple[dict, dict[str, float]]:
    """A result row: ``keys``, then each contender's median µs per call (``"<name> us"``)
    and ``"torch.nn / batchnorm"``, from ``reps`` interleaved measures of ``runs``; and the
    medians unrounded, by contender."""
    times = time_interleaved(runs, reps=reps, warmup=3)
    us = {name: statistics.median(ts) / CALLS * 1e6 for name, ts in times.items()}
    row = keys | {f"{name} us": round(value, 2) for name, value in us.items()}
    row["torch.nn / batchnorm"] = round(us["torch.nn"] / us["batchnorm"], 3)
    return row, us


def markdown_table(head: list[str], rows: Iterable[list[str]]) -> str:
    """A Markdown table of these column titles and rows of cells (this script's and
    half_layers.py's, which the performance page quotes)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def table(result: dict) -> str:
    """The Markdown table the performance page quotes."""
    head = ["threads", "layer", "mode", "torch.nn (µs)", "batchnorm (µs)",
            "torch.nn / batchnorm", "torch.nn / general path"]  # fmt: skip
    rows = []
    for r in result["results"]:
        general = r.get("torch.nn / general path")
        rows.append([str(r["threads"]), r["label"], r["mode"], f"{r['torch.nn us']:.1f}",
                     f"{r['batchnorm us']:.1f}", f"{r['torch.nn / batchnorm']:.2f}",
                     "" if general is None else f"{general:.2f}"])  # fmt: skip
    return markdown_table(head, rows)


def main(
    name: str = "small_layers",
    description: str = "small batch-norm layers, µs per module call (medians)",
    notes: str = "'general path': this package's layer with the usual-call shortcut off "
    "(eval only).",
    reps: int = 41,
    measure: Callable[[int], list[dict]] = run,
    render: Callable[[dict], str] = table,
) -> None:
    """Parse the command line, run ``measure``, write the JSON (with the machine's facts)
    and print ``render``'s table: this script's, and half_layers.py's with its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out", nargs="?", default=str(RESULTS / f"{name}.json"))
    parser.add_argument("--reps", type=int, default=reps, help="measures per contender")
    args = parser.parse_args()
    allocator = "freed memory reused (mallopt)" if keep_freed_memory() else "glibc defaults"
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = measure(args.reps)
    result = {
        "benchmark": description,
        "calls_per_measure": CALLS,
        "reps": args.reps,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
        "allocator": allocator,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "seconds": round(time.perf_counter() - start, 1),
        "notes": f"Ratios above 1: faster than torch.nn. {notes}",
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
