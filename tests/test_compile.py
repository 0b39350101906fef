"""torch.compile(fullgraph=True) runs models built with our modules, matching eager."""

import copy

import pytest
import torch
from torch import nn

import batchnorm


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo otherwise carries the shapes seen by earlier
    tests (same nn.Sequential.forward code object) into automatic dynamic shapes."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _nets():
    torch.manual_seed(0)

    def build(bn1, bn2):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3), bn1(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), bn2(16)
        )

    ours = build(batchnorm.BatchNorm2d, batchnorm.BatchNorm1d)
    theirs = build(nn.BatchNorm2d, nn.BatchNorm1d)
    theirs.load_state_dict(ours.state_dict())
    # float64, so that a compiled graph's reordered float32 sums cannot hide a real error.
    return ours.double(), theirs.double()


def test_compiled_conv_net_matches_torch_eager():
    ours, theirs = _nets()
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):
        y = compiled(x)
        y.square().sum().backward()
        expected = theirs(x)
        expected.square().sum().backward()
        torch.testing.assert_close(y, expected)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)
    for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    compiled.eval()
    theirs.eval()
    torch.testing.assert_close(compiled(x), theirs(x))


def test_compiled_variants_match_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        batchnorm.BatchRenorm2d(4, rmax=1.5, dmax=0.5),
        batchnorm.GhostBatchNorm2d(4, virtual_batch_size=3),
        batchnorm.FrozenBatchNorm2d(4, activation="silu"),
        batchnorm.InPlaceBatchNormAct2d(4, activation="elu"),
    ).double()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for step in range(2):
        x = torch.randn(8, 3, 6, 6, dtype=torch.float64) + step
        y = compiled(x)
        y.square().sum().backward()
        expected = eager(x)
        expected.square().sum().backward()
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)
    for a, b in zip(model.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
