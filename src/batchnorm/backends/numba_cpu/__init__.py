"""The Numba backend: batch norm on CPU, float32/float64 and bfloat16/float16 (statistics
and parameters in float32, as under torch.autocast), NCHW-contiguous and channels-last.

Two memory layouts, each seen as a 3-D or 2-D array without copying:

* ``cf`` (channels first, torch's default contiguous layout) as ``(N, C, S)``: every (n, c)
  pair owns a contiguous row of S = prod(spatial) values;
* ``cl`` (channels last: ``channels_last``, ``channels_last_3d`` and plain ``(N, C)``) as
  ``(M, C)`` with M = N * S rows of C contiguous values.

Each layout has one forward kernel (training: statistics, then normalization; eval:
normalization with the given statistics) and one backward kernel (per-channel sums, then
dx). Both hold the fused epilogue ``y = act((x - mean) * invstd * weight + bias [+ z])``;
the backward recomputes that pre-activation from x (and z) instead of storing it, so a
fused BN+activation reads and writes as much memory as BN alone.

Statistics are stable and use every thread whatever C is: the reduction is split into
pieces of at most a few thousand values (a chunk of a row in ``cf``, a block of rows in
``cl``); each piece is read once, summed around one of its own values (x - x_0 and its
square), and the pieces' (count, mean, M2) are merged in float64 (the count-weighted mean,
then M2 = Σ M2_p + n_p (mean_p − mean)²). A channel with mean 1e4 and std 1 keeps its
digits in float32; an infinite value gives an infinite mean, as torch.

Layout: ``jit`` (what both layouts share), ``halves`` (loads and stores of each dtype),
``channels_first`` and ``channels_last`` (the kernels), and this module (the torch adapter,
the backend's rules).

The math is that of :mod:`batchnorm.reference`; the tests hold the two together.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from batchnorm import reference
from batchnorm.backends import Call
from batchnorm.backends.layout import dense_in_layout, like
from batchnorm.backends.numba_cpu.channels_first import cf_backward, cf_forward
from batchnorm.backends.numba_cpu.channels_last import cl_backward, cl_forward
from batchnorm.backends.numba_cpu.compilation import NOTICE as _COMPILE_NOTICE  # noqa: F401
from batchnorm.backends.numba_cpu.halves import COMPUTE, STORAGE
from batchnorm.backends.numba_cpu.jit import ACTIVATION_CODES, running_update

# The backend: torch tensors in, torch tensors out (see batchnorm.backends.KernelBackend).
# Small layers spend more time here than in the kernels, hence few torch calls.

#: Per dtype, an empty array whose type tells the running update the dtype of the addresses.
_LIKE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _like(t: Tensor, x: Tensor, layout: str) -> Tensor:
    """t with x's dtype, dense in x's layout (a copy only if it is not so)."""
    return like(t if t.dtype == x.dtype else t.detach().to(x.dtype), x, layout)


def _shape(x: Tensor, layout: str) -> tuple[int, ...]:
    """The kernel's shape of x: (N, C, S) for cf, (M, C) for cl."""
    channels = x.shape[1]
    if layout == "cf":
        return (x.shape[0], channels, x.numel() // max(x.shape[0] * channels, 1))
    return (x.numel() // max(channels, 1), channels)


class _Launch(NamedTuple):
    """What a kernel call needs to know of its input besides its address."""

    layout: str
    shape: tuple[int, ...]  # the kernel's (see _shape): channels at index 1 in both layouts
    storage: object  # the kernels' type arguments, see halves.py
    compute: object
    stats: torch.dtype  # the statistics' and parameters' dtype


#: The launch facts of recent dense inputs, by (shape, strides, dtype). Working them out
#: took a dozen torch calls per kernel call: between two convolutions, whose data has
#: evicted this code from the caches, that cost more than a small layer's kernel itself
#: (measured: (8, 128, 12, 12) channels-last training forward, 1 thread, after a cache
#: flush: the kernel 55 µs, the whole backend call 131 µs, ATen's 82 µs).
_LAUNCHES: dict[tuple, _Launch] = {}


def _dense_launch(x: Tensor) -> tuple[Tensor, _Launch]:
    """(x dense in its layout: x itself or a copy, the kernel's facts of it)."""
    key = (x.shape, x.stride(), x.dtype)
    launch = _LAUNCHES.get(key)
    if launch is not None:
        return x, launch
    layout, dense = dense_in_layout(x)
    shape = _shape(dense, layout)
    launch = _Launch(layout, shape, STORAGE[x.dtype], COMPUTE[x.dtype],
                     reference.compute_dtype(x.dtype))  # fmt: skip
    if dense is x:  # strides that need a copy are not kept: they are rare
        if len(_LAUNCHES) >= 256:
            _LAUNCHES.clear()
        _LAUNCHES[key] = launch
    return dense, launch


def _vector(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A per-channel vector as a contiguous one of ``dtype`` (a copy only if it is not so).

    The caller keeps the result in a local variable until the kernel has returned: a copy
    whose address alone were passed on would be freed before the kernel reads it."""
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.detach().to(dtype)
    return t if t.is_contiguous() else t.detach().contiguous()


def _address(t: Tensor | None) -> int:
    """The address of a tensor that the caller keeps alive; 0 for None."""
    return 0 if t is None else t.data_ptr()


def _optional(t: Tensor | None) -> int | None:
    """The address of the residual, kept alive by the caller, or None: a kernel compiles
    with or without one (see jit._given)."""
    return None if t is None else t.data_ptr()


def _negative_slope(activation: str, negative_slope: float) -> float:
    """The slope below zero of identity, relu and leaky_relu (silu ignores it)."""
    if activation == "leaky_relu":
        return float(negative_slope)
    return 1.0 if activation == "identity" else 0.0


#: Inputs of at least this many values keep the fused SiLU epilogue under the default
#: dispatch; smaller float32 and float64 ones run BN, then torch's SiLU
#: (NumbaBackend.unfused).
SILU_FUSED_FROM = 1 << 20


class NumbaBackend:
    """The Numba kernels for CPU float32/float64/bfloat16/float16 tensors and the
    activations they have an epilogue for (ACTIVATION_CODES; elu goes to the reference).
    The default dispatch gives them every such call that ATen does not take (see
    batchnorm.backends.aten). Half-precision inputs are read and written as they are;
    their statistics, parameters and parameter gradients are float32. Every tensor handed
    to a kernel is contiguous in the kernel's layout and stays referenced here until the
    kernel returns."""

    name = "numba"
    operator = False
    devices = ("cpu",)

    def supports(self, call: Call) -> bool:
        x = call.x
        if not (x.is_cpu and x.dtype in STORAGE and call.activation in ACTIVATION_CODES):
            return False
        # the kernels' relu is leaky_relu of slope 0 but for relu(-inf) = 0 (torch: NaN)
        return not (call.activation == "leaky_relu" and call.negative_slope == 0)

    def preferred(self, call: Call) -> bool:
        return True

    def unfused(self, call: Call) -> bool:
        """SiLU on float32 and float64 inputs of fewer than SILU_FUSED_FROM values: the
        kernels' BN followed by torch's SiLU, level with the fused epilogue or faster there
        (on planes of up to a few hundred values the epilogue's loop runs scalar). On
        larger inputs the pair's extra passes over memory cost more than the epilogue's
        exp. Module forward + backward, the fused epilogue's time / the pair's, 2026-12-05
        (the epilogue's exp in fused multiply-adds), one thread (two): 6x6 planes (8, 480,
        6, 6) 1.55 (1.28); (8, 144, 24, 24) 1.00 (1.00); (8, 64, 48, 48) 0.95 (0.95); (8,
        96, 48, 48) 0.90 (0.96); (16, 256, 24, 24) 0.82 (0.87); (32, 128, 32, 32) 0.79
        (0.60). (With the exp before, a multiply and an add a step: 1.17 (1.24) at (8, 144,
        24, 24), 1.11-1.19 (0.80-0.97) from 1.2 to 2.2 million values, 0.95 (0.81) at (32,
        128, 32, 32), and the threshold was 4,194,304 values on one thread.) The pair's
        results are the same to float32 rounding (dL/d(pre-activation) is float32 either
        way); it keeps the pre-activation for SiLU's backward, an input's worth of memory
        more. Half-precision inputs keep the fused epilogue: torch's SiLU would round
        dL/d(pre-activation) to their precision, and the parameters' gradients would lose
        float32's accuracy."""
        if call.activation != "silu" or call.x.dtype not in (torch.float32, torch.float64):
            return False
        return call.x.numel() < SILU_FUSED_FROM

    def _forward(self, x, launch, weight, bias, residual, mean, var, invstd, eps, activation,
                 slope, training):  # fmt: skip
        """y for x dense in launch.layout."""
        y = torch.empty_like(x)
        # Every tensor whose address a kernel reads is held by a local until it returns.
        z = None if residual is None else _like(residual, x, launch.layout)
        weight, bias = _vector(weight, launch.stats), _vector(bias, launch.stats)
        kernels = cl_forward if launch.layout == "cl" else cf_forward
        kernel, threads = kernels.pick(x.numel())
        kernel(launch.storage, launch.compute, *launch.shape, x.data_ptr(), _optional(z),
               y.data_ptr(), _address(weight), _address(bias), mean.data_ptr(), var.data_ptr(),
               invstd.data_ptr(), _negative_slope(activation, slope), eps,
               ACTIVATION_CODES[activation], weight is not None, bias is not None, training,
               threads)  # fmt: skip
        return y

    def forward_train(self, x, weight, bias, residual, eps, activation, negative_slope):
        x, launch = _dense_launch(x)
        channels = launch.shape[1]
        mean = torch.empty(channels, dtype=launch.stats)
        var = torch.empty(channels, dtype=launch.stats)
        invstd = torch.empty(channels, dtype=launch.stats)
        y = self._forward(x, launch, weight, bias, residual, mean, var, invstd, eps, activation,
                          negative_slope, True)  # fmt: skip
        return y, mean, var, invstd

    def forward_eval(self, x, weight, bias, residual, mean, invstd, activation, negative_slope):
        x, launch = _dense_launch(x)
        mean, invstd = _vector(mean, launch.stats), _vector(invstd, launch.stats)
        return self._forward(x, launch, weight, bias, residual, mean, mean, invstd, 0.0,
                             activation, negative_slope, False)  # fmt: skip

    def backward(self, dy, x, weight, bias, residual, mean, invstd, training, activation,
                 negative_slope, need_dpre):  # fmt: skip
        x, launch = _dense_launch(x)
        layout, stats = launch.layout, launch.stats
        dy = _like(dy, x, layout)
        # Every tensor whose address a kernel reads is held by a local until it returns.
        z = None if residual is None else _like(residual, x, layout)
        weight, bias = _vector(weight, stats), _vector(bias, stats)
        mean, invstd = _vector(mean, stats), _vector(invstd, stats)
        dx = torch.empty_like(x)
        # dL/dresidual is dL/dpre: dy itself without activation, else a tensor of its own.
        write_dpre = need_dpre and activation != "identity"
        dpre = torch.empty_like(x) if write_dpre else (dy if need_dpre else None)
        dweight = torch.empty(launch.shape[1], dtype=stats)
        dbias = torch.empty(launch.shape[1], dtype=stats)
        kernel, threads = (cl_backward if layout == "cl" else cf_backward).pick(x.numel())
        kernel(launch.storage, launch.compute, *launch.shape, dy.data_ptr(), x.data_ptr(),
               _optional(z), dx.data_ptr(), _address(dpre) if write_dpre else 0,
               _address(weight), _address(bias), mean.data_ptr(), invstd.data_ptr(),
               dweight.data_ptr(), dbias.data_ptr(), _negative_slope(activation, negative_slope),
               ACTIVATION_CODES[activation], weight is not None, bias is not None, training,
               write_dpre, threads)  # fmt: skip
        return dx, dweight, dbias, dpre

    def update_running_stats(self, running_mean, running_var, mean, var, count, momentum,
                             unbiased=True):  # fmt: skip
        """reference.update_running_stats, done by one small kernel."""
        if count == 0:
            return
        dtype = running_mean.dtype
        fits = running_var.dtype == dtype == mean.dtype == var.dtype and dtype in _LIKE
        if not (fits and running_mean.is_cpu and running_mean.is_contiguous()
                and running_var.is_contiguous() and mean.is_contiguous()
                and var.is_contiguous()) or running_mean.requires_grad:  # fmt: skip
            reference.update_running_stats(
                running_mean, running_var, mean, var, count, momentum, unbiased
            )
            return
        bessel = count / (count - 1) if unbiased and count > 1 else 1.0
        running_update(_LIKE[dtype], mean.shape[0], running_mean.data_ptr(),
                       running_var.data_ptr(), mean.data_ptr(), var.data_ptr(), bessel,
                       float(momentum))  # fmt: skip
