"""The rest of ``make bench`` (after ``batchnorm bench``, the CPU kernels): the demo's epoch
time per BN implementation, in-place BN+activation memory, folding latency, SyncBatchNorm
traffic and overhead, and float32 training accuracy against float64. Each part writes its
JSON under benchmarks/results/.

    python benchmarks/suite.py [--quick] [--only epoch memory fold sync accuracy]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))  # the benchmark modules beside this file

#: In-place memory benchmark: 8 Conv -> BN -> LeakyReLU blocks of 64 channels on a batch of
#: 32 images of 3x64x64 (the test uses a smaller stack; the ratio does not depend on size).
MEMORY_BLOCKS, MEMORY_CHANNELS, MEMORY_INPUT = 8, 64, (32, 3, 64, 64)


def epoch_time(quick: bool) -> dict:
    """Seconds per epoch of the demo's model: batchnorm.BatchNorm1d vs torch.nn's vs none.
    21 rounds of 3 epochs: an epoch is 40 steps of about 0.3 ms, and the median of 5 rounds
    moved by +-5 % with the host."""
    from batchnorm.lab.timing import epoch_seconds

    samples = {"epochs": 1, "repeats": 5} if quick else {"epochs": 3, "repeats": 21}
    return {"benchmark": "demo epoch time (s)", **epoch_seconds(**samples)}


def inplace_memory(quick: bool) -> dict:
    """Bytes autograd keeps for backward: torch.nn BN + LeakyReLU vs InPlaceBatchNormAct2d."""
    import batchnorm
    from batchnorm.lab.memory import saved_tensor_bytes

    def stack(norm) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(3, MEMORY_CHANNELS, 3, padding=1)]
        for block in range(MEMORY_BLOCKS):
            layers += norm(MEMORY_CHANNELS)
            if block < MEMORY_BLOCKS - 1:
                layers.append(nn.Conv2d(MEMORY_CHANNELS, MEMORY_CHANNELS, 3, padding=1))
        return nn.Sequential(*layers)

    torch.manual_seed(0)
    shape = (4, 3, 32, 32) if quick else MEMORY_INPUT
    x = torch.randn(shape)
    torch_bytes = saved_tensor_bytes(
        lambda: stack(lambda c: [nn.BatchNorm2d(c), nn.LeakyReLU(0.01)])(x)
    )
    ours_bytes = saved_tensor_bytes(
        lambda: stack(lambda c: [batchnorm.InPlaceBatchNormAct2d(c)])(x)
    )
    return {
        "benchmark": "activation memory kept for backward (saved_tensors_hooks, bytes)",
        "model": f"{MEMORY_BLOCKS} x (Conv2d -> BN -> LeakyReLU), {MEMORY_CHANNELS} channels",
        "input": list(shape),
        "torch_bn_leaky_relu": torch_bytes,
        "inplace_bn_act": ours_bytes,
        "saving": round(1 - ours_bytes / torch_bytes, 4),
    }


def fold(quick: bool) -> dict:
    import fold_bench

    return fold_bench.run(quick=quick, out_dir=None)


def accuracy(quick: bool) -> dict:
    import accuracy

    return accuracy.run(quick)


def sync(quick: bool) -> dict:
    import sync_batchnorm

    if quick:  # keep the committed full results
        sync_batchnorm.RESULTS = RESULTS / "sync_quick.json"
    return sync_batchnorm.run(quick)


PARTS = {"epoch": epoch_time, "memory": inplace_memory, "fold": fold, "sync": sync,
         "accuracy": accuracy}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--only", nargs="*", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        print(f"== {name}", flush=True)
        result = PARTS[name](args.quick)
        result["environment"] = {"torch": torch.__version__, "machine": platform.machine(),
                                 "threads": torch.get_num_threads()}  # fmt: skip
        files = {"epoch": "epoch_time", "memory": "inplace_memory", "fold": "fold",
                 "sync": "sync_batchnorm", "accuracy": "accuracy"}  # fmt: skip
        path = RESULTS / f"{files[name] if not args.quick else name + '_quick'}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        summary = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
        print(json.dumps(summary, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
