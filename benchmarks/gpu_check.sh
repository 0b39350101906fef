#!/usr/bin/env bash
# The prepared GPU check, for a session that is lent a GPU (the device tool runs it in the
# repository root; its machine has a CUDA build of torch and triton installed):
#
#   bash benchmarks/gpu_check.sh        # with a timeout of ~540 s; results in $OUT
#
# 1. installs what that machine lacks for the tests (never torch itself);
# 2. the CUDA parity suite: every CUDA backend forced (triton included) against torch.nn,
#    autocast fp16/bf16, variants and torch.compile on CUDA;
# 3. the GPU benchmark (batchnorm.cli.bench_cuda) -> $OUT/cuda_bench.json, to commit under
#    benchmarks/results/ with the parity report.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=src
python -m pip install --quiet numba pytest hypothesis expecttest 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/device.txt"
timeout 240 python -m pytest -q -p no:cacheprovider tests/backends/test_cuda.py \
    tests/test_autocast.py 2>&1 | tail -25 | tee "$OUT/parity.txt"
timeout 280 python - <<'PY' 2>&1 | tail -5
import json, os
from batchnorm.cli import bench_cuda
results = bench_cuda.run("cuda")
with open(os.path.join(os.environ.get("OUT", "/tmp/gpu-check"), "cuda_bench.json"), "w") as f:
    json.dump(results, f, indent=1)
print("cases:", len(results["cases"]), "training step:", results["training_step"]["speedup_vs_torch"])
PY
