"""Keras 3 parity (torch backend): from_keras, plain BN and renorm, over training steps."""

import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import batchnorm  # noqa: E402
from conftest import assert_close  # noqa: E402

KERAS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # the bound, float32 on both sides


def _keras_layer(seed, **options):
    layer = keras.layers.BatchNormalization(**options)
    layer.build((None, 6))
    rng = np.random.default_rng(seed)
    layer.gamma.assign(rng.uniform(0.5, 1.5, 6).astype("float32"))
    layer.beta.assign(rng.normal(size=6).astype("float32"))
    return layer


def _step(module, x, dy, **call):
    x = x.clone().requires_grad_()
    y = module(x, **call)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9, "epsilon": 1e-3},
        {
            "momentum": 0.8,
            "epsilon": 1e-3,
            "renorm": True,
            "renorm_momentum": 0.7,
            "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.3},
        },  # fmt: skip
        {"momentum": 0.99, "renorm": True},  # no clipping at all
    ],
    ids=["plain", "renorm", "renorm-unclipped"],
)
def test_from_keras_trains_like_keras(options):
    layer = _keras_layer(0, **options)
    ours = batchnorm.from_keras(layer)
    kind = batchnorm.BatchRenorm1d if options.get("renorm") else batchnorm.BatchNorm1d
    assert type(ours) is kind and ours.momentum == pytest.approx(1 - options["momentum"])
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(16, 6, generator=generator) * (1 + step) + step
        dy = torch.randn(16, 6, generator=generator)
        y_keras, dx_keras = _step(layer, x, dy, training=True)
        y_ours, dx_ours = _step(ours, x, dy)
        torch.testing.assert_close(y_ours, y_keras, **KERAS_TOLERANCE)
        torch.testing.assert_close(dx_ours, dx_keras, **KERAS_TOLERANCE)
        for ours_grad, keras_var in ((ours.weight.grad, layer.gamma), (ours.bias.grad, layer.beta)):
            torch.testing.assert_close(ours_grad, keras_var.value.grad, **KERAS_TOLERANCE)
            keras_var.value.grad = None
        ours.zero_grad()
        torch.testing.assert_close(ours.running_mean, layer.moving_mean.value.detach(),
                                   **KERAS_TOLERANCE)  # fmt: skip
        torch.testing.assert_close(ours.running_var, layer.moving_variance.value.detach(),
                                   **KERAS_TOLERANCE)  # fmt: skip
    ours.eval()
    x = torch.randn(5, 6, generator=generator)
    assert_close(ours(x), layer(x, training=False).detach(), **KERAS_TOLERANCE)


def test_from_keras_without_scale_keeps_gamma_fixed():
    layer = keras.layers.BatchNormalization(scale=False)
    layer.build((None, 3))
    ours = batchnorm.from_keras(layer)
    assert ours.unbiased_running_var is False and ours.eps == pytest.approx(1e-3)
    assert torch.equal(ours.weight, torch.ones(3)) and not ours.weight.requires_grad


def test_from_keras_errors():
    with pytest.raises(TypeError, match="expected a keras.layers.BatchNormalization, got Dense"):
        batchnorm.from_keras(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="not built yet"):
        batchnorm.from_keras(keras.layers.BatchNormalization())
