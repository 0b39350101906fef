"""SyncBatchNorm on CUDA, for a machine with a GPU: correctness against torch.nn (float64, on
the CPU) on the concatenated batch, the collective sizes of ours and of
torch.nn.SyncBatchNorm as they happen, and step times of local BN, ours and torch's.

    python benchmarks/sync_batchnorm_cuda.py [--quick]

writes benchmarks/results/sync_batchnorm_cuda.json. With one GPU, two processes share it
and gloo carries the CUDA tensors (through host memory): NCCL refuses two ranks on one GPU,
so that attempt is only reported. With two GPUs the checks also run on NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import distributed
from batchnorm.lab.timing import time_interleaved

RESULTS = Path(__file__).resolve().parent / "results" / "sync_batchnorm_cuda.json"
#: The project's parity tolerances (tests/conftest.py), relative to the largest magnitude.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
#: (dtype, per-sample shape, local batch sizes of ranks 0 and 1, options)
CASES = [
    (torch.float64, (3, 4, 5), (3, 5), {}),
    (torch.float64, (4, 6), (0, 4), {"activation": "leaky_relu", "residual": True}),
    (torch.float32, (8,), (5, 3), {}),
    (torch.float32, (4, 50), (3, 5), {"mean": 1e4}),
]


def _close(actual, expected, dtype, extra=0.0):
    largest = expected.abs().max().item() if expected.numel() else 1.0
    tol = (TOLERANCE[dtype] + extra) * max(1.0, largest)
    torch.testing.assert_close(actual.cpu().to(expected.dtype), expected, rtol=0, atol=tol)


def _parity(rank, device, dtype, inner, sizes, activation=None, residual=False, mean=0.0):
    """Two training steps on this rank's rows vs float64 torch.nn on all rows."""
    channels, total = inner[0], sum(sizes)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    kind = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d}[len(inner)]
    oracle = kind(channels, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)  # the same weights on every rank
    with torch.no_grad():
        oracle.weight.uniform_(0.5, 1.5, generator=g), oracle.bias.normal_(generator=g)
    layer = batchnorm.SyncBatchNorm(channels, dtype=dtype, device=device)
    layer.load_state_dict(oracle.state_dict())
    layer.activation, layer.negative_slope = activation, 0.2
    # float32 centering of values near `mean` costs about eps32 * mean / std in every output.
    extra = 8 * abs(mean) * torch.finfo(torch.float32).eps if dtype == torch.float32 else 0.0
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        x_full, dy_full, r_full = (
            torch.randn(total, *inner, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)
        )
        x_full = (x_full.double() + mean).to(dtype)
        x = x_full[rows].to(device).requires_grad_()
        r = r_full[rows].to(device).requires_grad_() if residual else None
        y = layer(x, r)
        y.backward(dy_full[rows].to(device))
        x_ref = x_full.double().requires_grad_()
        r_ref = r_full.double().requires_grad_()
        y_ref = oracle(x_ref) + (r_ref if residual else 0)
        y_ref = F.leaky_relu(y_ref, 0.2) if activation == "leaky_relu" else y_ref
        y_ref.backward(dy_full.double())
        _close(y.detach(), y_ref.detach()[rows], dtype, extra)
        _close(x.grad, x_ref.grad[rows], dtype, extra)
        if residual:
            _close(r.grad, r_ref.grad[rows], dtype)
        for mine, theirs in ((layer.weight, oracle.weight), (layer.bias, oracle.bias)):
            grad = mine.grad.clone()
            dist.all_reduce(grad)  # local sums; DDP would reduce them
            _close(grad, theirs.grad, dtype, extra)
            mine.grad = theirs.grad = None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _close(getattr(layer, name), getattr(oracle, name), dtype)


def _collective_bytes(module_factory, device, channels):
    """Bytes per collective call of one training step of a fresh layer (2nd step)."""
    calls = []
    wrapped = {}
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
        original = getattr(dist, name)
        wrapped[name] = original

        def record(*args, _name=name, _original=original, **kwargs):
            tensors = args[0] if isinstance(args[0], list) else [args[0]]
            if _name == "all_gather":
                tensors = [args[1]] * len(args[0])  # what arrives: one message per rank
            calls.append((_name, sum(t.numel() * t.element_size() for t in tensors)))
            return _original(*args, **kwargs)

        setattr(dist, name, record)
    try:
        layer = module_factory(channels).to(device)
        x = torch.randn(4, channels, 3, device=device, requires_grad=True)
        layer(x).sum().backward()
        calls.clear()
        layer(x).sum().backward()
    finally:
        for name, original in wrapped.items():
            setattr(dist, name, original)
    return calls


def _synchronize(x):
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _steps(model, x, steps):
    _synchronize(x)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
    _synchronize(x)


def _step_ms(model, x, steps, rounds):
    times = time_interleaved({"steps": partial(_steps, model, x, steps)}, reps=rounds, warmup=0)
    return round(statistics.median(times["steps"]) / steps * 1e3, 4)


def _worker(backend, quick):
    gpus = torch.cuda.device_count()
    os.environ["LOCAL_RANK"] = str(int(os.environ["RANK"]) % max(gpus, 1))
    ctx = distributed.init_from_env(backend=backend, timeout_s=60)
    # Without a GPU (a dry run of this script) everything runs on the CPU.
    device = torch.device("cuda", ctx.local_rank) if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)  # fails here, at once, where the backend cannot run
    report = {"backend": backend, "device": torch.cuda.get_device_name(device) if gpus else "cpu"}
    for dtype, inner, sizes, options in CASES:
        name = f"{str(dtype)[6:]}_{'x'.join(map(str, inner))}_sizes_{sizes}_{options}"
        try:
            _parity(ctx.rank, device, dtype, inner, sizes, **options)
            report[name] = "ok"
        except Exception:
            report[name] = traceback.format_exc()
    channels = 64
    for label, factory in (("ours", batchnorm.SyncBatchNorm), ("torch", nn.SyncBatchNorm)):
        try:  # torch's runs on CUDA only
            report[f"bytes_{label}_C64"] = _collective_bytes(factory, device, channels)
        except Exception as err:
            report[f"bytes_{label}_C64"] = f"{type(err).__name__}: {err}"
    # Step time of one BN layer on a conv-sized activation (per rank).
    shape = (16, 128, 32, 32)
    x = torch.randn(shape, device=device, requires_grad=True)
    rounds, steps = (3, 10) if quick else (7, 20)
    models = {
        "local_torch_bn": nn.BatchNorm2d(128),
        "sync_ours": batchnorm.SyncBatchNorm(128),
        "sync_torch": nn.SyncBatchNorm(128),
    }
    timing = {}
    for label, model in models.items():
        try:
            model.to(device)
            _steps(model, x, 3)  # warm-up
            timing[label] = _step_ms(model, x, steps, rounds)
        except Exception as err:
            timing[label] = f"{type(err).__name__}: {err}"
    report["step_ms_bn2d_16x128x32x32"] = timing
    return report


def run(quick: bool = False) -> dict:
    gpus = torch.cuda.device_count()
    result = {"benchmark": "sync_batchnorm_cuda", "gpus": gpus, "torch": torch.__version__}
    for backend in ("gloo", "nccl") if gpus else ("gloo",):
        try:
            timeout = 240 if backend == "gloo" else 60
            ranks = distributed.launch(_worker, 2, (backend, quick), timeout_s=timeout)
            result[backend] = ranks
        except Exception as err:
            result[backend] = f"{type(err).__name__}: {str(err)[-1500:]}"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
