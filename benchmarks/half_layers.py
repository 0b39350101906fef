"""Per-call time of half-precision layers of moderate size: torch.nn's against this
package's, bfloat16 and float16 inputs with float32 parameters (what ``torch.autocast("cpu")``
gives a batch norm after a convolution).

The cases are those of the dispatch rules that send half-precision calls to ATen on more
than one thread (``batchnorm.backends.aten``: ATEN_BELOW_PLANE_HALF_THREADED,
ATEN_BELOW_NUMEL_HALF_ROWS_THREADED, ATEN_BELOW_NUMEL_HALF_PLANES_GRAPH), with one case past
each, and two channels-last layers whose channels are not a multiple of 16, on one thread
and on two: module calls (``layer(x)``), eval and training forward
without autograd, and forward + backward, alternating batch by batch as in
``small_layers.py`` (whose runner this uses).

    python benchmarks/half_layers.py [OUT.json] [--reps N]

writes OUT.json (default benchmarks/results/half_layers.json).
"""

from __future__ import annotations

import json

import torch

import small_layers
from batchnorm.cli.bench import _layers as bench_layers
from small_layers import MODES, THREADS, _runner, timed_row

#: (label, shape, channels_last): below and past each rule's threshold on two threads.
CASES = [
    ("(8,256,12,12)", (8, 256, 12, 12), False),  # planes under 196 values
    ("(8,64,24,24)", (8, 64, 24, 24), False),  # NCHW training steps under 600,000 values
    ("(32,64,28,28)", (32, 64, 28, 28), False),  # past both
    ("(512,256)", (512, 256), False),  # (N, C) under 300,000 values
    ("(8,512,7,7) channels_last", (8, 512, 7, 7), True),  # channels-last under 300,000
    ("(8,128,24,24) channels_last", (8, 128, 24, 24), True),  # past it
    # channels that are not whole 16-value lanes (EfficientNet's 40 and MobileNetV2's 24):
    # rows as one run of values (rows.cpp's kHalfRunsBelow), the second past 2,097,152
    ("(32,40,28,28) channels_last", (32, 40, 28, 28), True),
    ("(32,24,56,56) channels_last", (32, 24, 56, 56), True),
]
DTYPES = ("bfloat16", "float16")


def run(reps: int) -> list[dict]:
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for dtype in DTYPES:
            for label, shape, channels_last in CASES:
                g = torch.Generator().manual_seed(0)
                x = (torch.randn(shape, generator=g) * 2 + 1).to(getattr(torch, dtype))
                dy = torch.randn(shape, generator=g).to(x.dtype)
                if channels_last:
                    x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
                for mode in MODES:
                    layers = bench_layers(shape)  # float32 parameters, one state
                    runs = {
                        "torch.nn": _runner(layers["aten"], mode, x, dy, False),
                        "batchnorm": _runner(layers["ours"], mode, x, dy, False),
                    }
                    keys = {"threads": threads, "dtype": dtype, "label": label, "mode": mode}
                    row, _ = timed_row(runs, reps, keys)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def table(result: dict) -> str:
    """The Markdown table the performance page quotes."""
    head = ["threads", "dtype", "layer", "mode", "torch.nn (µs)", "batchnorm (µs)",
            "torch.nn / batchnorm"]  # fmt: skip
    rows = ([str(r["threads"]), r["dtype"], r["label"], r["mode"], f"{r['torch.nn us']:.1f}",
             f"{r['batchnorm us']:.1f}", f"{r['torch.nn / batchnorm']:.2f}"]
            for r in result["results"])  # fmt: skip
    return small_layers.markdown_table(head, rows)


def main() -> None:
    small_layers.main(
        "half_layers",
        "half-precision batch-norm layers, µs per module call (medians)",
        "Inputs bfloat16 or float16, parameters and running statistics float32.",
        21,
        run,
        table,
    )


if __name__ == "__main__":
    main()
