"""The Triton kernels compiled for a GPU, on inputs of real layer sizes, against reference.py
in float64 (CUDA only: skipped on machines without a GPU, where
tests/backends/test_triton_interpreter.py runs the same checks in Triton's interpreter on
tiny inputs). The project's GPU check (benchmarks/gpu_check.sh) runs this file.

The shapes reach what the interpreter's cannot: the default tiles (2048 values), many
pieces per channel and the merge of their partial sums, grids of thousands of programs,
and a 100-million-value input.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import batchnorm
from backends.triton_parity import SLOPE, check, f64, make, params, run_and_compare
from batchnorm import distributed, ops, reference
from conftest import random_input

# Compiled Triton kernels need a GPU; on CPU-only machines (CI) the same checks run in the
# interpreter (test_triton_interpreter.py), and benchmarks/gpu_check.sh runs this file.
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
if torch.cuda.is_available():
    from batchnorm.backends.triton import TritonBackend

    DEFAULT = TritonBackend()
    #: Tiny tiles on a compiled GPU: every block boundary, and grids of many pieces.
    SMALL = TritonBackend(tile_values=64, block_channels=4, tiles_per_piece=3,
                          merge_block_pieces=2, merge_block_channels=4)  # fmt: skip

CL, CL3 = torch.channels_last, torch.channels_last_3d
#: name: (shape, memory format). "odd": no size a multiple of a block or of 16.
LAYOUTS = {
    "nchw": ((32, 64, 28, 28), None),
    "nchw-odd": ((7, 37, 13, 11), None),
    "nchw-7x7": ((64, 512, 7, 7), None),
    "ncl": ((64, 32, 100), None),
    "ncdhw": ((4, 16, 6, 10, 10), None),
    "nhwc": ((32, 64, 28, 28), CL),
    "nhwc-odd": ((7, 37, 13, 11), CL),
    "ndhwc": ((4, 16, 6, 10, 10), CL3),
    "nc": ((4096, 512), None),
    "nc-odd": ((1001, 77), None),
}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def cuda(layout, dtype, seed=0, mean=0.0):
    return make(*LAYOUTS[layout], dtype, seed=seed, mean=mean, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_and_dtypes(layout, dtype):
    """Every layout and dtype, with the full epilogue (affine + residual + silu)."""
    x = cuda(layout, dtype, mean=1.0)
    weight, bias = params(x.shape[1], dtype, device="cuda")
    run_and_compare(DEFAULT, x, weight, bias, cuda(layout, dtype, seed=3), "silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_activations(activation, layout, dtype):
    x = cuda(layout, dtype, seed=4)
    weight, bias = params(x.shape[1], dtype, device="cuda")
    run_and_compare(DEFAULT, x, weight, bias, cuda(layout, dtype, seed=5), activation)


@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_epilogue_options(residual, affine):
    x = cuda("nhwc-odd", torch.float32, seed=6)
    weight, bias = params(x.shape[1], x.dtype, weight=affine == "weight", bias=affine == "bias",
                          device="cuda")  # fmt: skip
    z = cuda("nhwc-odd", torch.float32, seed=7) if residual else None
    run_and_compare(DEFAULT, x, weight, bias, z, "relu", need_dpre=residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw-odd", "nhwc-odd", "nc-odd", "ncdhw"])
def test_small_tiles(layout, dtype):
    """Tiny tiles compiled: partial tiles and channel blocks, Chan merges within and between
    pieces, several blocks of pieces in the merge kernels, at scale."""
    x = cuda(layout, dtype, seed=8, mean=2.0)
    weight, bias = params(x.shape[1], dtype, seed=2, device="cuda")
    run_and_compare(SMALL, x, weight, bias, cuda(layout, dtype, seed=9), "leaky_relu")


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
def test_large_mean_is_stable_in_float32(layout):
    """Mean 1e4, std about 1: the variance keeps its digits (E[x^2] - E[x]^2 would not)."""
    x = cuda(layout, torch.float32, seed=11, mean=1e4)
    _, mean, var, _ = DEFAULT.forward_train(x, None, None, None, 1e-5, "identity", SLOPE)
    m64, v64 = reference.batch_stats(f64(x))
    torch.testing.assert_close(var.double(), v64, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), m64, rtol=0, atol=2e-3)  # an ulp of 1e4


def test_a_hundred_million_values():
    """ResNet-50's stem at batch 128 ((128, 64, 112, 112), 103M values), channels last:
    offsets past 2**26, tens of thousands of rows per piece."""
    x = make((128, 64, 112, 112), CL, torch.bfloat16, seed=12, mean=3.0, device="cuda")
    weight, bias = params(64, torch.bfloat16, device="cuda")
    run_and_compare(DEFAULT, x, weight, bias, None, "relu", need_dpre=False)


@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_running_update_matches_reference(momentum):
    g = torch.Generator().manual_seed(15)
    mean, var, rm, rv = (torch.rand(300, generator=g).cuda() for _ in range(4))
    rm2, rv2 = rm.clone(), rv.clone()
    for count, unbiased in [(5, True), (5, False), (1, True), (0, True)]:
        DEFAULT.update_running_stats(rm, rv, mean, var, count, momentum, unbiased)
        reference.update_running_stats(rm2, rv2, mean, var, count, momentum, unbiased)
        check(rm, rm2.double(), torch.float32, "running_mean")
        check(rv, rv2.double(), torch.float32, "running_var")


# -- the layers on the Triton kernels ----------------------------------------------------

LAYERS = {
    "BatchNorm2d": lambda: batchnorm.BatchNorm2d(24),
    "BatchNormAct2d-relu-residual": lambda: batchnorm.BatchNormAct2d(24, activation="relu"),
    "InPlaceBatchNormAct2d": lambda: batchnorm.InPlaceBatchNormAct2d(24),
    "GhostBatchNorm2d": lambda: batchnorm.GhostBatchNorm2d(24, virtual_batch_size=8),
    "BatchRenorm2d": lambda: batchnorm.BatchRenorm2d(24, rmax=1.5, dmax=0.5),
    "FrozenBatchNorm2d": lambda: batchnorm.FrozenBatchNorm2d(24),
}


def _steps(layer, residual, channels_last, dtype):
    """Outputs, input gradients and parameter gradients of 2 training steps and one eval
    step on CUDA in ``dtype``, then the running statistics."""
    results = []
    for step in range(3):
        layer.train(step < 2)
        shape = (32, 24, 20, 20)
        x = random_input(shape, seed=step, mean=step + 1, channels_last=channels_last)
        x = x.to("cuda", dtype).requires_grad_()
        z = random_input(shape, seed=20 + step).to("cuda", dtype) if residual else None
        y = layer(x.clone() if isinstance(layer, batchnorm.InPlaceBatchNormAct2d) else x,
                  *([z] if residual else []))  # fmt: skip
        y.backward(random_input(shape, seed=40 + step).to("cuda", dtype))
        results += [y.detach(), x.grad]
        results += [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        layer.zero_grad()
    return results + [b.clone() for b in layer.buffers() if b.is_floating_point()]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", LAYERS)
def test_layers_on_triton_match_the_reference(name, channels_last):
    """Each layer with the Triton backend forced (the output-only backward of
    InPlaceBatchNormAct, ghost, renorm, frozen), against the same layer in float64 on the
    reference backend: no less accurate than the reference backend in float32 (their
    float32 sums of 12,800 values differ by about 1e-5 of the largest)."""
    residual = "residual" in name
    results = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32),
                           ("reference", torch.float64)):  # fmt: skip
        torch.manual_seed(0)
        layer = LAYERS[name]().to("cuda", dtype)
        with torch.no_grad():
            for p in layer.parameters():
                p.uniform_(0.5, 1.5)
        with ops.use_backend(backend):
            results[backend, dtype] = _steps(layer, residual, channels_last, dtype)
    triton, reference32, exact = results.values()
    for i, (ours, theirs, truth) in enumerate(zip(triton, reference32, exact, strict=True)):
        ours_error = (ours.double() - truth).abs().max().item()
        theirs_error = (theirs.double() - truth).abs().max().item()
        scale = truth.abs().max().item()
        assert ours_error <= 2 * theirs_error + 2e-6 * scale, (i, ours_error, theirs_error)


# -- SyncBatchNorm on CUDA tensors -------------------------------------------------------


def _sync_worker(backend_name: str, sizes: tuple[int, ...]) -> float:
    """One rank: SyncBatchNorm on CUDA with the Triton kernels against torch.nn's layer on
    the whole batch; returns the largest error of the output, the input and weight
    gradients and the running variance, relative to the largest value of each."""
    ctx = distributed.init_from_env(backend=backend_name)
    torch.cuda.set_device(0)  # one GPU: every rank on it (gloo copies through the host)
    start, count = sum(sizes[: ctx.rank]), sizes[ctx.rank]
    x_full = random_input((sum(sizes), 16, 9, 9), seed=1, mean=2.0).cuda()
    dy_full = random_input((sum(sizes), 16, 9, 9), seed=2).cuda()
    oracle = nn.BatchNorm2d(16).cuda()
    layer = batchnorm.SyncBatchNorm(16).cuda()
    layer.activation = "relu"
    x_ref = x_full.clone().requires_grad_()
    y_ref = oracle(x_ref).relu()
    y_ref.backward(dy_full)
    x = x_full[start : start + count].clone().requires_grad_()
    with ops.use_backend("triton"):
        y = layer(x)
        y.backward(dy_full[start : start + count])
    grad = layer.weight.grad.clone()
    dist.all_reduce(grad)
    rows = slice(start, start + count)
    pairs = [(y, y_ref[rows]), (x.grad, x_ref.grad[rows]), (grad, oracle.weight.grad),
             (layer.running_var, oracle.running_var)]  # fmt: skip
    assert ctx.device.type == ("cuda" if backend_name == "nccl" else "cpu")
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)


@pytest.mark.parametrize(("backend_name", "sizes"), [("nccl", (12,)), ("gloo", (5, 11))])
def test_sync_batchnorm_on_cuda(backend_name, sizes):
    """NCCL at world size 1 (NCCL refuses two ranks on one GPU) and the two-rank protocol
    over gloo with CUDA tensors, the local sums on the Triton kernels."""
    if backend_name == "nccl" and not dist.is_nccl_available():
        # an environment guard: CUDA builds of torch for Linux ship NCCL (the H200's does)
        pytest.skip("this torch build has no NCCL")
    errors = distributed.launch(_sync_worker, len(sizes), (backend_name, sizes), timeout_s=120)
    assert max(errors) < 2e-5, errors
