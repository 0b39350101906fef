"""The drop-in layers: ``BatchNorm1d/2d/3d``, with the constructor, parameters, buffers and
state_dict of torch.nn's, and ``BatchNormAct1d/2d/3d``, the same fused with an activation."""

from __future__ import annotations

from typing import Any

from batchnorm.functional import check_activation
from batchnorm.nn.base import _BatchNormBase, _Dims1d, _Dims2d, _Dims3d, full_signature


class BatchNorm1d(_Dims1d, _BatchNormBase):
    """Drop-in ``torch.nn.BatchNorm1d`` for (N, C) or (N, C, L) inputs."""


class BatchNorm2d(_Dims2d, _BatchNormBase):
    """Drop-in ``torch.nn.BatchNorm2d`` for (N, C, H, W) inputs, contiguous or channels_last."""


class BatchNorm3d(_Dims3d, _BatchNormBase):
    """Drop-in ``torch.nn.BatchNorm3d`` for (N, C, D, H, W) inputs."""


@full_signature
class _BatchNormActBase(_BatchNormBase):
    """Batch norm followed by an activation, fused in one kernel: y = act(BN(x) [+ residual]).

    Parameters, buffers and state_dict are those of the plain layer, so a torch.nn
    BatchNorm checkpoint loads as is; ``forward(input, residual=None)`` adds an optional
    residual (same shape as the input) before the activation."""

    def __init__(
        self,
        num_features: int,
        *args: Any,
        activation: str | None = "relu",
        negative_slope: float = 0.01,
        **kwargs: Any,
    ) -> None:
        """``*args``/``**kwargs``: the parameters of ``BatchNormNd``, passed on (``eps``,
        ``momentum``, ``affine``, ``track_running_stats``, ``device``, ``dtype``; keyword-only
        ``bias``, ``unbiased_running_var``)."""
        options = activation_options(type(self).__name__, activation, negative_slope)
        super().__init__(num_features, *args, **kwargs)
        self.activation, self.negative_slope = options


def activation_options(layer: str, activation: str | None, negative_slope: float):
    """A fused layer's (activation, negative_slope), checked: None for no activation."""
    check_activation(activation, layer)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(
            f"{layer}: negative_slope must be a number (the slope of leaky_relu below "
            f"zero), got {type(negative_slope).__name__}."
        )
    return (None if activation == "identity" else activation), float(negative_slope)


class BatchNormAct1d(_Dims1d, _BatchNormActBase):
    """``BatchNorm1d(*args, **kwargs)`` fused with an activation: ``act(BN(x) [+ residual])``."""


class BatchNormAct2d(_Dims2d, _BatchNormActBase):
    """``BatchNorm2d(*args, **kwargs)`` fused with an activation: ``act(BN(x) [+ residual])``."""


class BatchNormAct3d(_Dims3d, _BatchNormActBase):
    """``BatchNorm3d(*args, **kwargs)`` fused with an activation: ``act(BN(x) [+ residual])``."""
