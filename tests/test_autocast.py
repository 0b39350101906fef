"""Mixed precision: under torch.autocast our layers behave as torch.nn's do.

A convolution under CPU autocast gives batch norm a bfloat16 input while the layer's
parameters and running statistics stay float32; the output keeps the input's dtype.
(CUDA autocast is tested in tests/backends/test_cuda.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm

LAYERS = {
    "BatchNorm2d": (nn.BatchNorm2d, batchnorm.BatchNorm2d, {}),
    "BatchNormAct2d": (nn.BatchNorm2d, batchnorm.BatchNormAct2d, {"activation": "relu"}),
}


def _pair(name, channels=8):
    torch_cls, our_cls, options = LAYERS[name]
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), torch_cls(channels))
    if options.get("activation") == "relu":
        theirs.append(nn.ReLU())
    ours = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), our_cls(channels, **options))
    ours.load_state_dict(theirs.state_dict(), strict=False)
    return ours, theirs


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (16, 3, 32, 32)])  # ATen's size and larger
@pytest.mark.parametrize("training", [True, False])
def test_cpu_autocast_bfloat16_matches_torch(name, shape, training):
    ours, theirs = _pair(name)
    ours.train(training), theirs.train(training)
    x = torch.randn(shape)
    outputs, grads = [], []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        outputs.append(y)
        grads.append(model[1].weight.grad)
    (y_ours, y_theirs), (g_ours, g_theirs) = outputs, grads
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    bn = ours[1]
    assert bn.weight.dtype == bn.running_mean.dtype == g_ours.dtype == torch.float32
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g_ours, g_theirs, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(bn.running_mean, theirs[1].running_mean, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(bn.running_var, theirs[1].running_var, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_with_float32_parameters_are_accurate(dtype):
    """Against the float64 oracle: no worse than rounding the exact result to the dtype."""
    x = (torch.randn(64, 16, 8, 8) * 3 + 1).to(dtype)
    layer = batchnorm.BatchNorm2d(16)
    y = layer(x)
    assert y.dtype == dtype and layer.running_mean.dtype == torch.float32
    exact = nn.functional.batch_norm(x.double(), None, None, training=True)
    rounding = (exact.to(dtype).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() <= 2 * rounding + 1e-3
