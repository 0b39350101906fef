"""``batchnorm bench``: batch norm on CPU — ours (Numba kernels) against torch.nn (ATen) and
against torch.compile of the reference, in one run.

What is measured, with torch's thread count (Numba follows it):

* shapes (100, 128), (4096, 1024), (32, 128, 32, 32) and (64, 256, 28, 28) contiguous and
  channels_last (the last, 51 MiB, past a 32 MiB L3), (8, 64, 16, 56, 56) in float32, and
  (4096, 1024) and (32, 128, 32, 32) contiguous and channels_last in bfloat16 and (64, 256,
  28, 28) channels_last in float16, with float32 parameters (what ``torch.autocast("cpu")``
  gives a batch norm after a convolution);
* modes ``forward_train`` (training-mode forward without autograd, running statistics
  updated), ``eval`` (inference), ``forward_backward`` (training forward, then backward with
  a fixed output gradient), ``bn_relu_forward_backward`` (the same with a ReLU after the
  batch norm: our fused ``BatchNormAct``, our ``BatchNorm`` followed by ``torch.relu``, and
  torch.nn's followed by ``torch.relu``) and ``bn_silu_forward_backward`` (the same with
  SiLU, ``F.silu``: an activation whose loops are compute-bound, where a loop that does not
  vectorize shows);
* contenders ``aten`` (``torch.nn.BatchNorm*d``), ``ours`` (``batchnorm.BatchNorm*d``, which
  dispatches plain batch norm to ATen where that is faster, see :mod:`batchnorm.backends`),
  ``ours_numba`` (the same layer forced onto the Numba kernels) and ``compiled_reference``
  (``torch.compile`` of the plain-torch math of :mod:`batchnorm.reference`, compilation
  excluded from the timings).

Every contender's output (and input gradient) is first checked against ATen's; the check's
largest error is part of the results. Calls alternate between contenders, in a new order
each round, so that all see the same background load and none always follows the same
other (:func:`batchnorm.lab.timing.time_interleaved`), and each figure is the median (and
the minimum) of many calls.

Effective bandwidth uses a stated minimal-traffic model: the bytes a batch-norm pass must
move between the cores and memory if nothing stays in cache between passes, in tensor
elements of the input's size N — ``eval`` 2N (read x, write y), ``forward_train`` 3N (read x
for the statistics, read it again and write y), ``forward_backward`` 3N + 5N (backward: read
dy and x for the two per-channel sums, read them again and write dx), and the same 8N for
the fused BN+ReLU and BN+SiLU (the pre-activation is recomputed, not stored). The copy
bandwidth of the same run is ``dst.copy_(x)`` into a preallocated tensor of the input's size
(2N), timed as one more contender of each case (so that it meets the same cache state: a 16
MiB tensor copied over and over stays in a 32 MiB L3 and copies at several times the
memory's speed); ``fraction_of_copy`` is the ratio of the two.

Allocator: by default the benchmark asks glibc to keep freed memory for reuse (``mallopt``:
no ``mmap`` for blocks under 1 GiB, no trimming), as the allocators that PyTorch's CPU
performance guide recommends (jemalloc, tcmalloc) do. Without it every tensor over 32 MiB
is a fresh ``mmap`` whose pages the kernel faults in and zeroes on first touch, which costs
more than batch norm itself at (64, 256, 28, 28) for every contender alike.
``--system-allocator`` keeps glibc's defaults.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchnorm import ops, reference
from batchnorm._cache import cache_root
from batchnorm.cli.bench_report import ACTIVATION_MODES, table, targets
from batchnorm.lab.timing import time_interleaved
from batchnorm.nn import dims_of_input, flavour

#: (label, shape, channels_last[, input dtype name, float32 by default]): the cases of the
#: project's CPU performance targets. The parameters are float32 whatever the input's dtype.
Case = tuple[str, tuple[int, ...], bool] | tuple[str, tuple[int, ...], bool, str]
SHAPES: list[Case] = [
    ("(100,128)", (100, 128), False),
    ("(4096,1024)", (4096, 1024), False),
    ("(32,128,32,32)", (32, 128, 32, 32), False),
    ("(32,128,32,32) channels_last", (32, 128, 32, 32), True),
    ("(64,256,28,28)", (64, 256, 28, 28), False),
    ("(64,256,28,28) channels_last", (64, 256, 28, 28), True),
    ("(8,64,16,56,56)", (8, 64, 16, 56, 56), False),
    ("(4096,1024) bfloat16", (4096, 1024), False, "bfloat16"),
    ("(32,128,32,32) bfloat16", (32, 128, 32, 32), False, "bfloat16"),
    ("(32,128,32,32) channels_last bfloat16", (32, 128, 32, 32), True, "bfloat16"),
    ("(64,256,28,28) channels_last float16", (64, 256, 28, 28), True, "float16"),
]
#: --quick: a small shape of each layout, enough to exercise every code path in seconds.
QUICK_SHAPES: list[Case] = [
    ("(100,128)", (100, 128), False),
    ("(16,32,16,16)", (16, 32, 16, 16), False),
    ("(16,32,16,16) channels_last", (16, 32, 16, 16), True),
]
MODES = ("forward_train", "eval", "forward_backward", *ACTIVATION_MODES)
#: torch's activation, which torch.nn's layer and our unfused one are followed by.
TORCH_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": torch.relu, "silu": F.silu}
#: Minimal traffic, in elements of the input's size (see the module docstring).
TRAFFIC = {"eval": 2, "forward_train": 3, "forward_backward": 8} | {
    mode: 8 for mode in ACTIVATION_MODES
}
COPY_TRAFFIC = 2
#: The contender each mode's speed-up is relative to.
BASELINE = {mode: "aten" for mode in MODES} | {
    mode: f"aten+{activation}" for mode, activation in ACTIVATION_MODES.items()
}
#: Seconds of timed calls per contender and case (full, quick), and the bounds on the
#: number of calls: the median of ~1 s of calls is stable to a few % on a quiet machine.
TIME_BUDGET = {"full": 1.0, "quick": 0.05}
REPS_BOUNDS = {"full": (15, 400), "quick": (3, 20)}
WARMUP = 3
#: Outputs must agree with ATen's to this (float32, relative to the largest magnitude).
CHECK_TOLERANCE = 1e-3
#: ... and half-precision outputs to two of their ulps (2^-7 of a magnitude each in
#: bfloat16, 2^-10 in float16): ATen and we both round a float32 result, which may land on
#: neighbouring values.
CHECK_TOLERANCE_BY_DTYPE = {"float32": CHECK_TOLERANCE, "bfloat16": 2 * 2.0**-7,
                            "float16": 2 * 2.0**-10}  # fmt: skip
#: The repository's folder of committed results: `make bench` passes it as --out.
RESULTS_DIR = Path("benchmarks") / "results"
#: A 1-minute load average above this share of the cores means other processes compete
#: for them: the timings, and the verdicts drawn from them, are then not to be trusted.
BUSY_LOAD = 0.5

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of unmapping it; False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    threshold = 1 << 30
    ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, threshold))


def _reference_bn(x, weight, bias, running_mean, running_var, training, momentum, eps, act):
    """Batch norm in the plain torch ops of batchnorm.reference (compiled by the bench)."""
    if training:
        mean, var = reference.batch_stats(x)
        count = x.numel() // x.shape[1]
        reference.update_running_stats(
            running_mean, running_var, mean.detach(), var.detach(), count, momentum
        )
    else:
        mean, var = running_mean, running_var
    invstd = reference.invstd_of(var, eps)
    return reference.forward(x, mean, invstd, weight, bias, None, act)


def _layers(shape: tuple[int, ...], activation: str | None = None) -> dict[str, nn.Module]:
    """torch.nn's layer and ours (plain, and fused when activation is set), same state."""
    dims = dims_of_input(len(shape))
    channels = shape[1]
    torch.manual_seed(0)
    aten = flavour("torch", dims)(channels)
    with torch.no_grad():
        aten.weight.uniform_(0.5, 1.5)
        aten.bias.normal_()
        aten.running_mean.normal_()
        aten.running_var.uniform_(0.5, 1.5)
    ours = flavour("batchnorm", dims)
    layers = {"aten": aten, "ours": ours(channels), "ours_numba": ours(channels)}
    if activation:
        layers["ours_fused"] = flavour("act", dims)(channels, activation=activation)
    for layer in layers.values():
        layer.load_state_dict(aten.state_dict())
    return layers


def _compiled_reference(aten: nn.Module, training: bool) -> Callable[[Tensor], Tensor]:
    """torch.compile of _reference_bn on a copy of the layer's state."""
    torch._dynamo.reset()  # each case compiles afresh (and stays under the recompile limit)
    weight = nn.Parameter(aten.weight.detach().clone())
    bias = nn.Parameter(aten.bias.detach().clone())
    running_mean, running_var = aten.running_mean.clone(), aten.running_var.clone()
    compiled = torch.compile(_reference_bn, dynamic=False)

    def call(x: Tensor) -> Tensor:
        return compiled(x, weight, bias, running_mean, running_var, training, 0.1, 1e-5,
                        "identity")  # fmt: skip

    return call


def _cases(mode: str, shape: tuple[int, ...], compile_reference: bool):
    """{contender: (forward function, needs_grad)} for one mode."""
    activation = ACTIVATION_MODES.get(mode)
    layers = _layers(shape, activation)
    training = mode != "eval"
    for layer in layers.values():
        layer.train(training)
    if activation:
        act = TORCH_ACTIVATIONS[activation]
        return {
            f"aten+{activation}": lambda x: act(layers["aten"](x)),
            f"ours+{activation}": lambda x: act(layers["ours"](x)),
            "ours_fused": layers["ours_fused"],
        }
    numba_layer = layers["ours_numba"]

    def ours_numba(x: Tensor) -> Tensor:
        with ops.use_backend("numba"):  # the Numba kernels even where ATen is dispatched
            return numba_layer(x)

    cases: dict[str, Callable[[Tensor], Tensor]] = {
        "aten": layers["aten"],
        "ours": layers["ours"],
        "ours_numba": ours_numba,
    }
    if compile_reference:
        cases["compiled_reference"] = _compiled_reference(layers["aten"], training)
    return cases


def _runner(fn: Callable[[Tensor], Tensor], x: Tensor, dy: Tensor, backward: bool):
    if backward:
        x = x.detach().clone().requires_grad_()

        def run() -> None:
            fn(x).backward(dy)
            x.grad = None

        return run

    def run_no_grad() -> None:
        with torch.no_grad():
            fn(x)

    return run_no_grad


def _check(fn: Callable[[Tensor], Tensor], expected: tuple[Tensor, ...], x: Tensor, dy: Tensor,
           backward: bool) -> float:  # fmt: skip
    """Largest error against ATen's output (and input gradient), relative to their size."""
    x = x.detach().clone().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        y = fn(x)
    got = (y.detach(),)
    if backward:
        y.backward(dy)
        got += (x.grad,)
    return max(
        ((g - e).abs().max() / e.abs().max().clamp(min=1)).item()
        for g, e in zip(got, expected, strict=True)
    )


def run(
    shapes: list[Case] | None = None,
    modes: tuple[str, ...] = MODES,
    quick: bool = False,
    compile_reference: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the benchmark and return its results (see the module docstring)."""
    shapes = shapes if shapes is not None else (QUICK_SHAPES if quick else SHAPES)
    level = "quick" if quick else "full"
    rows = []
    for label, shape, channels_last, *rest in shapes:
        dtype_name = rest[0] if rest else "float32"
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
        dy = torch.randn(shape, generator=g).to(dtype)
        if channels_last:
            memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            x, dy = (t.contiguous(memory_format=memory_format) for t in (x, dy))
        dst = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        log(f"{label}:")
        for mode in modes:
            backward = mode.endswith("forward_backward")
            fns = _cases(mode, shape, compile_reference)
            baseline = BASELINE[mode]
            expected_x = x.detach().clone().requires_grad_(backward)
            with torch.set_grad_enabled(backward):
                y = fns[baseline](expected_x)
            expected = (y.detach(),)
            if backward:
                y.backward(dy)
                expected += (expected_x.grad,)
            errors = {name: _check(fn, expected, x, dy, backward) for name, fn in fns.items()}
            for name, error in errors.items():
                if error > CHECK_TOLERANCE_BY_DTYPE[dtype_name]:
                    log(f"  WARNING: {name} differs from {baseline} by {error:.2e} ({mode})")
            start = time.perf_counter()
            runs = {name: _runner(fn, x, dy, backward) for name, fn in fns.items()}
            # The copy takes its turn among the contenders: it meets the caches they leave.
            runs["copy"] = lambda dst=dst, x=x: dst.copy_(x)
            times = time_interleaved(
                runs, budget=TIME_BUDGET[level], bounds=REPS_BOUNDS[level], warmup=WARMUP
            )
            log(f"  {mode}: {time.perf_counter() - start:.1f} s")
            medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
            copy_ms = medians.pop("copy")
            copy_gbps = COPY_TRAFFIC * nbytes / copy_ms / 1e6
            for name, ts in times.items():
                if name == "copy":
                    continue
                effective = TRAFFIC[mode] * nbytes / medians[name] / 1e6
                row = {
                    "shape": list(shape),
                    "label": label,
                    "layout": "channels_last" if channels_last else "contiguous",
                    "dtype": dtype_name,
                    "mode": mode,
                    "contender": name,
                    "median_ms": medians[name],
                    "min_ms": min(ts) * 1e3,
                    "calls": len(ts),
                    "speedup_vs_baseline": medians[baseline] / medians[name],
                    "baseline": baseline,
                    "traffic_elements": TRAFFIC[mode],
                    "effective_gbps": effective,
                    "copy_ms": copy_ms,
                    "copy_gbps": copy_gbps,
                    "fraction_of_copy": effective / copy_gbps,
                    "max_rel_error_vs_baseline": errors[name],
                }
                if name == "ours_fused":
                    unfused = f"ours+{ACTIVATION_MODES[mode]}"
                    row["speedup_vs_ours_unfused"] = medians[unfused] / medians[name]
                rows.append(row)
    return {
        "benchmark": "batchnorm CPU kernels",
        "quick": quick,
        "environment": environment(),
        "traffic_model": {**TRAFFIC, "copy": COPY_TRAFFIC, "unit": "input-sized tensors"},
        "results": rows,
        "targets": targets(rows),
    }


def environment() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "backend_ours": ops.select_backend(torch.zeros(2, 2)).name,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "missing"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_parser(commands: Any) -> None:
    """Register ``batchnorm bench`` on the CLI's subparsers."""
    parser = commands.add_parser("bench", help="time the CPU kernels against ATen")
    add_arguments(parser)
    parser.set_defaults(run=run_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, few calls, no torch.compile: a smoke run")  # fmt: skip
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out torch.compile of the reference")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and Numba) threads; default: torch's default")  # fmt: skip
    parser.add_argument("--system-allocator", action="store_true",
                        help="keep glibc's malloc defaults (see the module docstring)")  # fmt: skip
    parser.add_argument("--device", default="cpu",
                        help="cpu (the CPU kernels against ATen), or a GPU such as cuda: "
                        "batchnorm.cli.bench_cuda's cases against torch.nn (cuDNN)")  # fmt: skip
    default = default_out_folder() / "cpu_kernels[_quick].json"
    parser.add_argument(
        "--out", default=None, help=f"JSON file to write (default {default}, or "
        f"cuda_bench[_quick].json beside it for a GPU; make bench writes "
        f"{RESULTS_DIR / 'cpu_kernels.json'})",
    )  # fmt: skip


def run_from_args(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"batchnorm bench: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        from batchnorm.cli import bench_cuda

        return bench_cuda.run_from_args(args, default_out_folder())
    allocator = "glibc defaults"
    if not args.system_allocator:
        allocator = "freed memory reused (mallopt)" if keep_freed_memory() else allocator
    out = Path(
        args.out or default_out_folder() / f"cpu_kernels{'_quick' if args.quick else ''}.json"
    )
    busy, load_before = load_warning(), _load_average()
    if busy:
        print(f"warning: {busy}", file=sys.stderr, flush=True)
    results = run(quick=args.quick, compile_reference=not (args.quick or args.no_compile))
    # The environment's load_average is read at the end, when the run is the load.
    results["environment"] |= {"allocator": allocator, "load_average_before": load_before}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results, verdicts=not args.quick))
    if busy and not args.quick:  # said again where the verdicts are read
        print(f"\nwarning: {busy} The verdicts above may be wrong.")
    print(f"\nwritten to {out}")
    return 0


def default_out_folder() -> Path:
    """Where results go without --out: ``$XDG_CACHE_HOME/batchnorm/bench``
    (``~/.cache/batchnorm/bench``), never the current folder."""
    return cache_root() / "bench"


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        return None


def load_warning() -> str | None:
    """A sentence when the machine is busy (1-minute load average above BUSY_LOAD of the
    cores), else None. Asked before the run: during it, the benchmark is the load."""
    load, cores = _load_average(), os.cpu_count() or 1
    if load is None or load <= BUSY_LOAD * cores:
        return None
    return (
        f"the load average is {load:.1f} on {cores} cores: other processes compete for the "
        f"CPU, so the timings are not reliable. Rerun on a quiet machine."
    )


if __name__ == "__main__":
    raise SystemExit(main())
