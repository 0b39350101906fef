"""batchnorm.convert swaps torch.nn BN for ours and back, keeping state and behaviour."""

import pytest
import torch
from torch import nn

import batchnorm
from conftest import random_input


def small_net(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5, momentum=None, bias=False),
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_keeps_outputs_state_and_modes(dtype):
    model = small_net(dtype)
    x = random_input((4, 3, 8, 8), dtype)
    model(x)  # move the running statistics
    model[3][1].eval()
    model[1].weight.requires_grad_(False)
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}
    reference_model = small_net(dtype)
    reference_model.load_state_dict(expected_state)
    reference_model[3][1].eval()

    converted = batchnorm.convert(model)
    kinds = [type(m) for m in converted.modules()]
    assert nn.BatchNorm2d not in kinds and nn.BatchNorm1d not in kinds
    assert kinds.count(batchnorm.BatchNorm2d) == 2 and kinds.count(batchnorm.BatchNorm1d) == 1
    assert converted[3][1].training is False and converted[1].training is True
    assert converted[1].weight.requires_grad is False
    assert converted[6].bias is None and converted[6].momentum is None
    assert all(p.dtype == dtype for p in converted.parameters())
    for key, value in expected_state.items():
        assert torch.equal(converted.state_dict()[key], value), key

    x2 = random_input((4, 3, 8, 8), dtype, seed=1)
    torch.testing.assert_close(converted(x2), reference_model(x2))
    back = batchnorm.convert(converted, to="torch")
    assert batchnorm.BatchNorm2d not in [type(m) for m in back.modules()]
    back.eval()
    reference_model.eval()
    torch.testing.assert_close(back(x2), reference_model(x2))


def test_root_module_is_converted():
    bn = nn.BatchNorm1d(3)
    ours = batchnorm.convert(bn)
    assert type(ours) is batchnorm.BatchNorm1d


def test_bad_target():
    with pytest.raises(ValueError, match="unknown target 'tf'"):
        batchnorm.convert(nn.BatchNorm1d(3), to="tf")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        batchnorm.convert("model")


def test_frozen_target_computes_eval_outputs():
    model = small_net()
    model(random_input((4, 3, 8, 8)))  # move the running statistics
    x = random_input((1, 3, 8, 8), seed=2)  # a single sample: fine once frozen
    model.eval()
    expected = model(x)
    model.train()
    frozen = batchnorm.convert(model, to="frozen")
    assert isinstance(frozen[1], batchnorm.FrozenBatchNorm2d)
    assert isinstance(frozen[6], batchnorm.FrozenBatchNorm1d)
    torch.testing.assert_close(frozen(x), expected)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_unfreeze_keeps_a_fused_activation_in_a_batch_norm_act(dims):
    shape = {1: (6, 3), 2: (4, 3, 2, 2), 3: (2, 3, 2, 2, 2)}[dims]
    act = getattr(batchnorm, f"BatchNormAct{dims}d")(3, activation="leaky_relu",
                                                     negative_slope=0.2)  # fmt: skip
    plain = getattr(batchnorm, f"BatchNorm{dims}d")(3)
    model = nn.Sequential(act, plain)
    model(random_input(shape))  # move the running statistics
    model.eval()
    x = random_input(shape, seed=1)
    expected = model(x)
    frozen, _ = batchnorm.freeze(model)
    assert frozen[0].activation == "leaky_relu" and frozen[1].activation is None
    thawed, report = batchnorm.unfreeze(frozen)
    assert type(thawed[0]) is type(act) and type(thawed[1]) is type(plain)
    assert (thawed[0].activation, thawed[0].negative_slope) == ("leaky_relu", 0.2)
    assert thawed[1].activation is None
    assert report[0] == f"0: FrozenBatchNorm{dims}d -> BatchNormAct{dims}d"
    assert set(thawed.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(thawed(x), expected)
