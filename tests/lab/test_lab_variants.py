"""The pieces behind santurkar2018 and renorm2017: noisy BN, per-device BN, few-class
mini-batches, freezing after warm-up, the landscape probe, the CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab.data import Dataset
from batchnorm.lab.fit import fit
from batchnorm.lab.landscape import LossLandscape
from batchnorm.lab.models import copy_shared_weights, mnist1d_cnn
from batchnorm.lab.variants import FreezeAt, NoisyBatchNorm, PerDevice, few_class_order


def test_cnn_variants_share_their_weights():
    torch.manual_seed(0)
    base = mnist1d_cnn(40, 10)
    with_bn = mnist1d_cnn(40, 10, batchnorm.BatchNorm1d)
    assert copy_shared_weights(base, with_bn)  # BN entries only
    x = torch.randn(8, 40)
    assert base(x).shape == (8, 10)
    assert sum(isinstance(m, batchnorm.BatchNorm1d) for m in with_bn.modules()) == 5


def test_noisy_bn_moves_the_distribution_each_step_and_is_off_in_eval():
    torch.manual_seed(0)
    layer = NoisyBatchNorm(nn.BatchNorm1d(6), 0.5, 1.5, torch.Generator().manual_seed(1))
    x = torch.randn(64, 6, 10)
    a, b = layer(x), layer(x)
    means = a.mean((0, 2)), b.mean((0, 2))
    assert not torch.allclose(*means, atol=0.05)  # a new shift at every step
    assert means[0].abs().max() > 0.1  # non-zero mean
    assert means[0].abs().max() <= 0.5 + 1e-4
    layer.eval()
    torch.testing.assert_close(layer(x), layer.bn(x))
    with pytest.raises(ValueError, match="scale >= 1"):
        NoisyBatchNorm(nn.BatchNorm1d(6), 0.5, 0.5)


def test_per_device_normalizes_each_slice_and_keeps_the_first_device_statistics():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5) * 3 + 1
    wrapped = PerDevice(nn.BatchNorm1d(3), 4)
    reference = nn.BatchNorm1d(3)
    y = wrapped(x)
    expected = torch.cat(
        [nn.functional.batch_norm(c, None, None, training=True) for c in x.split(4)]
    )
    torch.testing.assert_close(y, expected)
    reference(x[:4])  # the running statistics: those of the first slice only
    torch.testing.assert_close(wrapped.layer.running_mean, reference.running_mean)
    torch.testing.assert_close(wrapped.layer.running_var, reference.running_var)
    assert int(wrapped.layer.num_batches_tracked) == 1
    y.sum().backward()  # the swapped buffers do not break autograd
    wrapped.eval()
    torch.testing.assert_close(wrapped(x), wrapped.layer(x))


def test_few_class_order_gives_batches_of_few_classes():
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500)]
    order = few_class_order(labels, 32, 2)(torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(500))  # a permutation
    batches = order[: 500 // 32 * 32].split(32)
    assert all(len(labels[batch].unique()) <= 2 for batch in batches)
    # The samples are mixed inside a batch: its first half is not one block (one class).
    two_classes = [batch for batch in batches if len(labels[batch].unique()) == 2]
    assert two_classes and all(len(labels[batch[:16]].unique()) == 2 for batch in two_classes)
    with pytest.raises(ValueError, match="multiple"):
        few_class_order(labels, 30, 4)


def _blob_data(n=256):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 40, generator=g) + y[:, None].float()
    return Dataset("blobs", x[:192], y[:192], x[192:], y[192:], 3)


def test_freeze_at_freezes_after_the_warm_up():
    torch.manual_seed(0)
    model = mnist1d_cnn(40, 3, batchnorm.BatchNorm1d)
    probe = FreezeAt(3)
    fit(model, torch.optim.SGD(model.parameters(), lr=0.05), _blob_data(), steps=6,
        batch_size=32, probes={"freeze": probe}, progress=False)  # fmt: skip
    frozen = [m for m in model.modules() if isinstance(m, batchnorm.FrozenBatchNorm1d)]
    assert len(frozen) == 5 and not any(
        isinstance(m, batchnorm.BatchNorm1d) for m in model.modules()
    )
    assert len(probe.result()["layers"]) == 5


def test_landscape_probe_measures_without_changing_the_training():
    data = _blob_data()

    def train(probes):
        torch.manual_seed(0)
        model = mnist1d_cnn(40, 3, batchnorm.BatchNorm1d)
        history = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), data, steps=8,
                      batch_size=32, probes=probes, progress=False)  # fmt: skip
        return model, history

    probe = LossLandscape([0.05, 0.1, 0.2], every=4)
    model, history = train({"landscape": probe})
    plain_model, plain = train({})
    assert history.step_loss == plain.step_loss  # weights and running statistics restored
    torch.testing.assert_close(model.state_dict(), plain_model.state_dict())
    result = history.probes["landscape"]
    assert result["steps"] == [0, 4]
    assert len(result["moved_losses"][0]) == 3 and len(result["gradient_changes"][0]) == 3
    assert all(b > 0 for b in result["beta_smoothness"])
    # A small step along -g lowers the loss of the very batch the gradient came from.
    assert result["moved_losses"][0][0] < result["loss"][0]
