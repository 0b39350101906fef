"""repr tells our layers from torch.nn's: after convert, a printed model shows which are ours."""

import torch
from torch import nn

import batchnorm


def test_converted_layers_print_as_ours_and_torch_layers_as_torch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.BatchNorm1d(4))
    before = repr(model)
    assert "(1): BatchNorm2d(8, eps=1e-05" in before and "batchnorm." not in before
    text = repr(batchnorm.convert(model))
    assert "(1): batchnorm.BatchNorm2d(8, eps=1e-05, momentum=0.1" in text
    assert "(3): batchnorm.BatchNorm1d(4, eps=1e-05" in text
    assert "(0): Conv2d(3, 8" in text  # others unchanged
    assert repr(batchnorm.convert(model, to="torch")) == before


def test_every_layer_of_the_package_is_named_as_ours():
    layers = [
        batchnorm.BatchNorm3d(2),
        batchnorm.BatchNormAct2d(2, activation="relu"),
        batchnorm.GhostBatchNorm2d(2, virtual_batch_size=4),
        batchnorm.FrozenBatchNorm2d(2),
        batchnorm.SyncBatchNorm(2),
    ]
    for layer in layers:
        assert repr(layer).startswith(f"batchnorm.{type(layer).__name__}(2, eps="), repr(layer)


def test_a_users_subclass_keeps_its_own_name():
    class MyNorm(batchnorm.BatchNorm2d):
        pass

    assert repr(MyNorm(2)).startswith("MyNorm(2, eps=")
    assert torch.equal(MyNorm(2).eval()(torch.zeros(1, 2, 1, 1)), torch.zeros(1, 2, 1, 1))
