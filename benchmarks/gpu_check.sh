#!/usr/bin/env bash
# The prepared GPU check, for a session that is lent a GPU. The device tool runs it in the
# repository root, on a machine with a CUDA build of torch, triton, numba, pytest and
# pytest-xdist installed and no network (nothing is installed here):
#
#   bash benchmarks/gpu_check.sh        # timeout_s ~420; results in $OUT
#
# 1. the CUDA parity suite: the Triton kernels at real layer sizes against float64
#    (tests/backends/test_triton_cuda.py), every CUDA backend forced against torch.nn,
#    autocast fp16/bf16, the layers and SyncBatchNorm (NCCL at world size 1, gloo over CUDA
#    tensors) on Triton -> $OUT/parity.txt;
# 2. the GPU benchmark (batchnorm.cli.bench_cuda) -> $OUT/cuda_bench.json, each part also
#    appended to $OUT/cuda_bench.jsonl as it is measured (kept if the time limit cuts the
#    run short). Commit them under benchmarks/results/;
# 3. SyncBatchNorm on the GPU (benchmarks/sync_batchnorm_cuda.py: parity, collective sizes,
#    step times; two ranks share the GPU over gloo) -> $OUT/sync_batchnorm_cuda.json.
# PARITY_S, BENCH_S and SYNC_S bound the three steps (seconds); the whole check took
# 200-240 s on an H200 (2026-12-04), the machine's start not included.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
start=$SECONDS
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', \
triton.__version__, 'numba', numba.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/device.txt"

timeout "${PARITY_S:-170}" python3 -m pytest -q -n 8 -p no:cacheprovider -rfE \
    tests/backends/test_triton_cuda.py tests/backends/test_cuda.py tests/test_autocast.py \
    > "$OUT/parity.txt" 2>&1
echo "parity: rc $? after $((SECONDS - start)) s" | tee -a "$OUT/device.txt"
tail -15 "$OUT/parity.txt"

timeout "${BENCH_S:-270}" python3 - <<'PY' 2>&1 | tail -8
import json, os
from batchnorm.cli import bench_cuda

out = os.environ.get("OUT", "/tmp/gpu-check")
with open(os.path.join(out, "cuda_bench.jsonl"), "w") as lines:
    def part(key, value):
        lines.write(json.dumps({key: value}) + "\n")
        lines.flush()
    results = bench_cuda.run("cuda", on_part=part)
with open(os.path.join(out, "cuda_bench.json"), "w") as f:
    json.dump(results, f, indent=1)
print("cases:", len(results["cases"]), "training step:", results["training_step"]["speedup_vs_torch"])
PY
echo "bench: done after $((SECONDS - start)) s" | tee -a "$OUT/device.txt"

timeout "${SYNC_S:-90}" python3 benchmarks/sync_batchnorm_cuda.py > "$OUT/sync_batchnorm_cuda.txt" 2>&1
echo "sync: rc $? after $((SECONDS - start)) s" | tee -a "$OUT/device.txt"
cp benchmarks/results/sync_batchnorm_cuda.json "$OUT/" 2>/dev/null
