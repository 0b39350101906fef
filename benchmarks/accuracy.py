"""Float32 accuracy of training batch norm on CPU against a float64 oracle: ATen's kernel as
it is, ATen with the shift the dispatch gives it (``safe_batch_norm``), the Numba kernels
and the C++ backend (the dispatch's choice for float32 ``(N, C)`` and channels-last
training), on ``(N, C)`` and channels-last inputs (where ATen sums plainly) and NCHW inputs
of small planes, as the mean grows against the spread. Also why a comparison through a
ReLU misleads: the float32 forward flips the ReLU's mask at pre-activations within its
rounding of zero, and each flip changes that element's gradient by its whole size,
whatever the backward's accuracy.

Errors are the largest absolute difference over the largest magnitude of the oracle, per
tensor (y, dx, dweight). Part of ``make bench`` (``benchmarks/suite.py``), written to
benchmarks/results/accuracy.json.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import batchnorm.functional as BF
from batchnorm.backends import cpp_cpu
from batchnorm.backends.aten import safe_batch_norm
from batchnorm.ops import use_backend

#: (label, shape, channels_last) of the inputs: (N, C) and channels-last, the layouts ATen's
#: plainly summing kernel takes, and NCHW of small planes, which the dispatch gives ATen
#: unshifted (its NCHW kernel; the shifted contender is then ATen itself).
CASES = [
    ("(32768, 128)", (32768, 128), False),
    ("(32, 64, 32, 32) channels_last", (32, 64, 32, 32), True),
    ("(8, 1280, 3, 3) channels_last", (8, 1280, 3, 3), True),
    ("(8, 256, 6, 6) NCHW", (8, 256, 6, 6), False),
]
MEANS = (0.0, 3.0, 100.0, 1e4)
THREADS = (1, 2)

Norm = Callable[[Tensor, Tensor, Tensor], Tensor]


def _aten(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return torch.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, False)


def _aten_shifted(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return safe_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)


def _ours(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    with use_backend("numba"):
        return BF.batch_norm(x, None, None, w, b, True)


def _ours_cpp(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    with use_backend("cpp_cpu"):
        return BF.batch_norm(x, None, None, w, b, True)


CONTENDERS: dict[str, Norm] = {
    "aten": _aten, "aten_shifted": _aten_shifted, "ours": _ours, "ours_cpp": _ours_cpp,
}  # fmt: skip


def _takes(name: str, x: Tensor, w: Tensor, b: Tensor) -> bool:
    """Whether contender ``name`` computes a training call of these tensors: the C++
    backend's own check (it takes (N, C) and channels-last inputs, NCHW ones in inference
    only)."""
    if name != "ours_cpp":
        return True
    return cpp_cpu.extension().takes(x, w, b, None, None, None, True, 0) == cpp_cpu.TAKES


def _step(norm: Norm, x: Tensor, dy: Tensor, w: Tensor, b: Tensor, relu: bool = False):
    """(pre-activation, y, dx, dweight) in float64, of one training step of ``norm``."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    pre = norm(x, w, b)
    y = torch.relu(pre) if relu else pre
    y.backward(dy)
    return tuple(t.detach().double() for t in (pre, y, x.grad, w.grad))


def _error(value: Tensor, oracle: Tensor) -> float:
    return ((value - oracle).abs().max() / oracle.abs().max()).item()


def _data(shape: tuple[int, ...], channels_last: bool, mean: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + mean).float()
    dy = torch.randn(shape, generator=g)
    w = torch.empty(shape[1]).uniform_(0.5, 1.5, generator=g)
    b = torch.randn(shape[1], generator=g)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x, dy, w, b


def errors(quick: bool = False) -> list[dict]:
    """One row per case, mean, thread count and contender: its y, dx and dweight errors."""
    rows = []
    for label, shape, channels_last in CASES[-2:] if quick else CASES:
        for mean in MEANS:
            x, dy, w, b = _data(shape, channels_last, mean, seed=0)
            oracle = _step(_aten, *(t.double() for t in (x, dy, w, b)))
            for threads in THREADS:
                torch.set_num_threads(threads)
                for name, norm in CONTENDERS.items():
                    if not _takes(name, x, w, b):
                        continue
                    _, y, dx, dw = _step(norm, x, dy, w, b)
                    rows.append({
                        "case": label, "mean": mean, "threads": threads, "contender": name,
                        "y": _error(y, oracle[1]), "dx": _error(dx, oracle[2]),
                        "dweight": _error(dw, oracle[3]),
                    })  # fmt: skip
    return rows


def relu_flips(mean: float = 3.0) -> list[dict]:
    """Through a ReLU, (32768, 128): how many masks each contender's forward flips, its dx
    error, and its dx error without the channels that hold a flip."""
    x, dy, w, b = _data((32768, 128), False, mean, seed=0)
    oracle_pre, _, oracle_dx, _ = _step(_aten, *(t.double() for t in (x, dy, w, b)), relu=True)
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for name, norm in CONTENDERS.items():
            pre, _, dx, _ = _step(norm, x, dy, w, b, relu=True)
            flips = (pre > 0) != (oracle_pre > 0)
            clean = ~flips.any(0)
            rows.append({
                "mean": mean, "threads": threads, "contender": name,
                "flips": int(flips.sum()),
                "largest_flipped_pre_activation": oracle_pre[flips].abs().max().item()
                if flips.any() else 0.0,
                "dx": _error(dx, oracle_dx),
                "dx_without_flipped_channels": _error(dx[:, clean], oracle_dx[:, clean]),
            })  # fmt: skip
    return rows


def table(result: dict) -> str:
    """The errors as a Markdown table, y / dx / dweight, the larger of the thread counts
    (docs/performance.md quotes it; a test holds the two together)."""
    worst: dict[tuple, list[float]] = {}
    for row in result["errors"]:
        key = (row["case"], row["mean"], row["contender"])
        errors = worst.setdefault(key, [0.0, 0.0, 0.0])
        for i, name in enumerate(("y", "dx", "dweight")):
            errors[i] = max(errors[i], row[name])
    lines = [
        "| input | mean | ATen: y / dx / dweight | ATen with our shift | ours (Numba) "
        "| ours (C++) |",
        "|---|---|---|---|---|---|",
    ]
    for case, mean in dict.fromkeys((c, m) for c, m, _ in worst):
        cells = [
            " / ".join(f"{e:.1e}" for e in worst[case, mean, name])
            if (case, mean, name) in worst
            else "—"  # a layout the contender does not take
            for name in CONTENDERS
        ]
        lines.append(f"| {case} | {mean:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(quick: bool = False) -> dict:
    previous = torch.get_num_threads()
    try:
        return {
            "benchmark": "float32 training accuracy against float64 (max abs error / max "
            "magnitude)",
            "data": "std 1 around the given mean; weights U(0.5, 1.5), biases N(0, 1)",
            "errors": errors(quick),
            "relu_flips": [] if quick else relu_flips(),
        }
    finally:
        torch.set_num_threads(previous)
