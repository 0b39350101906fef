"""Conventions of other frameworks: build our layers from Keras 3 ones.

Keras' ``BatchNormalization(momentum=m, epsilon=e)`` updates ``moving = m·moving +
(1 − m)·batch`` and stores the *biased* batch variance; torch's momentum is the factor of
the new value and its running variance is unbiased. So Keras' ``momentum=0.99`` is our
``momentum=0.01`` with ``unbiased_running_var=False``; epsilon carries over unchanged
(Keras' default 1e-3, torch's 1e-5).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from batchnorm.nn import dims_of_input, flavour


def from_keras(layer: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the equivalent module, weights and statistics included, from a Keras 3
    ``BatchNormalization`` layer (built, i.e. called once or ``build()``-ed).

    Returns a BatchNorm1d (inputs of rank 2 or 3), BatchNorm2d or BatchNorm3d — or the
    BatchRenorm flavour for ``renorm=True``, in the Keras convention
    (``renorm_momentum`` set) so that training gives Keras' results. Our layers take the
    channel in dimension 1: for Keras' channels-last inputs of rank > 2, permute them (or
    use ``memory_format=torch.channels_last``, which keeps the same bytes).
    Keras is imported by the caller, not here.
    """
    kind = type(layer).__name__
    if kind != "BatchNormalization" or not hasattr(layer, "moving_mean"):
        raise TypeError(
            f"from_keras: expected a keras.layers.BatchNormalization, got {kind}. "
            f"Hint: pass the layer object, e.g. model.layers[i]."
        )
    if layer.moving_mean is None:
        raise ValueError(
            "from_keras: the Keras layer is not built yet, so it has no weights. Hint: call "
            "it once on an input or call layer.build(input_shape)."
        )
    if getattr(layer, "synchronized", False):
        raise ValueError("from_keras: synchronized BatchNormalization: use SyncBatchNorm.")
    rank = _input_rank(layer)
    numpy = _numpy_of(layer)
    channels = numpy("moving_mean").shape[0]
    options: dict[str, Any] = {
        "eps": layer.epsilon,
        "momentum": 1.0 - layer.momentum,
        "affine": bool(layer.scale or layer.center),
        "dtype": dtype,
        "unbiased_running_var": False,
    }
    dims = dims_of_input(rank) or 1
    if layer.renorm:
        clipping = layer.renorm_clipping or {}
        options.update(
            rmax=_bound(clipping.get("rmax"), float("inf")),
            rmin=_bound(clipping.get("rmin"), 0.0),
            dmax=_bound(clipping.get("dmax"), float("inf")),
            renorm_momentum=1.0 - layer.renorm_momentum,
        )
    module = flavour("renorm" if layer.renorm else "batchnorm", dims)(channels, **options)
    state = {"running_mean": numpy("moving_mean"), "running_var": numpy("moving_variance")}
    if layer.renorm:
        state.update(renorm_mean=numpy("renorm_mean"), renorm_std=numpy("renorm_stddev"),
                     running_std=numpy("moving_stddev"))  # fmt: skip
    with torch.no_grad():
        for key, value in state.items():
            getattr(module, key).copy_(torch.from_numpy(value))
        if module.affine:
            module.weight.copy_(torch.from_numpy(numpy("gamma")) if layer.scale else 1.0)
            module.bias.copy_(torch.from_numpy(numpy("beta")) if layer.center else 0.0)
            module.weight.requires_grad_(bool(layer.scale))  # Keras: no gamma, fixed at 1
            module.bias.requires_grad_(bool(layer.center))
    return module


def _bound(value: float | None, unbounded: float) -> float:
    return unbounded if value is None else float(value)


def _input_rank(layer: Any) -> int:
    try:
        return len(layer.input.shape)
    except (AttributeError, ValueError):  # a layer built with build(), never called
        shape = getattr(layer, "_build_shapes_dict", None) or {}
        shapes = list(shape.values())
        return len(shapes[0]) if shapes else 2


def _numpy_of(layer: Any):
    def numpy(name: str) -> np.ndarray:
        variable = getattr(layer, name)
        value = variable.numpy() if hasattr(variable, "numpy") else np.asarray(variable)
        return np.array(value, dtype=np.float64)

    return numpy
