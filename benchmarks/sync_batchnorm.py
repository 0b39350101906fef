"""SyncBatchNorm benchmark: communication per layer per step, ours vs torch.nn.SyncBatchNorm's
protocol (computed from the protocols), and the measured step-time overhead of sync vs local
batch norm on 2 gloo processes on this machine.

    python benchmarks/sync_batchnorm.py [--quick]

writes benchmarks/results/sync_batchnorm.json; ``run(quick)`` returns the same dict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

import batchnorm
from batchnorm import distributed
from batchnorm.lab.timing import time_interleaved

RESULTS = Path(__file__).resolve().parent / "results" / "sync_batchnorm.json"
WORLD_SIZES = (2, 8, 64)
#: Channel counts for the byte table: the article's MLP (128) and a wide conv layer (1024).
CHANNELS = (128, 1024)


def torch_protocol_bytes(num_features: int, world_size: int, dtype: torch.dtype) -> dict:
    """torch.nn.SyncBatchNorm (torch/nn/modules/_functions.py): forward all-gathers
    [mean, invstd, count] (2C + 1 values) from every rank, backward all-reduces
    [Σdy, Σdy·(x − mean)] (2C values), both in the statistics' dtype."""
    size = torch.finfo(batchnorm.reference.compute_dtype(dtype)).bits // 8
    return {"forward": world_size * (2 * num_features + 1) * size,
            "backward": 2 * num_features * size}  # fmt: skip


def bytes_per_layer_per_step(
    num_features: int, world_size: int, dtype: torch.dtype = torch.float32
) -> dict:
    """Bytes per SyncBatchNorm layer per training step, for ours and torch's protocol.

    ``payload``: the collective buffers one rank holds (message in, result out of the same
    size for all_reduce; W messages for all_gather). ``sent``: what one rank sends with ring
    algorithms, 2(W − 1)/W of the buffer for all_reduce and (W − 1) messages for
    all_gather (the usual cost model of gloo and NCCL)."""
    ours = distributed.sync_message_bytes(num_features, dtype)
    theirs = torch_protocol_bytes(num_features, world_size, dtype)
    ring = 2 * (world_size - 1) / world_size
    return {
        "num_features": num_features,
        "world_size": world_size,
        "dtype": str(dtype).removeprefix("torch."),
        "ours_payload": ours["forward"] + ours["backward"],
        "torch_payload": theirs["forward"] + theirs["backward"],
        "ours_sent": round(ring * (ours["forward"] + ours["backward"])),
        "torch_sent": round(
            theirs["forward"] * (world_size - 1) / world_size + ring * theirs["backward"]
        ),
    }


# ---------------------------------------------------------------------------------------
# Step time, sync vs local, in 2 gloo processes


def _workloads() -> dict:
    """name -> (model factory, per-rank input shape)."""

    def mlp() -> nn.Module:  # the article's model
        return nn.Sequential(
            nn.Linear(40, 128), nn.ReLU(), batchnorm.BatchNorm1d(128), nn.Linear(128, 10)
        )

    def conv() -> nn.Module:
        return nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), batchnorm.BatchNorm2d(64))

    return {"article_mlp_b128": (mlp, (128, 40)), "conv_bn2d_16x64x32x32": (conv, (16, 16, 32, 32))}


def _steps(model: nn.Module, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()


def _step_time_worker(rounds: int, steps: int) -> dict:
    """Per workload: the median step time (forward + backward) of local BN and of
    SyncBatchNorm, measured in alternating rounds so that load changes hit both alike; and
    the median latency of one all_reduce of a forward message (C = 128), for context."""
    ctx = distributed.init_from_env(timeout_s=120)
    message = torch.zeros(2 * 128 + 1, dtype=torch.float64)  # the MLP layer's forward message
    all_reduce = partial(torch.distributed.all_reduce, message)
    latencies = time_interleaved({"all_reduce": all_reduce}, reps=rounds * steps, warmup=0)
    latency_ms = statistics.median(latencies["all_reduce"]) * 1e3
    results: dict = {"all_reduce_latency_ms": round(latency_ms, 4)}
    for name, (factory, shape) in _workloads().items():
        torch.manual_seed(0)
        local = factory()
        synced = batchnorm.convert_sync_batchnorm(factory())
        x = torch.randn(shape, generator=torch.Generator().manual_seed(ctx.rank))
        for model in (local, synced):  # warm-up (first collectives connect, caches fill)
            _steps(model, x, 3)
        runs = {
            "local": partial(_steps, local, x, steps),
            "sync": partial(_steps, synced, x, steps),
        }
        times = time_interleaved(runs, reps=rounds, warmup=0)
        local_ms = statistics.median(times["local"]) / steps * 1e3
        sync_ms = statistics.median(times["sync"]) / steps * 1e3
        results[name] = {
            "input_shape_per_rank": list(shape),
            "local_ms": round(local_ms, 4),
            "sync_ms": round(sync_ms, 4),
            "overhead_ms": round(sync_ms - local_ms, 4),
            "overhead_percent": round(100 * (sync_ms - local_ms) / local_ms, 1),
        }
    return results


def run(quick: bool = False) -> dict:
    """Run the benchmark, write benchmarks/results/sync_batchnorm.json, return its dict."""
    rounds, steps = (5, 10) if quick else (15, 20)
    started = time.time()
    per_rank = distributed.launch(_step_time_worker, 2, (rounds, steps), timeout_s=600)
    result = {
        "benchmark": "sync_batchnorm",
        "quick": quick,
        "bytes_per_layer_per_step": [
            bytes_per_layer_per_step(c, w) for c in CHANNELS for w in WORLD_SIZES
        ],
        "step_time_2_gloo_processes": per_rank[0],
        "step_time_rank_1": per_rank[1],
        "method": (
            f"2 processes on 127.0.0.1 (gloo), 1 intra-op thread each; forward + backward "
            f"of the same model with local BatchNorm and with SyncBatchNorm; median over "
            f"{rounds} alternating rounds of {steps} steps, after 3 warm-up steps"
        ),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
