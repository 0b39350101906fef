"""Frozen batch norm: a fixed affine transform from buffers, the one functional core in eval
mode, for any batch size (as torchvision's FrozenBatchNorm2d)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.functional import _batch_norm, check_activation
from batchnorm.nn.base import (
    _BatchNormBase,
    _Dims1d,
    _Dims2d,
    _Dims3d,
    check_layer_input,
    check_positive_int,
)
from batchnorm.nn.tracing import GraphFriendly, script_batch_norm, script_check_rank


class _FrozenBatchNorm(GraphFriendly, nn.Module):
    """Batch norm frozen into a fixed affine transform (as torchvision's FrozenBatchNorm2d).

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers: nothing is
    trained or updated, in train mode as in eval mode, and any batch size works (N=1
    included). A state_dict of a torch.nn / batchnorm BN loads (``num_batches_tracked``
    is ignored). An optional fused ``activation`` follows, as in BatchNormAct.
    """

    _ranks: tuple[int, ...] = ()
    _layout: str = ""
    __constants__ = ["num_features", "eps", "activation", "negative_slope", "_ranks"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        num_features = check_positive_int(type(self).__name__, "num_features", num_features)
        check_activation(activation, type(self).__name__)
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps = num_features, eps
        self.activation, self.negative_slope = activation, negative_slope
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @torch.jit.unused
    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    _get_name = _BatchNormBase._get_name  # batchnorm.FrozenBatchNorm2d in repr

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        if self.activation not in (None, "identity"):
            text += f", activation={self.activation!r}"
        return text

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a trained BN's step counter
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _forward(self, input: Tensor, residual: Tensor | None) -> Tensor:
        check_layer_input(self.layer_name, input, self._ranks, self._layout, self.num_features)
        return _batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
            self.eps, self.activation, self.negative_slope, residual, where=self.layer_name,
            layer_checked=True,
        )  # fmt: skip

    def _forward_script(self, input: Tensor, residual: Tensor | None) -> Tensor:
        script_check_rank(input.dim(), list(self._ranks))
        return script_batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
            self.eps, self.activation, self.negative_slope, residual, True,
        )  # fmt: skip


class FrozenBatchNorm1d(_Dims1d, _FrozenBatchNorm):
    """Frozen batch norm for (N, C) or (N, C, L) inputs; see ``_FrozenBatchNorm``."""


class FrozenBatchNorm2d(_Dims2d, _FrozenBatchNorm):
    """Frozen batch norm for (N, C, H, W) inputs; see ``_FrozenBatchNorm``."""


class FrozenBatchNorm3d(_Dims3d, _FrozenBatchNorm):
    """Frozen batch norm for (N, C, D, H, W) inputs; see ``_FrozenBatchNorm``."""
