"""Shared fixtures: backends to run every parity test through, tolerances, input makers."""

from __future__ import annotations

import pytest
import torch

from batchnorm import ops

# Tolerances of the parity tests (the core issue's acceptance criteria): float64 results
# agree to 1e-10, float32 to 1e-5 relative. "Relative" is taken element-wise and, through
# atol, to the tensor's largest magnitude: a per-channel sum such as dweight can cancel to
# a small value while its float32 rounding error scales with its terms.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


@pytest.fixture(params=ops.available_backends("cpu"))
def backend(request):
    """Run the test once per registered backend (a new backend is tested by registering
    it); calls a backend cannot compute go to the default dispatch."""
    with ops.use_backend(request.param, lenient=True):
        yield request.param


def assert_close(actual, expected, dtype=None, **overrides):
    dtype = dtype or expected.dtype
    tol = {**TOLERANCES.get(dtype, TOLERANCES[torch.float32])}
    if expected.numel():
        tol["atol"] *= max(1.0, expected.abs().max().item())
    tol.update(overrides)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


def random_input(shape, dtype=torch.float32, channels_last=False, seed=0, mean=0.0, std=1.0):
    """A batch whose channels have different means and scales, as real activations do."""
    g = torch.Generator().manual_seed(seed)
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    offsets = (torch.randn(channels, generator=g, dtype=torch.float64) + mean).view(view)
    scales = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).view(view) * std
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scales + offsets).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return x
