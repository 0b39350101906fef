"""BatchNormAct1d/2d/3d: torch's BatchNorm followed by torch's activation, in one layer."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from conftest import assert_close, random_input

ACTS = {
    "relu": torch.relu,
    "leaky_relu": lambda v: F.leaky_relu(v, 0.2),
    "silu": F.silu,
    "elu": F.elu,  # no kernel epilogue: the numba backend hands it to the reference
    None: lambda v: v,
}
KINDS = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}


@pytest.mark.parametrize("activation", list(ACTS), ids=[str(a) for a in ACTS])
@pytest.mark.parametrize("shape", [(16, 6), (4, 6, 5, 7), (2, 6, 3, 4, 5)], ids=KINDS.get)
def test_matches_torch_batchnorm_then_activation(backend, shape, activation):
    kind = KINDS[len(shape)]
    theirs = getattr(nn, f"BatchNorm{kind}")(6, momentum=0.2)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours = getattr(batchnorm, f"BatchNormAct{kind}")(
        6, momentum=0.2, activation=activation, negative_slope=0.2
    )
    ours.load_state_dict(theirs.state_dict())
    act = ACTS[activation]
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = random_input(shape, seed=len(shape), mean=1.0)
        z = random_input(shape, seed=9)
        x1, z1 = x.clone().requires_grad_(), z.clone().requires_grad_()
        x2, z2 = x.clone().requires_grad_(), z.clone().requires_grad_()
        dy = random_input(shape, seed=10)
        y1 = ours(x1, z1)
        y2 = act(theirs(x2) + z2)
        y1.backward(dy)
        y2.backward(dy)
        assert_close(y1, y2)
        pairs = [(x1.grad, x2.grad), (z1.grad, z2.grad), (ours.weight.grad, theirs.weight.grad),
                 (ours.bias.grad, theirs.bias.grad)]  # fmt: skip
        for a, b in pairs:
            assert_close(a, b)
        for key, value in theirs.state_dict().items():
            assert_close(ours.state_dict()[key].float(), value.float())
        ours.zero_grad()
        theirs.zero_grad()
    assert_close(ours(x), act(theirs(x)))  # no residual


def test_torch_checkpoint_loads_and_state_dict_keys_match():
    theirs = nn.BatchNorm2d(4)
    theirs(random_input((8, 4, 3, 3)))
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = batchnorm.BatchNormAct2d(4, activation="silu")
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    ours.eval()
    theirs.eval()
    x = random_input((2, 4, 3, 3), seed=1)
    assert_close(ours(x), F.silu(theirs(x)))
    assert "activation='silu'" in repr(ours)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)


def test_bad_activation_and_slope_are_clear_errors():
    with pytest.raises(ValueError, match="unknown activation 'gelu'.*relu"):
        batchnorm.BatchNormAct2d(4, activation="gelu")
    with pytest.raises(TypeError, match="negative_slope must be a number"):
        batchnorm.BatchNormAct1d(4, activation="leaky_relu", negative_slope="0.1")
    with pytest.raises(ValueError, match="expected a 4-D input"):
        batchnorm.BatchNormAct2d(4)(torch.zeros(2, 4))
