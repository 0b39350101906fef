"""LazyBatchNorm*d / LazyBatchNormAct*d against torch.nn.LazyBatchNorm*d, and
SyncBatchNorm.convert_sync_batchnorm (torch's classmethod idiom)."""

import pytest
import torch
from torch import nn

import batchnorm
from conftest import assert_close

SHAPES = {1: (8, 5, 3), 2: (4, 3, 5, 5), 3: (2, 3, 4, 4, 4)}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "options",
    [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False}, {"eps": 1e-3}],
)
def test_lazy_layers_match_torch(dims, options):
    ours = getattr(batchnorm, f"LazyBatchNorm{dims}d")(**options, dtype=torch.float64)
    theirs = getattr(nn, f"LazyBatchNorm{dims}d")(**options, dtype=torch.float64)
    x = torch.randn(SHAPES[dims], dtype=torch.float64)
    for step in range(2):
        assert_close(ours(x + step), theirs(x + step))
    assert type(ours) is getattr(batchnorm, f"BatchNorm{dims}d")  # the eager class now
    assert ours.num_features == theirs.num_features == x.shape[1]
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value)


def test_lazy_layer_loads_a_checkpoint_before_its_first_input():
    trained = nn.BatchNorm2d(3)
    trained(torch.randn(4, 3, 5, 5))
    lazy = batchnorm.LazyBatchNorm2d()
    lazy.load_state_dict(trained.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert_close(lazy.eval()(x), trained.eval()(x))


def test_lazy_fused_layer_keeps_its_activation():
    layer = batchnorm.LazyBatchNormAct2d(activation="silu")
    x = torch.randn(4, 6, 5, 5)
    y = layer(x)
    assert type(layer) is batchnorm.BatchNormAct2d and layer.activation == "silu"
    assert_close(y, nn.functional.silu(nn.functional.batch_norm(x, None, None, training=True)))


def test_sync_batchnorm_classmethod_converts_as_torch_scripts_call_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), batchnorm.BatchNormAct2d(4))
    converted = batchnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is type(converted[2]) is batchnorm.SyncBatchNorm
    assert converted[2].activation == "relu"
    reverted = batchnorm.revert_sync_batchnorm(converted)
    assert type(reverted[1]) is nn.BatchNorm2d and type(reverted[2]) is batchnorm.BatchNormAct2d
