"""Drop-in batch-norm modules: the constructor, parameters, buffers and state_dict of
torch.nn.BatchNorm1d/2d/3d, running on :mod:`batchnorm.functional`.

They subclass ``torch.nn.modules.batchnorm._BatchNorm`` on purpose: tools across the
ecosystem (``torch.optim.swa_utils.update_bn``, fvcore, timm, detectron2) find batch-norm
layers with ``isinstance(m, _BatchNorm)``, and they keep working with ours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.functional import _batch_norm
from batchnorm.reference import ACTIVATIONS


class _BatchNormBase(_BatchNorm):
    """Shared body of every module in this package; subclasses set the accepted ranks."""

    #: Input ranks the layer accepts and how to describe them in an error.
    _ranks: tuple[int, ...] = ()
    _layout: str = ""
    #: The activation fused after the normalization (None: plain batch norm).
    activation: str | None = None
    negative_slope: float = 0.01

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
    ) -> None:
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive int (the number of "
                f"channels C of an (N, C, *) input), got {num_features!r}."
            )
        # `bias` reached torch's constructor only recently; handle it here for torch >= 2.3.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:
            del self.bias
            self.register_parameter("bias", None)

    @property
    def layer_name(self) -> str:
        """How error messages name this layer."""
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(
                f"{self.layer_name}: expected a torch.Tensor input, got {type(input).__name__}."
            )
        if input.dim() not in self._ranks:
            raise ValueError(
                f"{self.layer_name}: expected a {' or '.join(f'{r}-D' for r in self._ranks)} "
                f"input {self._layout}, got a {input.dim()}-D input of shape "
                f"{tuple(input.shape)}. Hint: {self._rank_hint(input.dim())}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self.layer_name}: expected {self.num_features} channels in dimension 1, got "
                f"input of shape {tuple(input.shape)} with {input.shape[1]}. Hint: set "
                f"num_features to the number of channels of the layer before."
            )

    def _rank_hint(self, rank: int) -> str:
        suggestion = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
        if rank in suggestion:
            return f"use {suggestion[rank]} for {rank}-D inputs."
        return "batch norm takes inputs of shape (N, C, *) with 2 to 5 dimensions."

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
        momentum = self._momentum_factor()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are read in eval mode and updated in training mode when tracked.
        track = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            where=self.layer_name,
        )


class BatchNorm1d(_BatchNormBase):
    """Drop-in ``torch.nn.BatchNorm1d`` for (N, C) or (N, C, L) inputs."""

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNormBase):
    """Drop-in ``torch.nn.BatchNorm2d`` for (N, C, H, W) inputs, contiguous or channels_last."""

    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchNorm3d(_BatchNormBase):
    """Drop-in ``torch.nn.BatchNorm3d`` for (N, C, D, H, W) inputs."""

    _ranks = (5,)
    _layout = "(N, C, D, H, W)"


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
        activation: str | None = "relu",
        negative_slope: float = 0.01,
    ) -> None:
        name = type(self).__name__
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(
                f"{name}: unknown activation {activation!r}; expected one of "
                f"{[a for a in ACTIVATIONS if a != 'identity']} or None (no activation)."
            )
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise TypeError(
                f"{name}: negative_slope must be a number (the slope of leaky_relu below "
                f"zero), got {type(negative_slope).__name__}."
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)  # fmt: skip
        self.activation = None if activation == "identity" else activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            act += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + act


class BatchNormAct1d(_BatchNormActBase):
    """``BatchNorm1d`` fused with an activation (relu, leaky_relu or silu)."""

    _ranks = BatchNorm1d._ranks
    _layout = BatchNorm1d._layout


class BatchNormAct2d(_BatchNormActBase):
    """``BatchNorm2d`` fused with an activation (relu, leaky_relu or silu)."""

    _ranks = BatchNorm2d._ranks
    _layout = BatchNorm2d._layout


class BatchNormAct3d(_BatchNormActBase):
    """``BatchNorm3d`` fused with an activation (relu, leaky_relu or silu)."""

    _ranks = BatchNorm3d._ranks
    _layout = BatchNorm3d._layout
