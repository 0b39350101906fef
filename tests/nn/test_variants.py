"""Batch Renormalization, Ghost BN, FrozenBatchNorm, InPlace BN+activation, conventions."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.lab.memory import saved_tensor_bytes
from conftest import assert_close, random_input

F64 = torch.float64


def _randomize(module):
    with torch.no_grad():
        if module.weight is not None:
            module.weight.uniform_(0.5, 1.5)
        if module.bias is not None:
            module.bias.normal_()
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
    return module


def _grads(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


# ---------------------------------------------------------------------------------------
# Batch Renormalization


def test_paper_schedule():
    assert [batchnorm.paper_rmax(s) for s in (0, 5000, 22500, 40000, 10**6)] == [1, 1, 2, 3, 3]
    assert [batchnorm.paper_dmax(s) for s in (0, 5000, 15000, 25000, 10**6)] == [0, 0, 2.5, 5, 5]


def test_renorm_with_no_correction_room_is_batch_norm(backend):
    """rmax=1, dmax=0 forces r=1, d=0: exactly torch.nn.BatchNorm2d, grads and stats."""
    theirs = _randomize(nn.BatchNorm2d(4, dtype=F64))
    ours = batchnorm.BatchRenorm2d(4, rmax=1.0, dmax=0.0, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = random_input((6, 4, 3, 3), F64, seed=step, mean=2.0)
        dy = random_input((6, 4, 3, 3), F64, seed=10 + step)
        (y1, g1), (y2, g2) = _grads(ours, x, dy), _grads(theirs, x, dy)
        assert_close(y1, y2)
        for a, b in zip(g1, g2, strict=True):
            assert_close(a, b)
    assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked.item() == 3


def _renorm_oracle(x, w, b, running_mean, running_var, eps, rmax, dmax):
    """Algorithm 1 of Ioffe (2017) written out directly, r and d detached."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims)
    std = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(running_var + eps)
    r = (std / sigma).detach().clamp(1 / rmax, rmax)
    d = ((mean - running_mean) / sigma).detach().clamp(-dmax, dmax)
    xhat = (x - mean.view(shape)) / std.view(shape) * r.view(shape) + d.view(shape)
    return w.view(shape) * xhat + b.view(shape)


@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 5, 5)])
def test_renorm_matches_algorithm_1(backend, shape):
    dims = len(shape) - 2 or 1
    ours = _randomize(getattr(batchnorm, f"BatchRenorm{dims}d")(3, rmax=1.5, dmax=0.5, dtype=F64))
    x = random_input(shape, F64, seed=3, mean=1.0, std=2.0).requires_grad_()
    dy = random_input(shape, F64, seed=4)
    w = ours.weight.detach().clone().requires_grad_()
    b = ours.bias.detach().clone().requires_grad_()
    expected = _renorm_oracle(x, w, b, ours.running_mean.clone(), ours.running_var.clone(),
                              ours.eps, 1.5, 0.5)  # fmt: skip
    expected.backward(dy)
    y, (dx, dw, db) = _grads(ours, x, dy)
    assert_close(y, expected.detach())
    assert_close(dx, x.grad)
    assert_close(dw, w.grad)
    assert_close(db, b.grad)
    ours.eval()  # inference: running statistics, as plain BN
    theirs = nn.BatchNorm1d(3, dtype=F64) if len(shape) == 2 else nn.BatchNorm2d(3, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    assert_close(ours(x), theirs(x))


def test_renorm_schedule_follows_checkpointed_step():
    layer = batchnorm.BatchRenorm1d(3, rmax=batchnorm.paper_rmax, dmax=batchnorm.paper_dmax)
    layer.num_batches_tracked.fill_(22500)
    state = layer.state_dict()
    restored = batchnorm.BatchRenorm1d(3, rmax=batchnorm.paper_rmax, dmax=batchnorm.paper_dmax)
    restored.load_state_dict(state)
    assert restored.clip_bounds(int(restored.num_batches_tracked)) == (0.5, 2.0, 4.375)


def test_renorm_needs_running_stats():
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        batchnorm.BatchRenorm2d(3, track_running_stats=False)


# ---------------------------------------------------------------------------------------
# Ghost Batch Normalization


def test_ghost_with_large_virtual_batch_is_batch_norm(backend):
    theirs = _randomize(nn.BatchNorm2d(3, dtype=F64))
    ours = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=8, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    x, dy = random_input((8, 3, 4, 4), F64, seed=1), random_input((8, 3, 4, 4), F64, seed=2)
    (y1, g1), (y2, g2) = _grads(ours, x, dy), _grads(theirs, x, dy)
    assert_close(y1, y2)
    for a, b in zip(g1, g2, strict=True):
        assert_close(a, b)
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key].double(), value.double())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n,size", [(12, 4), (10, 4), (9, 2)])
def test_ghost_equals_batch_norm_per_chunk(backend, n, size, channels_last):
    ours = _randomize(batchnorm.GhostBatchNorm2d(3, virtual_batch_size=size, dtype=F64))
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    x = random_input((n, 3, 2, 3), F64, channels_last, seed=5, mean=1.0)
    dy = random_input((n, 3, 2, 3), F64, channels_last, seed=6)
    xr = x.detach().clone().requires_grad_()
    w = ours.weight.detach().clone().requires_grad_()
    b = ours.bias.detach().clone().requires_grad_()
    chunks = xr.split(size)
    expected = torch.cat([F.batch_norm(c, None, None, w, b, True) for c in chunks])
    expected.backward(dy)
    y, (dx, dw, db) = _grads(ours, x, dy)
    assert_close(y, expected.detach())
    assert_close(dx, xr.grad)
    assert_close(dw, w.grad)
    assert_close(db, b.grad)
    # The documented rule: one update with the size-weighted average of chunk statistics.
    sizes = torch.tensor([len(c) for c in chunks], dtype=F64)
    means = torch.stack([c.detach().mean((0, 2, 3)) for c in chunks])
    variances = torch.stack([c.detach().var((0, 2, 3), unbiased=True) for c in chunks])
    weights = (sizes / n).view(-1, 1)
    assert_close(ours.running_mean, 0.9 * rm + 0.1 * (weights * means).sum(0))
    assert_close(ours.running_var, 0.9 * rv + 0.1 * (weights * variances).sum(0))
    assert ours.num_batches_tracked.item() == 1


def test_ghost_eval_uses_running_statistics_not_virtual_batches():
    ours = _randomize(batchnorm.GhostBatchNorm1d(3, virtual_batch_size=2)).eval()
    theirs = nn.BatchNorm1d(3).eval()
    theirs.load_state_dict(ours.state_dict())
    x = random_input((10, 3), seed=3)
    assert_close(ours(x), theirs(x))


def test_ghost_gradcheck():
    layer = batchnorm.GhostBatchNorm1d(2, virtual_batch_size=3, dtype=F64)
    x = random_input((7, 2, 3), F64, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))


def test_ghost_rejects_bad_virtual_batch_size():
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int, got 0"):
        batchnorm.GhostBatchNorm1d(3, virtual_batch_size=0)


# ---------------------------------------------------------------------------------------
# FrozenBatchNorm


@pytest.mark.parametrize("activation", [None, "relu"])
def test_frozen_equals_eval_batch_norm_for_any_batch(backend, activation):
    theirs = _randomize(nn.BatchNorm2d(3))
    theirs.num_batches_tracked.fill_(7)
    frozen = batchnorm.FrozenBatchNorm2d(3, activation=activation)
    frozen.load_state_dict(theirs.state_dict())
    theirs.eval()
    assert list(frozen.parameters()) == []
    for n in (1, 5):
        x = random_input((n, 3, 4, 4), seed=n).requires_grad_()
        expected = theirs(x)
        expected = torch.relu(expected) if activation else expected
        frozen.train()  # frozen in train mode too
        y = frozen(x)
        assert_close(y, expected)
        (dx,) = torch.autograd.grad(y.sum(), x)
        (dx_expected,) = torch.autograd.grad(expected.sum(), x)
        assert_close(dx, dx_expected)
    assert_close(frozen.running_mean, theirs.running_mean)


def test_freeze_unfreeze_round_trip():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        batchnorm.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
        nn.BatchNorm1d(3, track_running_stats=False),
    )  # fmt: skip
    for m in (model[1], model[3]):
        _randomize(m)
    x = random_input((2, 3, 6, 6), seed=1)
    model.eval()
    expected = model(x)
    model.train()
    frozen, report = batchnorm.freeze(model)
    assert isinstance(frozen[1], batchnorm.FrozenBatchNorm2d)
    assert isinstance(frozen[3], batchnorm.FrozenBatchNorm2d)
    assert isinstance(frozen[6], nn.BatchNorm1d)  # no running statistics: kept
    assert report[0] == "1: BatchNorm2d -> FrozenBatchNorm2d"
    assert "6: kept BatchNorm1d" in report[2] and "track_running_stats=False" in report[2]
    frozen[6].eval()
    assert_close(frozen(x), expected)
    thawed, report = batchnorm.unfreeze(frozen)
    assert isinstance(thawed[1], batchnorm.BatchNorm2d) and thawed[1].training
    assert thawed[1].weight.requires_grad and thawed[1].num_batches_tracked.item() == 0
    assert len(report) == 2
    thawed.eval()
    assert_close(thawed(x), expected)


# ---------------------------------------------------------------------------------------
# InPlace BN + activation


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity"])
def test_inplace_equals_batch_norm_then_activation(backend, activation, training):
    theirs = _randomize(nn.BatchNorm2d(5, dtype=F64))
    with torch.no_grad():  # weak channels: gamma 0, tiny, and tiny next to a large beta
        theirs.weight[1] = 0.0
        theirs.weight[2] = 1e-9
        theirs.weight[3], theirs.bias[3] = 0.05, 20.0
    ours = batchnorm.InPlaceBatchNormAct2d(5, activation=activation, negative_slope=0.1,
                                           dtype=F64)  # fmt: skip
    ours.load_state_dict(theirs.state_dict())
    ours.train(training)
    theirs.train(training)
    act = {"leaky_relu": lambda t: F.leaky_relu(t, 0.1), "elu": F.elu, "identity": lambda t: t}
    for step in range(2):
        x = random_input((4, 5, 3, 3), F64, seed=step, mean=0.5)
        dy = random_input((4, 5, 3, 3), F64, seed=20 + step)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = ours(x1)
        y2 = act[activation](theirs(x2))
        y1.backward(dy)
        y2.backward(dy)
        assert_close(y1, y2)
        assert_close(x1.grad, x2.grad)
        assert_close(ours.weight.grad, theirs.weight.grad)
        assert_close(ours.bias.grad, theirs.bias.grad)
        ours.zero_grad()
        theirs.zero_grad()
    assert_close(ours.running_var, theirs.running_var)


def test_inplace_rejects_non_invertible():
    with pytest.raises(ValueError, match="'relu' cannot be inverted"):
        batchnorm.InPlaceBatchNormAct2d(3, activation="relu")
    with pytest.raises(ValueError, match="negative_slope > 0"):
        batchnorm.InPlaceBatchNormAct2d(3, activation="leaky_relu", negative_slope=0.0)


def _conv_stack(norm, blocks=8, channels=16):
    layers = [nn.Conv2d(3, channels, 3, padding=1)]
    for i in range(blocks):
        layers += norm(channels)
        if i < blocks - 1:
            layers.append(nn.Conv2d(channels, channels, 3, padding=1))
    return nn.Sequential(*layers)


def test_inplace_saves_at_least_40_percent_of_activation_memory():
    torch.manual_seed(0)
    theirs = _conv_stack(lambda c: [nn.BatchNorm2d(c), nn.LeakyReLU(0.01)])
    ours = _conv_stack(lambda c: [batchnorm.InPlaceBatchNormAct2d(c)])
    x = torch.randn(8, 3, 32, 32)
    kept_theirs = saved_tensor_bytes(lambda: theirs(x))
    kept_ours = saved_tensor_bytes(lambda: ours(x))
    saving = 1 - kept_ours / kept_theirs
    assert saving >= 0.40, f"saved {saving:.1%} ({kept_ours} vs {kept_theirs} bytes)"


# ---------------------------------------------------------------------------------------
# Conventions


def test_biased_running_variance_convention(backend):
    ours = batchnorm.BatchNorm1d(3, momentum=0.5, unbiased_running_var=False, dtype=F64)
    x = random_input((5, 3), F64, seed=2)
    ours(x)
    assert_close(ours.running_var, 0.5 + 0.5 * x.var(0, unbiased=False))
    assert "unbiased_running_var=False" in repr(ours)
