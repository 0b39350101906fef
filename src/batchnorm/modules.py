"""Drop-in batch-norm modules: the constructor, parameters, buffers and state_dict of
torch.nn.BatchNorm1d/2d/3d, running on :mod:`batchnorm.functional`.

They subclass ``torch.nn.modules.batchnorm._BatchNorm`` on purpose: tools across the
ecosystem (``torch.optim.swa_utils.update_bn``, fvcore, timm, detectron2) find batch-norm
layers with ``isinstance(m, _BatchNorm)``, and they keep working with ours.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.functional import InputError, _batch_norm
from batchnorm.reference import ACTIVATIONS


def check_positive_int(layer: str, name: str, value: Any, meaning: str = "") -> int:
    """Constructor arguments that count something (num_features, virtual_batch_size), as a
    Python int: any integer type is taken (numpy's too, as torch.nn takes them)."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else 0
    except TypeError:
        number = 0
    if number < 1:
        raise ValueError(f"{layer}: {name} must be a positive int{meaning}, got {value!r}.")
    return number


def check_activation(layer: str, activation: str | None) -> None:
    """A layer's fused activation: None or one of reference.ACTIVATIONS."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"{layer}: unknown activation {activation!r}; expected one of "
            f"{[a for a in ACTIVATIONS if a != 'identity']} or None (no activation)."
        )


def check_layer_input(
    layer: str, input: Tensor, ranks: tuple[int, ...] | None, layout: str, num_features: int
) -> None:
    """The rank and channel checks every layer makes, with messages naming the layer.
    ``ranks=None`` accepts any rank >= 2."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(input).__name__}.")
    if ranks is None and input.dim() < 2:
        raise ValueError(
            f"{layer}: expected an input of shape {layout} with at least 2 dimensions, got shape "
            f"{tuple(input.shape)}. Hint: a single sample needs a batch dimension, e.g. "
            f"input.unsqueeze(0)."
        )
    if ranks is not None and input.dim() not in ranks:
        suggestion = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
        hint = (
            f"use the {suggestion[input.dim()]} flavour for {input.dim()}-D inputs."
            if input.dim() in suggestion
            else "batch norm takes inputs of shape (N, C, *) with 2 to 5 dimensions."
        )
        raise ValueError(
            f"{layer}: expected a {' or '.join(f'{r}-D' for r in ranks)} input {layout}, got a "
            f"{input.dim()}-D input of shape {tuple(input.shape)}. Hint: {hint}"
        )
    if input.shape[1] != num_features:
        raise InputError(
            f"{layer}: expected {num_features} channels in dimension 1, got input of shape "
            f"{tuple(input.shape)} with {input.shape[1]}. Hint: set num_features to the number "
            f"of channels of the layer before."
        )


class _BatchNormBase(_BatchNorm):
    """Shared body of the trainable modules of this package.

    Subclasses set the accepted ranks; variants change only how the statistics (or the
    scale and shift given to the one functional core) are obtained in training.
    """

    #: Input ranks the layer accepts and how to describe them in an error.
    _ranks: tuple[int, ...] | None = ()
    _layout: str = ""
    #: The activation fused after the normalization (None: plain batch norm).
    activation: str | None = None
    negative_slope: float = 0.01
    #: Keep only the output for backward (InPlace-ABN); see InPlaceBatchNormAct2d.
    _keep_output_only: bool = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
        name, meaning = type(self).__name__, " (the number of channels C of an (N, C, *) input)"
        num_features = check_positive_int(name, "num_features", num_features, meaning)

        # `bias` reached torch's constructor only recently; handle it here for torch >= 2.3.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:
            del self.bias
            self.register_parameter("bias", None)
        self.unbiased_running_var = unbiased_running_var

    @property
    def layer_name(self) -> str:
        """How error messages name this layer."""
        return f"{type(self).__name__}({self.num_features})"

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation not in (None, "identity"):
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        if not self.unbiased_running_var:
            text += ", unbiased_running_var=False"
        return text

    def _check_input_dim(self, input: Tensor) -> None:
        check_layer_input(self.layer_name, input, self._ranks, self._layout, self.num_features)

    def _momentum_factor(self) -> float:
        """The running-average factor for this step; counts the step, as torch.nn does."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        return self._normalize(input, residual, self._momentum_factor(), self.weight, self.bias)

    def _normalize(
        self,
        input: Tensor,
        residual: Tensor | None,
        momentum: float,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None | bool = True,
        running_var: Tensor | None | bool = True,
    ) -> Tensor:
        """The functional core with this layer's options; running statistics default to the
        layer's own (``True``), read in eval mode and updated in training when tracked."""
        own_mean, own_var = self.running_mean, self.running_var  # buffers: read once
        track = not self.training or self.track_running_stats
        if running_mean is True:
            running_mean = own_mean if track else None
        if running_var is True:
            running_var = own_var if track else None
        use_batch_stats = self.training or (own_mean is None and own_var is None)
        return _batch_norm(
            input,
            running_mean,  # type: ignore[arg-type]
            running_var,  # type: ignore[arg-type]
            weight,
            bias,
            use_batch_stats,
            momentum,
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            where=self.layer_name,
            unbiased_running_var=self.unbiased_running_var,
            keep_output_only=self._keep_output_only,
        )


class _Dims1d:
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class _Dims2d:
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class _Dims3d:
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"


class BatchNorm1d(_Dims1d, _BatchNormBase):
    """Drop-in ``torch.nn.BatchNorm1d`` for (N, C) or (N, C, L) inputs."""


class BatchNorm2d(_Dims2d, _BatchNormBase):
    """Drop-in ``torch.nn.BatchNorm2d`` for (N, C, H, W) inputs, contiguous or channels_last."""


class BatchNorm3d(_Dims3d, _BatchNormBase):
    """Drop-in ``torch.nn.BatchNorm3d`` for (N, C, D, H, W) inputs."""


class _BatchNormActBase(_BatchNormBase):
    """Batch norm followed by an activation, fused in one kernel: y = act(BN(x) [+ residual]).

    Parameters, buffers and state_dict are those of the plain layer, so a torch.nn
    BatchNorm checkpoint loads as is; ``forward(input, residual=None)`` adds an optional
    residual (same shape as the input) before the activation."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
        activation: str | None = "relu",
        negative_slope: float = 0.01,
    ) -> None:
        name = type(self).__name__
        check_activation(name, activation)
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise TypeError(
                f"{name}: negative_slope must be a number (the slope of leaky_relu below "
                f"zero), got {type(negative_slope).__name__}."
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        self.activation = None if activation == "identity" else activation
        self.negative_slope = float(negative_slope)


class BatchNormAct1d(_Dims1d, _BatchNormActBase):
    """``BatchNorm1d`` fused with an activation: ``act(BN(x) [+ residual])``."""


class BatchNormAct2d(_Dims2d, _BatchNormActBase):
    """``BatchNorm2d`` fused with an activation: ``act(BN(x) [+ residual])``."""


class BatchNormAct3d(_Dims3d, _BatchNormActBase):
    """``BatchNorm3d`` fused with an activation: ``act(BN(x) [+ residual])``."""
