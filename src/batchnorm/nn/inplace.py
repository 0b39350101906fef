"""InPlace-ABN (Rota Bulò et al., 2018): batch norm + invertible activation that keeps only
its output for backward, with standard BN weights."""

from __future__ import annotations

from typing import Any

from batchnorm.functional import check_invertible
from batchnorm.nn.base import _BatchNormBase, _Dims1d, _Dims2d, _Dims3d, full_signature


@full_signature
class _InPlaceBatchNormAct(_BatchNormBase):
    """Batch norm + invertible activation (identity, leaky_relu, elu) that keeps only its
    output for backward and recovers the input from it (Rota Bulò et al., 2018).

    Unlike inplace_abn, the weights are standard BN weights (no |γ|+ε reparametrisation):
    a torch BN state_dict loads and gives the same outputs and gradients. Channels whose
    |γ| is below 1 % of max(|β|, 1), γ = 0 included, cannot be divided by; they keep their
    input (a small extra cost in the rare layers that have them). Under torch.compile the
    layer runs as ordinary BN + activation (same results, no memory saving).
    """

    _keep_output_only = True

    def __init__(
        self,
        num_features: int,
        *args: Any,
        activation: str = "leaky_relu",
        negative_slope: float = 0.01,
        **kwargs: Any,
    ) -> None:
        """``*args``/``**kwargs``: the parameters of ``BatchNormNd``, passed on (``eps``,
        ``momentum``, ``affine``, ``track_running_stats``, ``device``, ``dtype``; keyword-only
        ``bias``, ``unbiased_running_var``)."""
        check_invertible(activation, negative_slope, type(self).__name__)
        super().__init__(num_features, *args, **kwargs)
        self.activation, self.negative_slope = activation, negative_slope


class InPlaceBatchNormAct1d(_Dims1d, _InPlaceBatchNormAct):
    """InPlace-ABN on ``BatchNorm1d(*args, **kwargs)``; see ``_InPlaceBatchNormAct``."""


class InPlaceBatchNormAct2d(_Dims2d, _InPlaceBatchNormAct):
    """InPlace-ABN on ``BatchNorm2d(*args, **kwargs)``; see ``_InPlaceBatchNormAct``."""


class InPlaceBatchNormAct3d(_Dims3d, _InPlaceBatchNormAct):
    """InPlace-ABN on ``BatchNorm3d(*args, **kwargs)``; see ``_InPlaceBatchNormAct``."""
