"""The batch-norm variants users ask for, each a thin change of statistics on the one core.

* ``BatchRenorm{1,2,3}d`` — Batch Renormalization (Ioffe, 2017): batch statistics corrected
  towards the running ones by r and d, passed to the core as a scale and shift.
* ``GhostBatchNorm{1,2,3}d`` — Ghost BN (Hoffer et al., 2017): statistics per virtual batch,
  computed by the core in one call on a view where each virtual batch is its own channel.
* ``FrozenBatchNorm{1,2,3}d`` — a fixed affine transform from buffers: the core in eval mode.
* ``InPlaceBatchNormAct{1,2,3}d`` — BN + invertible activation that keeps only its output
  for backward (InPlace-ABN, Rota Bulò et al., 2018) with standard BN weights.

They live apart from :mod:`batchnorm.modules` (the drop-in layers) to keep both files short.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm import reference
from batchnorm.functional import _batch_norm, check_inputs, check_invertible
from batchnorm.modules import (
    _BatchNormBase,
    _Dims1d,
    _Dims2d,
    _Dims3d,
    check_activation,
    check_layer_input,
    check_positive_int,
)

Bound = float | Callable[[int], float]

# ---------------------------------------------------------------------------------------
# Batch Renormalization


def _ramp(step: int, start: int, end: int) -> float:
    return min(max((step - start) / (end - start), 0.0), 1.0)


def paper_rmax(step: int) -> float:
    """rmax of Ioffe (2017), section 4: 1 for the first 5k steps, then linear to 3 at 40k."""
    return 1.0 + 2.0 * _ramp(step, 5_000, 40_000)


def paper_dmax(step: int) -> float:
    """dmax of Ioffe (2017), section 4: 0 for the first 5k steps, then linear to 5 at 25k."""
    return 5.0 * _ramp(step, 5_000, 25_000)


class _BatchRenorm(_BatchNormBase):
    """Batch Renormalization (Ioffe, 2017, Algorithm 1).

    In training, with batch statistics (μ_B, σ_B) and reference statistics (μ, σ)::

        r = clip(σ_B / σ, rmin, rmax)        d = clip((μ_B − μ) / σ, −dmax, dmax)
        y = weight · (x̂_B · r + d) + bias    (r and d are constants in backward)

    which the core computes as batch norm with scale ``weight·r`` and shift
    ``weight·d + bias``. Inference uses the running statistics, as plain BN does.

    ``rmax``, ``dmax`` (and ``rmin``, default ``1/rmax``) are floats or functions of the
    training step (``num_batches_tracked`` before this step, so schedules checkpoint):
    ``rmax=paper_rmax, dmax=paper_dmax`` reproduces the paper's schedule.

    Two conventions for (μ, σ):

    * ``renorm_momentum=None`` (default): the running statistics themselves, σ =
      sqrt(running_var + eps), updated as in torch.nn — the state_dict is a BatchNorm one.
    * ``renorm_momentum=float``: Keras 3's ``BatchNormalization(renorm=True)`` exactly —
      separate buffers ``renorm_mean``/``renorm_std`` updated with ``renorm_momentum``
      (σ floored at sqrt(eps)), and inference statistics averaged as standard deviations
      (``running_std``; running_var = max(running_std² − eps, 0)). Momenta are factors of
      the new value: Keras' 0.99 is our 0.01. :func:`batchnorm.from_keras` sets this up.
    """

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
        rmax: Bound = 3.0,
        dmax: Bound = 5.0,
        rmin: Bound | None = None,
        renorm_momentum: float | None = None,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__}: batch renormalization corrects batch statistics towards "
                f"running ones, so it needs track_running_stats=True, got False. Hint: use "
                f"BatchNorm with track_running_stats=False for batch statistics only."
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        self.rmax, self.dmax, self.rmin = rmax, dmax, rmin
        if not any(callable(bound) for bound in (rmax, dmax, rmin)):
            self.clip_bounds(0)  # constant bounds are checked now, schedules at each step
        self.renorm_momentum = renorm_momentum
        if renorm_momentum is not None:
            self.register_buffer("renorm_mean", torch.zeros_like(self.running_mean))
            self.register_buffer("renorm_std", torch.ones_like(self.running_var))
            self.register_buffer("running_std", torch.ones_like(self.running_var))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "renorm_momentum", None) is not None:
            self.renorm_mean.zero_()
            self.renorm_std.fill_(1)
            self.running_std.fill_(1)

    def extra_repr(self) -> str:
        def name(bound: Any) -> str:
            return getattr(bound, "__name__", repr(bound))

        text = f"{super().extra_repr()}, rmax={name(self.rmax)}, dmax={name(self.dmax)}"
        if self.rmin is not None:
            text += f", rmin={name(self.rmin)}"
        if self.renorm_momentum is not None:
            text += f", renorm_momentum={self.renorm_momentum}"
        return text

    def clip_bounds(self, step: int) -> tuple[float, float, float]:
        """(rmin, rmax, dmax) at a training step."""

        def at(bound: Bound) -> float:
            return float(bound(step)) if callable(bound) else float(bound)

        rmax, dmax = at(self.rmax), at(self.dmax)
        if not rmax >= 1 or not dmax >= 0:  # also refuses NaN
            raise ValueError(
                f"{type(self).__name__}: batch renormalization clips r to [rmin, rmax] around "
                f"1 and d to [-dmax, dmax] around 0, so it needs rmax >= 1 and dmax >= 0; got "
                f"rmax={rmax}, dmax={dmax} at step {step}. Hint: rmax=1, dmax=0 is plain batch "
                f"norm; the paper's schedule is paper_rmax/paper_dmax."
            )
        rmin = 1.0 / rmax if self.rmin is None else at(self.rmin)
        if not 0 <= rmin <= 1:  # 0 (with rmax=inf): unclipped r, as Keras' renorm allows
            raise ValueError(
                f"{type(self).__name__}: rmin must be in [0, 1], got {rmin} at step {step}. "
                f"Hint: leave rmin=None for 1/rmax."
            )
        return rmin, rmax, dmax

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        momentum = self._momentum_factor()
        if not self.training or input.numel() == 0:
            return self._normalize(input, residual, momentum, self.weight, self.bias)
        check_inputs(input, None, None, None, None, residual, True, self.layer_name)
        scheduled = any(callable(bound) for bound in (self.rmax, self.dmax, self.rmin))
        # Reading the step costs a host sync (a graph break under torch.compile): only
        # schedules need it.
        rmin, rmax, dmax = self.clip_bounds(int(self.num_batches_tracked) - 1 if scheduled else 0)
        keras = self.renorm_momentum is not None
        with torch.no_grad():
            mean, var = reference.batch_stats(input)
            std = torch.sqrt(var + self.eps)
            if keras:
                ref_mean = self.renorm_mean.to(mean.dtype)
                ref_std = self.renorm_std.to(std.dtype).clamp(min=math.sqrt(self.eps))
            else:
                ref_mean = self.running_mean.to(mean.dtype)
                ref_std = torch.sqrt(self.running_var.to(std.dtype) + self.eps)
            r = (std / ref_std).clamp(rmin, rmax)
            d = ((mean - ref_mean) / ref_std).clamp(-dmax, dmax)
        scale = r if self.weight is None else self.weight * r
        shift = d if self.weight is None else self.weight * d
        shift = shift if self.bias is None else self.bias + shift
        if not keras:
            return self._normalize(input, residual, momentum, scale, shift)
        y = self._normalize(input, residual, momentum, scale, shift, None, None)
        self._update_keras_statistics(mean, std, momentum)
        return y

    @torch.no_grad()
    def _update_keras_statistics(self, mean: Tensor, std: Tensor, momentum: float) -> None:
        """Keras 3's renorm updates (new = old + factor * (batch − old))."""
        self.renorm_mean.lerp_(mean.to(self.renorm_mean.dtype), self.renorm_momentum)
        self.renorm_std.lerp_(std.to(self.renorm_std.dtype), self.renorm_momentum)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_std.lerp_(std.to(self.running_std.dtype), momentum)
        self.running_var.copy_((self.running_std.square() - self.eps).clamp(min=0))


class BatchRenorm1d(_Dims1d, _BatchRenorm):
    """Batch Renormalization for (N, C) or (N, C, L) inputs; see ``_BatchRenorm``."""


class BatchRenorm2d(_Dims2d, _BatchRenorm):
    """Batch Renormalization for (N, C, H, W) inputs; see ``_BatchRenorm``."""


class BatchRenorm3d(_Dims3d, _BatchRenorm):
    """Batch Renormalization for (N, C, D, H, W) inputs; see ``_BatchRenorm``."""


# ---------------------------------------------------------------------------------------
# Ghost Batch Normalization


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

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
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
        virtual_batch_size = check_positive_int(
            type(self).__name__, "virtual_batch_size", virtual_batch_size
        )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        momentum = self._momentum_factor()
        size, n = self.virtual_batch_size, input.shape[0]
        if not self.training or n <= size:
            return self._normalize(input, residual, momentum, self.weight, self.bias)
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
    """Ghost Batch Normalization for (N, C) or (N, C, L) inputs; see ``_GhostBatchNorm``."""


class GhostBatchNorm2d(_Dims2d, _GhostBatchNorm):
    """Ghost Batch Normalization for (N, C, H, W) inputs; see ``_GhostBatchNorm``."""


class GhostBatchNorm3d(_Dims3d, _GhostBatchNorm):
    """Ghost Batch Normalization for (N, C, D, H, W) inputs; see ``_GhostBatchNorm``."""


# ---------------------------------------------------------------------------------------
# Frozen Batch Normalization


class _FrozenBatchNorm(nn.Module):
    """Batch norm frozen into a fixed affine transform (as torchvision's FrozenBatchNorm2d).

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers: nothing is
    trained or updated, in train mode as in eval mode, and any batch size works (N=1
    included). A state_dict of a torch.nn / batchnorm BN loads (``num_batches_tracked``
    is ignored). An optional fused ``activation`` follows, as in BatchNormAct.
    """

    _ranks: tuple[int, ...] = ()
    _layout: str = ""

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
        check_activation(type(self).__name__, activation)
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps = num_features, eps
        self.activation, self.negative_slope = activation, negative_slope
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        if self.activation not in (None, "identity"):
            text += f", activation={self.activation!r}"
        return text

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a trained BN's step counter
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        check_layer_input(self.layer_name, input, self._ranks, self._layout, self.num_features)
        return _batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
            self.eps, self.activation, self.negative_slope, residual, where=self.layer_name,
        )  # fmt: skip


class FrozenBatchNorm1d(_Dims1d, _FrozenBatchNorm):
    """Frozen batch norm for (N, C) or (N, C, L) inputs; see ``_FrozenBatchNorm``."""


class FrozenBatchNorm2d(_Dims2d, _FrozenBatchNorm):
    """Frozen batch norm for (N, C, H, W) inputs; see ``_FrozenBatchNorm``."""


class FrozenBatchNorm3d(_Dims3d, _FrozenBatchNorm):
    """Frozen batch norm for (N, C, D, H, W) inputs; see ``_FrozenBatchNorm``."""


# ---------------------------------------------------------------------------------------
# InPlace-ABN: batch norm + invertible activation that keeps only its output


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
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
        activation: str = "leaky_relu",
        negative_slope: float = 0.01,
    ) -> None:
        check_invertible(activation, negative_slope, type(self).__name__)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        self.activation, self.negative_slope = activation, negative_slope


class InPlaceBatchNormAct1d(_Dims1d, _InPlaceBatchNormAct):
    """InPlace-ABN for (N, C) or (N, C, L) inputs; see ``_InPlaceBatchNormAct``."""


class InPlaceBatchNormAct2d(_Dims2d, _InPlaceBatchNormAct):
    """InPlace-ABN for (N, C, H, W) inputs; see ``_InPlaceBatchNormAct``."""


class InPlaceBatchNormAct3d(_Dims3d, _InPlaceBatchNormAct):
    """InPlace-ABN for (N, C, D, H, W) inputs; see ``_InPlaceBatchNormAct``."""
