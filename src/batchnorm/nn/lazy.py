"""``LazyBatchNorm1d/2d/3d`` and ``LazyBatchNormAct1d/2d/3d``: the layers with
``num_features`` taken from the first input, as torch.nn.LazyBatchNorm*d.

Until then the parameters and running statistics are uninitialized (torch's
``UninitializedParameter``/``UninitializedBuffer``); the first forward materializes them
with the input's channel count, resets them, and turns the layer into its eager class
(``cls_to_become``: ``BatchNorm2d``, ``BatchNormAct2d``, ...), as torch.nn's lazy layers do.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from batchnorm.nn import batchnorm as eager
from batchnorm.nn.base import _BatchNormBase, bind_options, full_signature

_EAGER_INIT = inspect.signature(_BatchNormBase.__init__)
#: The eager class's constructor parameters without ``num_features``.
_LAZY_INIT = _EAGER_INIT.replace(
    parameters=[p for p in _EAGER_INIT.parameters.values() if p.name != "num_features"]
)


class _LazyBatchNorm(LazyModuleMixin, _BatchNormBase):
    """The lazy shell: built with one channel and no tensors, then given uninitialized ones
    (the arguments are the eager class's, without ``num_features``)."""

    cls_to_become: type[_BatchNormBase]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = bind_options(_LAZY_INIT, (self, *args), kwargs)
        affine, track_running_stats = options.pop("affine"), options.pop("track_running_stats")
        has_bias = options.pop("bias")
        factory = {"device": options["device"], "dtype": options["dtype"]}
        # affine and tracking off: no tensors are made that would be replaced at once
        super().__init__(1, affine=False, track_running_stats=False, **options)
        self.num_features = 0
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory)
            if has_bias:
                self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=factory["device"])

    __init__.__signature__ = _LAZY_INIT  # type: ignore[attr-defined]

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor, *args: Any, **kwargs: Any) -> None:
        """Called once, before the first forward (also with no tensor to materialize:
        affine=False and no running statistics)."""
        if self.num_features == 0:
            self.num_features = input.shape[1]
        if not self.has_uninitialized_params():  # none, or loaded from a state_dict
            return
        for tensor in (self.weight, self.bias, self.running_mean, self.running_var):
            if isinstance(tensor, (UninitializedParameter, UninitializedBuffer)):
                tensor.materialize((self.num_features,))
        self.reset_parameters()


class LazyBatchNorm1d(_LazyBatchNorm, eager.BatchNorm1d):
    """``BatchNorm1d`` with ``num_features`` from the first input (torch.nn.LazyBatchNorm1d)."""

    cls_to_become = eager.BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, eager.BatchNorm2d):
    """``BatchNorm2d`` with ``num_features`` from the first input (torch.nn.LazyBatchNorm2d)."""

    cls_to_become = eager.BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, eager.BatchNorm3d):
    """``BatchNorm3d`` with ``num_features`` from the first input (torch.nn.LazyBatchNorm3d)."""

    cls_to_become = eager.BatchNorm3d


@full_signature
class _LazyBatchNormAct(_LazyBatchNorm):
    """The lazy shell of the fused layers: the activation options, then the lazy ones."""

    def __init__(
        self,
        *args: Any,
        activation: str | None = "relu",
        negative_slope: float = 0.01,
        **kwargs: Any,
    ) -> None:
        options = eager.activation_options(type(self).__name__, activation, negative_slope)
        super().__init__(*args, **kwargs)
        self.activation, self.negative_slope = options


class LazyBatchNormAct1d(_LazyBatchNormAct, eager.BatchNormAct1d):
    """``BatchNormAct1d`` with ``num_features`` from the first input."""

    cls_to_become = eager.BatchNormAct1d


class LazyBatchNormAct2d(_LazyBatchNormAct, eager.BatchNormAct2d):
    """``BatchNormAct2d`` with ``num_features`` from the first input."""

    cls_to_become = eager.BatchNormAct2d


class LazyBatchNormAct3d(_LazyBatchNormAct, eager.BatchNormAct3d):
    """``BatchNormAct3d`` with ``num_features`` from the first input."""

    cls_to_become = eager.BatchNormAct3d
