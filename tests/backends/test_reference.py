"""The reference against closed forms and against torch.nn in float64."""

import torch
import torch.nn.functional as F

from batchnorm import reference
from conftest import assert_close, random_input


def test_batch_stats_closed_form():
    x = torch.tensor([[1.0, 10.0], [3.0, 14.0]], dtype=torch.float64)  # (N=2, C=2)
    mean, var = reference.batch_stats(x)
    assert mean.tolist() == [2.0, 12.0]
    assert var.tolist() == [1.0, 4.0]  # biased: sum of squares / M


def test_forward_matches_torch_float64():
    x = random_input((6, 3, 5), torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    mean, var = reference.batch_stats(x)
    y = reference.forward(x, mean, reference.invstd_of(var, 1e-5), w, b)
    assert_close(y, F.batch_norm(x, None, None, w, b, training=True))


def test_running_update_is_unbiased_ema():
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    reference.update_running_stats(rm, rv, torch.tensor([2.0]), torch.tensor([3.0]), 4, 0.25)
    assert rm.item() == 0.75 * 0 + 0.25 * 2.0
    assert rv.item() == 0.75 * 1 + 0.25 * 3.0 * 4 / 3


def test_backward_matches_autograd_float64():
    x = random_input((5, 3, 4), torch.float64).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 3, 4, dtype=torch.float64)
    for activation in reference.ACTIVATIONS:
        for training in (True, False):
            mean, var = reference.batch_stats(x) if training else (x.mean((0, 2)), x.var((0, 2)))
            mean, var = (mean, var) if training else (mean.detach(), var.detach())
            invstd = reference.invstd_of(var, 1e-5)
            y = reference.forward(x, mean, invstd, w, b, z, activation, 0.2)
            expected = torch.autograd.grad(y, (x, w, b, z), dy)
            with torch.no_grad():
                got = reference.backward(dy, x, mean, invstd, w, b, z, training, activation, 0.2)
            for g, e in zip(got, expected, strict=True):
                assert_close(g, e)
