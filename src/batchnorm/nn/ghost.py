"""Ghost Batch Normalization (Hoffer et al., 2017): statistics per virtual batch, computed by
the one functional core in one call on a view where each virtual batch is its own channel."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from batchnorm.functional import _batch_norm
from batchnorm.nn.base import (
    _BatchNormBase,
    _Dims1d,
    _Dims2d,
    _Dims3d,
    check_positive_int,
    full_signature,
)


@full_signature
class _GhostBatchNorm(_BatchNormBase):
    """Ghost Batch Normalization (Hoffer et al., 2017).

    In training the batch is cut into virtual batches of ``virtual_batch_size`` samples
    (the last one may be smaller) and each is normalized with its own statistics. The
    whole batch goes through the core in one call: the full virtual batches are laid side
    by side as extra channels, (G·V, C, *) -> (V, G·C, *), with the scale and shift repeated
    G times (a smaller last virtual batch takes a second call).

    Running statistics are updated once per forward with the average of the virtual
    batches' statistics, weighted by their sizes: running_mean moves towards the batch
    mean, running_var towards the mean of the per-virtual-batch (unbiased) variances —
    the population the layer normalizes with. Eval mode uses the running statistics
    (no virtual batches at inference). ``virtual_batch_size >= N`` is plain batch norm.
    """

    _script_trains = False  # a scripted copy runs in eval mode

    def __init__(
        self, num_features: int, virtual_batch_size: int, *args: Any, **kwargs: Any
    ) -> None:
        """``*args``/``**kwargs``: the parameters of ``BatchNormNd``, passed on (``eps``,
        ``momentum``, ``affine``, ``track_running_stats``, ``device``, ``dtype``; keyword-only
        ``bias``, ``unbiased_running_var``)."""
        virtual_batch_size = check_positive_int(
            type(self).__name__, "virtual_batch_size", virtual_batch_size
        )
        super().__init__(num_features, *args, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _forward(self, input: Tensor, residual: Tensor | None) -> Tensor:
        self._check_input_dim(input)
        momentum = self._momentum_factor()
        size, n = self.virtual_batch_size, input.shape[0]
        if not self.training or n <= size:
            return self._normalize(input, residual, momentum)
        full = n - n % size
        pieces = [(0, full, size)] + ([(full, n, n - full)] if full < n else [])
        outputs, running = [], []
        for start, stop, v in pieces:  # at most two calls: the full virtual batches, the rest
            y, stats = self._virtual_batches(input, residual, start, stop, v, momentum)
            outputs.append(y)
            running.append((stop - start, stats))
        if self.training and self.track_running_stats:
            with torch.no_grad():
                for buffer, index in ((self.running_mean, 0), (self.running_var, 1)):
                    buffer.copy_(sum(count * stats[index] for count, stats in running) / n)
        return torch.cat(outputs)

    def _virtual_batches(
        self, input: Tensor, residual: Tensor | None, start: int, stop: int, v: int, momentum: float
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Normalize samples [start, stop) as virtual batches of v samples, in one core call.
        Returns the output and the virtual batches' running statistics, averaged."""
        groups = (stop - start) // v
        rest = tuple(input.shape[2:])

        def side_by_side(t: Tensor) -> Tensor:  # (G·V, C, *) -> (V, G·C, *)
            t = t[start:stop].reshape(groups, v, self.num_features, *rest).transpose(0, 1)
            return t.reshape(v, groups * self.num_features, *rest)

        def repeat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat(groups)

        stats = None
        if self.track_running_stats:  # per-virtual-batch copies the core updates in place
            stats = (self.running_mean.repeat(groups), self.running_var.repeat(groups))
        y = _batch_norm(
            side_by_side(input), *(stats or (None, None)), repeat(self.weight),
            repeat(self.bias), True, momentum, self.eps, self.activation, self.negative_slope,
            None if residual is None else side_by_side(residual),
            where=f"{self.layer_name} (virtual batches of {v} samples)",
            unbiased_running_var=self.unbiased_running_var,
        )  # fmt: skip
        y = y.reshape(v, groups, self.num_features, *rest).transpose(0, 1)
        y = y.reshape(groups * v, self.num_features, *rest)
        if stats is None:
            return y, None
        mean, var = (s.view(groups, self.num_features).mean(0) for s in stats)
        return y, (mean, var)


class GhostBatchNorm1d(_Dims1d, _GhostBatchNorm):
    """``BatchNorm1d(*args, **kwargs)`` with Ghost Batch Normalization; see ``_GhostBatchNorm``."""


class GhostBatchNorm2d(_Dims2d, _GhostBatchNorm):
    """``BatchNorm2d(*args, **kwargs)`` with Ghost Batch Normalization; see ``_GhostBatchNorm``."""


class GhostBatchNorm3d(_Dims3d, _GhostBatchNorm):
    """``BatchNorm3d(*args, **kwargs)`` with Ghost Batch Normalization; see ``_GhostBatchNorm``."""
