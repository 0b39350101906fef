"""CUDA: our layers on GPU tensors (reference path) match torch.nn on the same GPU.

These run where a GPU is present (the project's GPU check runs them on an H100/H200);
on CPU-only machines they are skipped — there is nothing to compare with there.
"""

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import ops
from conftest import assert_close, random_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


@pytest.mark.parametrize("dtype", list(CUDA_TOLERANCE), ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_torch(dtype, channels_last):
    device = "cuda"
    theirs = nn.BatchNorm2d(8, device=device, dtype=dtype)
    ours = batchnorm.BatchNorm2d(8, device=device, dtype=dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert ops.select_backend(torch.empty(1, 8, device=device, dtype=dtype)).name == "reference"
    for step in range(3):
        x = random_input((16, 8, 6, 5), dtype, channels_last, seed=step, mean=step).to(device)
        dy = random_input((16, 8, 6, 5), dtype, channels_last, seed=9 + step).to(device)
        results = []
        for module in (ours, theirs):
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.backward(dy)
            results.append([y, xi.grad, module.weight.grad.clone(), module.bias.grad.clone()])
            module.zero_grad()
        for a, b in zip(*results, strict=True):
            assert a.device.type == "cuda"
            assert_close(a.float(), b.float(), **CUDA_TOLERANCE[dtype])
    assert_close(ours.running_var.float(), theirs.running_var.float(), **CUDA_TOLERANCE[dtype])
    ours.eval()
    theirs.eval()
    x = random_input((4, 8, 6, 5), dtype, channels_last, seed=99).to(device)
    assert_close(ours(x).float(), theirs(x).float(), **CUDA_TOLERANCE[dtype])


def test_cuda_variants_and_compile():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        batchnorm.BatchNorm2d(8),
        batchnorm.BatchRenorm2d(8, rmax=1.5, dmax=0.5),
        batchnorm.GhostBatchNorm2d(8, virtual_batch_size=4),
        batchnorm.InPlaceBatchNormAct2d(8, activation="leaky_relu"),
    ).cuda()
    x = torch.randn(12, 3, 10, 10, device="cuda")
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert eager.device.type == "cuda" and torch.isfinite(eager).all()
