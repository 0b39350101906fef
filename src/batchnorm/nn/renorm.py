"""Batch Renormalization (Ioffe, 2017): batch statistics corrected towards the running ones
by r and d, passed to the one functional core as a scale and shift; the paper's schedules of
the clipping bounds."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from batchnorm import reference
from batchnorm.functional import check_inputs
from batchnorm.nn.base import _BatchNormBase, _Dims1d, _Dims2d, _Dims3d, full_signature

Bound = float | Callable[[int], float]


def _ramp(step: int, start: int, end: int) -> float:
    return min(max((step - start) / (end - start), 0.0), 1.0)


def paper_rmax(step: int) -> float:
    """rmax of Ioffe (2017), section 4: 1 for the first 5k steps, then linear to 3 at 40k."""
    return 1.0 + 2.0 * _ramp(step, 5_000, 40_000)


def paper_dmax(step: int) -> float:
    """dmax of Ioffe (2017), section 4: 0 for the first 5k steps, then linear to 5 at 25k."""
    return 5.0 * _ramp(step, 5_000, 25_000)


@full_signature
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

    _script_trains = False  # a scripted copy runs in eval mode

    def __init__(
        self,
        num_features: int,
        *args: Any,
        rmax: Bound = 3.0,
        dmax: Bound = 5.0,
        rmin: Bound | None = None,
        renorm_momentum: float | None = None,
        **kwargs: Any,
    ) -> None:
        """``*args``/``**kwargs``: the parameters of ``BatchNormNd``, passed on (``eps``,
        ``momentum``, ``affine``, ``track_running_stats``, ``device``, ``dtype``; keyword-only
        ``bias``, ``unbiased_running_var``)."""
        super().__init__(num_features, *args, **kwargs)
        if not self.track_running_stats:
            raise ValueError(
                f"{type(self).__name__}: batch renormalization corrects batch statistics towards "
                f"running ones, so it needs track_running_stats=True, got False. Hint: use "
                f"BatchNorm with track_running_stats=False for batch statistics only."
            )
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

    def _forward(self, input: Tensor, residual: Tensor | None) -> Tensor:
        self._check_input_dim(input)
        momentum = self._momentum_factor()
        if not self.training or input.numel() == 0:
            return self._normalize(input, residual, momentum)
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
    """``BatchNorm1d(*args, **kwargs)`` with Batch Renormalization; see ``_BatchRenorm``."""


class BatchRenorm2d(_Dims2d, _BatchRenorm):
    """``BatchNorm2d(*args, **kwargs)`` with Batch Renormalization; see ``_BatchRenorm``."""


class BatchRenorm3d(_Dims3d, _BatchRenorm):
    """``BatchNorm3d(*args, **kwargs)`` with Batch Renormalization; see ``_BatchRenorm``."""
