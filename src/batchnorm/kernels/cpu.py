"""Numba kernels for batch norm on CPU: float32/float64, NCHW-contiguous and channels-last.

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
``cl``); each piece is summed twice while it sits in L1/L2 (its own mean first, then the
values centred on that mean), and the pieces' (count, mean, M2) are merged in float64 with
Chan et al.'s formula. A channel with mean 1e4 and std 1 keeps its digits in float32.

The math is that of :mod:`batchnorm.reference`; the tests hold the two together.
"""

from __future__ import annotations

import math
import os
import types

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.core import types as nbtypes
from numba.extending import intrinsic, overload
from torch import Tensor

from batchnorm import reference  # the fallback of update_running_stats only

# Floating-point flags: re-association only. It lets LLVM vectorize the per-piece sums
# (about 10x faster than a sequential float sum), which changes only the order in which at
# most CHUNK (cf) or MAX_BLOCK_ROWS (cl) values are added before the float64 merge. No other
# fast-math flag: NaN and Inf propagate as in torch, and exp and division stay IEEE.
FASTMATH = {"reassoc"}

#: Activation codes passed to the kernels (the names are those of reference.ACTIVATIONS).
ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}
_IDENTITY, _SILU = 0, 3

#: cf: values of one row summed as one piece (16 KiB of float32: both passes hit L1).
CHUNK = 4096
#: cl: values in one block of rows (256 KiB of float32: both passes hit L2) ...
BLOCK = 65536
#: ... and at most this many rows per block, so that the per-channel sums, sequential over
#: the rows of a block, add few terms in x's dtype before the float64 merge.
MAX_BLOCK_ROWS = 256
#: Inputs with fewer values run serially (see _Kernel). Measured on 2 cores: around this
#: size the parallel kernels' thread wake-ups cost about as much as the second core saves.
SERIAL_BELOW = 1 << 16
#: Pieces per thread in cl reductions: spare pieces balance threads that the OS slows down.
PIECES_PER_THREAD = 4


class _Kernel:
    """One kernel compiled twice: with ``parallel=True`` and serially (prange runs as range).

    Below SERIAL_BELOW values the serial one runs: waking threads costs a few µs per parallel
    loop, more than the work of a small layer. Both are cached on disk; the serial copy has
    its own name so that the two do not share a cache entry."""

    def __init__(self, fn) -> None:
        serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial")
        serial.__qualname__ = fn.__qualname__ + "_serial"
        options = {**_HELPER, "nogil": True}
        self.parallel = njit(parallel=True, **options)(fn)
        self.serial = njit(**options)(serial)
        self.__doc__ = fn.__doc__

    def pick(self, numel: int):
        """(compiled variant, threads) for an input of ``numel`` values."""
        if numel < SERIAL_BELOW or _forked_child:
            return self.serial, 1
        return self.parallel, _sync_threads()


# GNU OpenMP (numba's threading layer here) cannot run in a child forked after it started:
# numba would end the child ("fork() called from a process already using GNU OpenMP"). A
# forked child (DataLoader workers, multiprocessing's "fork") runs the serial kernels, as
# torch itself drops to one thread there.
_forked_child = False


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = True


os.register_at_fork(after_in_child=_after_fork_in_child)


# error_model="numpy": a float division by zero gives inf/nan as in torch, instead of the
# Python-style test and exception that would also keep a loop from vectorizing.
_HELPER = {"cache": True, "fastmath": FASTMATH, "error_model": "numpy"}


@intrinsic
def _pointer(typingctx, address, like):
    """An integer address as a pointer to the element type of the array ``like``."""
    pointer = nbtypes.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@njit(inline="always", **_HELPER)
def _view(address, like, shape):
    """The C-contiguous array of ``shape`` at ``address``, with the dtype of ``like``.

    The kernels take tensors as addresses (``Tensor.data_ptr()``): converting a tensor to a
    NumPy array costs about 1 µs, ten times more, and a small layer passes ten tensors."""
    return numba.carray(_pointer(address, like), shape)


# Activations. identity, relu and leaky_relu are one piecewise-linear map with slope `neg`
# below zero (1, 0 and negative_slope): no branch on the activation inside the loops, so
# they vectorize. silu has loops of its own.


@njit(inline="always", **_HELPER)
def _linear_act(v, neg):
    """v if v > 0 (or NaN, as torch.relu keeps it), else v * neg; relu(-inf) is 0."""
    return v if not v <= 0 else (v * neg if neg != 0 else neg)


@njit(inline="always", **_HELPER)
def _linear_grad(dy, pre, neg):
    """dL/dpre of _linear_act: dy * (pre > 0) for relu, as reference.activation_grad."""
    return dy if pre > 0 else dy * neg


# exp, vectorizable. np.exp compiles to a call of libm's scalar exp (numba vectorizes it
# only with Intel's SVML), which made a fused SiLU 4-5x slower than BN + torch's SiLU. This
# one is a range reduction, exp(v) = 2^k exp(r) with |r| <= ln2 / 2, a Taylor polynomial of
# exp(r) accurate to an ulp, and 2^k built from its bits. It is inlined into the loops
# (else they would not vectorize), so it inherits their re-association flag: the reduction
# is therefore one subtraction, v - k ln2, in float64 (measured: within an ulp in float32,
# within 1e-13 relative in float64, where |k| <= 1023 scales ln2's rounding). v is clamped
# where exp would overflow or become subnormal: silu and its gradient there differ from
# exact by less than 1e-36 (float32) or 1e-300 (float64), and a NaN still propagates
# through silu's other factors.

#: 1/n! for n = 13 .. 0: Taylor coefficients of exp, in Horner's order.
_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(13, -1, -1))
_T32 = tuple(np.float32(c) for c in _TAYLOR[6:])
_LN2 = math.log(2.0)


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float whose IEEE-754 bits are ``bits`` (int32 -> float32, int64 -> float64)."""
    floats = {nbtypes.int32: nbtypes.float32, nbtypes.int64: nbtypes.float64}
    if bits not in floats:
        return None
    result = floats[bits]

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(result))

    return result(bits), codegen


@njit(inline="always", **_HELPER)
def _exp32(v):
    v = min(max(v, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(np.float64(v) * (1.0 / _LN2) + 0.5)
    r = np.float32(np.float64(v) - k * _LN2)
    # Taylor to degree 7 (the remainder is below an ulp), in Horner's form. Written out: a
    # loop over the coefficients would stay a loop and keep the caller's from vectorizing.
    t = _T32
    p = (((((t[0] * r + t[1]) * r + t[2]) * r + t[3]) * r + t[4]) * r + t[5]) * r + t[6]
    p = p * r + t[7]
    return p * _float_from_bits(np.int32((np.int64(k) + 127) << 23))


@njit(inline="always", **_HELPER)
def _exp64(v):
    v = min(max(v, -708.0), 709.0)
    k = np.floor(v * (1.0 / _LN2) + 0.5)
    r = v - k * _LN2
    t = _TAYLOR  # degree 13, written out as in _exp32
    p = (((((t[0] * r + t[1]) * r + t[2]) * r + t[3]) * r + t[4]) * r + t[5]) * r + t[6]
    p = (((((p * r + t[7]) * r + t[8]) * r + t[9]) * r + t[10]) * r + t[11]) * r + t[12]
    p = p * r + t[13]
    return p * _float_from_bits((np.int64(k) + 1023) << 52)


def _exp(v):
    """exp(v) for float32 or float64 v, vectorizable (see above)."""
    return np.exp(v)


@overload(_exp, inline="always")
def _exp_overload(v):
    if v == nbtypes.float32:
        return lambda v: _exp32(v)
    if v == nbtypes.float64:
        return lambda v: _exp64(v)
    return None


@njit(inline="always", **_HELPER)
def _silu(v):
    return v / (np.float32(1) + _exp(-v))  # np.float32(1) keeps v's dtype, a bare 1 would not


@njit(inline="always", **_HELPER)
def _silu_grad(dy, pre):
    s = np.float32(1) / (np.float32(1) + _exp(-pre))
    return dy * s * (np.float32(1) + pre * (np.float32(1) - s))


@njit(**_HELPER)
def _coefficients(mean, invstd, weight, bias, has_weight, has_bias):
    """Per-channel (scale, shift) of pre = (x - mean) * scale + shift, in x's dtype."""
    scale = invstd.copy()
    shift = np.zeros_like(invstd)
    for c in range(scale.shape[0]):
        if has_weight:
            scale[c] = invstd[c] * weight[c]
        if has_bias:
            shift[c] = bias[c]
    return scale, shift


@njit(**_HELPER)
def _finish_stats(mean64, m2_64, count, eps, mean, var, invstd):
    for c in range(mean.shape[0]):
        mean[c] = mean64[c]
        var[c] = m2_64[c] / count
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)  # of the var rounded to x's dtype


@njit(**_HELPER)
def _grad_coefficients(scale, invstd, dweight, dbias, count, training):
    """(k0, k2) of dx = scale * dpre + k0 + k2 * (x - mean), which is
    dx = scale * (dpre - dbias / M - xhat * dweight / M); both are zero in eval mode."""
    k0 = np.zeros_like(scale)
    k2 = np.zeros_like(scale)
    if training:
        for c in range(scale.shape[0]):
            k0[c] = -scale[c] * (dbias[c] / count)
            k2[c] = -scale[c] * invstd[c] * (dweight[c] / count)
    return k0, k2


# ---------------------------------------------------------------------------------------
# Channels first: x is (N, C, S). The row helpers take 1-D contiguous views and per-row
# scalars. Every loop starts at 0 (a loop from a computed start keeps numba's
# negative-index test and does not vectorize) and tests nothing but its data: invariant
# tests sit outside the loops.


@njit(**_HELPER)
def _cf_piece_stats(xr):
    """(mean, M2) of a piece, in float64: its own mean, then the values centred on it."""
    T = xr.dtype.type  # scalars in x's dtype: a bare literal would promote float32
    acc = T(0)
    for s in range(xr.shape[0]):
        acc += xr[s]
    local = acc / T(xr.shape[0])
    if not np.isfinite(local):  # an inf or NaN: the piece's mean is its sum's, as in torch
        return np.float64(local), np.nan
    d1, d2 = T(0), T(0)
    for s in range(xr.shape[0]):
        d = xr[s] - local
        d1 += d
        d2 += d * d
    count = float(xr.shape[0])
    return local + d1 / count, d2 - np.float64(d1) * d1 / count


@njit(**_HELPER)
def _cf_epilogue(xr, zr, yr, m, a, b, act, neg, has_z):
    """yr = act((xr - m) * a + b [+ zr])."""
    if act == _SILU:
        if has_z:
            for s in range(xr.shape[0]):
                yr[s] = _silu((xr[s] - m) * a + b + zr[s])
        else:
            for s in range(xr.shape[0]):
                yr[s] = _silu((xr[s] - m) * a + b)
    elif has_z:
        for s in range(xr.shape[0]):
            yr[s] = _linear_act((xr[s] - m) * a + b + zr[s], neg)
    elif act == _IDENTITY:  # plain batch norm, the common case: nothing but the affine map
        for s in range(xr.shape[0]):
            yr[s] = (xr[s] - m) * a + b
    else:
        for s in range(xr.shape[0]):
            yr[s] = _linear_act((xr[s] - m) * a + b, neg)


@njit(**_HELPER)
def _cf_dpre(gr, xr, zr, out, m, a, b, act, neg, has_z):
    """out = dL/dpre from dL/dy = gr, with the pre-activation recomputed."""
    if act == _SILU:
        if has_z:
            for s in range(xr.shape[0]):
                out[s] = _silu_grad(gr[s], (xr[s] - m) * a + b + zr[s])
        else:
            for s in range(xr.shape[0]):
                out[s] = _silu_grad(gr[s], (xr[s] - m) * a + b)
    elif has_z:
        for s in range(xr.shape[0]):
            out[s] = _linear_grad(gr[s], (xr[s] - m) * a + b + zr[s], neg)
    else:
        for s in range(xr.shape[0]):
            out[s] = _linear_grad(gr[s], (xr[s] - m) * a + b, neg)


@njit(**_HELPER)
def _cf_grad_sums(gr, xr, m):
    """(sum g, sum g * (x - mean)) over a piece, g being dL/dpre."""
    T = xr.dtype.type
    g, gx = T(0), T(0)
    for s in range(xr.shape[0]):
        g += gr[s]
        gx += gr[s] * (xr[s] - m)
    return g, gx


@njit(**_HELPER)
def _cf_grad_sums_act(gr, xr, zr, m, a, b, act, neg, has_z):
    """_cf_grad_sums of dL/dpre recomputed from dL/dy = gr."""
    T = xr.dtype.type
    g, gx = T(0), T(0)
    if act == _SILU:
        if has_z:
            for s in range(xr.shape[0]):
                d = _silu_grad(gr[s], (xr[s] - m) * a + b + zr[s])
                g += d
                gx += d * (xr[s] - m)
        else:
            for s in range(xr.shape[0]):
                d = _silu_grad(gr[s], (xr[s] - m) * a + b)
                g += d
                gx += d * (xr[s] - m)
    elif has_z:
        for s in range(xr.shape[0]):
            d = _linear_grad(gr[s], (xr[s] - m) * a + b + zr[s], neg)
            g += d
            gx += d * (xr[s] - m)
    else:
        for s in range(xr.shape[0]):
            d = _linear_grad(gr[s], (xr[s] - m) * a + b, neg)
            g += d
            gx += d * (xr[s] - m)
    return g, gx


@njit(**_HELPER)
def _cf_dx(gr, xr, dxr, m, a, k0, k2):
    """dxr = a * gr + k0 + k2 * (xr - m), gr being dL/dpre."""
    for s in range(xr.shape[0]):
        dxr[s] = a * gr[s] + k0 + k2 * (xr[s] - m)


@njit(**_HELPER)
def _cf_dx_eval(gr, dxr, a):
    """dxr = a * gr: eval mode, where x does not enter dx (an infinite x keeps dx finite)."""
    for s in range(gr.shape[0]):
        dxr[s] = a * gr[s]


@njit(**_HELPER)
def _cf_dx_act(gr, xr, zr, dxr, m, a, b, k0, k2, act, neg, has_z):
    """_cf_dx with dL/dpre recomputed from dL/dy = gr."""
    if act == _SILU:
        if has_z:
            for s in range(xr.shape[0]):
                d = _silu_grad(gr[s], (xr[s] - m) * a + b + zr[s])
                dxr[s] = a * d + k0 + k2 * (xr[s] - m)
        else:
            for s in range(xr.shape[0]):
                d = _silu_grad(gr[s], (xr[s] - m) * a + b)
                dxr[s] = a * d + k0 + k2 * (xr[s] - m)
    elif has_z:
        for s in range(xr.shape[0]):
            d = _linear_grad(gr[s], (xr[s] - m) * a + b + zr[s], neg)
            dxr[s] = a * d + k0 + k2 * (xr[s] - m)
    else:
        for s in range(xr.shape[0]):
            d = _linear_grad(gr[s], (xr[s] - m) * a + b, neg)
            dxr[s] = a * d + k0 + k2 * (xr[s] - m)


@_Kernel
def cf_forward(like, n_batch, channels, size, x_at, z_at, y_at, weight_at, bias_at, mean_at,
               var_at, invstd_at, neg, eps, act, has_z, has_weight, has_bias, training,
               threads):  # fmt: skip
    """y = act(BN(x) [+ z]) for x of shape (N, C, S). Training: first write the batch mean,
    biased var and invstd; eval: read mean and invstd. z is read only if has_z, weight and
    bias only if has_weight and has_bias. Tensors are addresses (see _view)."""
    shape = (n_batch, channels, size)
    x, y = _view(x_at, like, shape), _view(y_at, like, shape)
    z = _view(z_at if has_z else x_at, like, shape)
    mean, var = _view(mean_at, like, (channels,)), _view(var_at, like, (channels,))
    invstd = _view(invstd_at, like, (channels,))
    weight = _view(weight_at if has_weight else mean_at, like, (channels,))
    bias = _view(bias_at if has_bias else mean_at, like, (channels,))
    neg = x.dtype.type(neg)
    if training:
        chunks = (size + CHUNK - 1) // CHUNK
        pieces = n_batch * channels * chunks
        piece_mean = np.empty(pieces, np.float64)
        piece_m2 = np.empty(pieces, np.float64)
        for p in prange(pieces):
            row, k = p // chunks, p % chunks
            xr = x[row // channels, row % channels, k * CHUNK : min(size, k * CHUNK + CHUNK)]
            piece_mean[p], piece_m2[p] = _cf_piece_stats(xr)
        mean64 = np.empty(channels, np.float64)
        m2_64 = np.empty(channels, np.float64)
        for c in prange(channels):
            # Merge of the pieces' (count, mean, M2) in float64: the count-weighted mean, then
            # M2 = sum(M2_p + n_p (mean_p - mean)^2). Summing means (rather than Chan's
            # running update) keeps an infinite piece's mean infinite, as torch's is.
            total = 0.0
            for n in range(n_batch):
                for k in range(chunks):
                    length = float(min(CHUNK, size - k * CHUNK))
                    total += piece_mean[(n * channels + c) * chunks + k] * length
            m = total / (n_batch * size)
            m2 = 0.0
            for n in range(n_batch):
                for k in range(chunks):
                    p = (n * channels + c) * chunks + k
                    length = float(min(CHUNK, size - k * CHUNK))
                    delta = piece_mean[p] - m
                    m2 += piece_m2[p] + length * delta * delta
            mean64[c] = m
            m2_64[c] = m2
        _finish_stats(mean64, m2_64, n_batch * size, eps, mean, var, invstd)
    scale, shift = _coefficients(mean, invstd, weight, bias, has_weight, has_bias)
    for row in prange(n_batch * channels):
        n, c = row // channels, row % channels
        _cf_epilogue(x[n, c], z[n, c], y[n, c], mean[c], scale[c], shift[c], act, neg, has_z)


@_Kernel
def cf_backward(like, n_batch, channels, size, dy_at, x_at, z_at, dx_at, dpre_at, weight_at,
                bias_at, mean_at, invstd_at, dweight_at, dbias_at, neg, act, has_z, has_weight,
                has_bias, training, write_dpre, threads):  # fmt: skip
    """dx, dweight, dbias for x of shape (N, C, S), and dpre = dL/d(pre) if write_dpre.

    Two passes over dy and x: per-channel sums of dpre and dpre * (x - mean), then dx. With
    an activation, dpre is recomputed in both passes from x (and z); when dpre is wanted
    (for the residual's gradient) the first pass writes it and the second reads it."""
    shape = (n_batch, channels, size)
    dy, x, dx = _view(dy_at, like, shape), _view(x_at, like, shape), _view(dx_at, like, shape)
    z = _view(z_at if has_z else x_at, like, shape)
    dpre = _view(dpre_at if write_dpre else dx_at, like, shape)
    mean, invstd = _view(mean_at, like, (channels,)), _view(invstd_at, like, (channels,))
    dweight, dbias = _view(dweight_at, like, (channels,)), _view(dbias_at, like, (channels,))
    weight = _view(weight_at if has_weight else mean_at, like, (channels,))
    bias = _view(bias_at if has_bias else mean_at, like, (channels,))
    neg = x.dtype.type(neg)
    scale, shift = _coefficients(mean, invstd, weight, bias, has_weight, has_bias)
    # dpre is at hand in g_rows unless it must be recomputed from dy (recompute = True)
    recompute = act != _IDENTITY and not write_dpre
    g_rows = dpre if write_dpre else dy
    chunks = (size + CHUNK - 1) // CHUNK
    pieces = n_batch * channels * chunks
    piece_g = np.empty(pieces, np.float64)
    piece_gx = np.empty(pieces, np.float64)
    for p in prange(pieces):
        row, k = p // chunks, p % chunks
        n, c = row // channels, row % channels
        start, stop = k * CHUNK, min(size, k * CHUNK + CHUNK)
        gr, xr, zr = dy[n, c, start:stop], x[n, c, start:stop], z[n, c, start:stop]
        if recompute:
            g, gx = _cf_grad_sums_act(gr, xr, zr, mean[c], scale[c], shift[c], act, neg, has_z)
        else:
            if write_dpre:
                _cf_dpre(gr, xr, zr, dpre[n, c, start:stop], mean[c], scale[c], shift[c], act,
                         neg, has_z)  # fmt: skip
            g, gx = _cf_grad_sums(g_rows[n, c, start:stop], xr, mean[c])
        piece_g[p], piece_gx[p] = g, gx
    for c in prange(channels):
        g, gx = 0.0, 0.0
        for n in range(n_batch):
            for k in range(chunks):
                g += piece_g[(n * channels + c) * chunks + k]
                gx += piece_gx[(n * channels + c) * chunks + k]
        dbias[c] = g
        dweight[c] = gx * invstd[c]
    k0, k2 = _grad_coefficients(scale, invstd, dweight, dbias, n_batch * size, training)
    for row in prange(n_batch * channels):
        n, c = row // channels, row % channels
        if not training:  # dx = scale * dpre, with dpre recomputed into dx if need be
            g_row = g_rows[n, c]
            if recompute:
                _cf_dpre(dy[n, c], x[n, c], z[n, c], dx[n, c], mean[c], scale[c], shift[c],
                         act, neg, has_z)  # fmt: skip
                g_row = dx[n, c]
            _cf_dx_eval(g_row, dx[n, c], scale[c])
        elif recompute:
            _cf_dx_act(dy[n, c], x[n, c], z[n, c], dx[n, c], mean[c], scale[c], shift[c], k0[c],
                       k2[c], act, neg, has_z)  # fmt: skip
        else:
            _cf_dx(g_rows[n, c], x[n, c], dx[n, c], mean[c], scale[c], k0[c], k2[c])


# ---------------------------------------------------------------------------------------
# Channels last: x is (M, C). The block helpers take 2-D contiguous blocks of whole rows
# (one call per block: a call per row costs as much as a row of 128 values) and
# per-channel vectors.


@njit(**_HELPER)
def _cl_blocks(rows, channels, threads):
    """(rows per block, number of blocks) of an (M, C) pass."""
    per = max(1, min(BLOCK // max(channels, 1), MAX_BLOCK_ROWS))
    if threads > 1:
        wanted = PIECES_PER_THREAD * threads
        per = max(1, min(per, (rows + wanted - 1) // wanted))
    return per, (rows + per - 1) // per


@njit(**_HELPER)
def _cl_block_stats(xb, block_mean, block_m2):
    """Per-channel (mean, M2) of a block of rows: its own mean, then the centred values."""
    T = xb.dtype.type
    rows, channels = xb.shape
    acc = np.zeros(channels, xb.dtype)
    for r in range(rows):
        for c in range(channels):
            acc[c] += xb[r, c]
    local = np.empty(channels, xb.dtype)
    for c in range(channels):
        local[c] = acc[c] / T(rows)
    d1 = np.zeros(channels, xb.dtype)
    d2 = np.zeros(channels, xb.dtype)
    for r in range(rows):
        for c in range(channels):
            d = xb[r, c] - local[c]
            d1[c] += d
            d2[c] += d * d
    for c in range(channels):
        block_mean[c] = local[c] + np.float64(d1[c]) / rows
        block_m2[c] = d2[c] - np.float64(d1[c]) * d1[c] / rows
        if not np.isfinite(local[c]):  # an inf or NaN: the block's mean is its sum's (torch)
            block_mean[c], block_m2[c] = local[c], np.nan


@njit(**_HELPER)
def _cl_epilogue(xb, zb, yb, mean, scale, shift, act, neg, has_z):
    """yb = act((xb - mean) * scale + shift [+ zb])."""
    rows, channels = xb.shape
    if act == _SILU:
        if has_z:
            for r in range(rows):
                for c in range(channels):
                    yb[r, c] = _silu((xb[r, c] - mean[c]) * scale[c] + shift[c] + zb[r, c])
        else:
            for r in range(rows):
                for c in range(channels):
                    yb[r, c] = _silu((xb[r, c] - mean[c]) * scale[c] + shift[c])
    elif has_z:
        for r in range(rows):
            for c in range(channels):
                yb[r, c] = _linear_act((xb[r, c] - mean[c]) * scale[c] + shift[c] + zb[r, c], neg)
    elif act == _IDENTITY:  # as in _cf_epilogue
        for r in range(rows):
            for c in range(channels):
                yb[r, c] = (xb[r, c] - mean[c]) * scale[c] + shift[c]
    else:
        for r in range(rows):
            for c in range(channels):
                yb[r, c] = _linear_act((xb[r, c] - mean[c]) * scale[c] + shift[c], neg)


@njit(**_HELPER)
def _cl_dpre(gb, xb, zb, out, mean, scale, shift, act, neg, has_z):
    """out = dL/dpre from dL/dy = gb, with the pre-activation recomputed."""
    rows, channels = xb.shape
    for r in range(rows):
        if act == _SILU:
            if has_z:
                for c in range(channels):
                    pre = (xb[r, c] - mean[c]) * scale[c] + shift[c] + zb[r, c]
                    out[r, c] = _silu_grad(gb[r, c], pre)
            else:
                for c in range(channels):
                    out[r, c] = _silu_grad(gb[r, c], (xb[r, c] - mean[c]) * scale[c] + shift[c])
        elif has_z:
            for c in range(channels):
                pre = (xb[r, c] - mean[c]) * scale[c] + shift[c] + zb[r, c]
                out[r, c] = _linear_grad(gb[r, c], pre, neg)
        else:
            for c in range(channels):
                pre = (xb[r, c] - mean[c]) * scale[c] + shift[c]
                out[r, c] = _linear_grad(gb[r, c], pre, neg)


@njit(**_HELPER)
def _cl_grad_sums(gb, xb, g, gx, mean):
    """Add g = dL/dpre and g * (x - mean) of a block to the per-channel sums."""
    rows, channels = xb.shape
    for r in range(rows):
        for c in range(channels):
            g[c] += gb[r, c]
            gx[c] += gb[r, c] * (xb[r, c] - mean[c])


@njit(**_HELPER)
def _cl_grad_sums_act(gb, xb, zb, g, gx, mean, scale, shift, act, neg, has_z):
    """_cl_grad_sums of dL/dpre recomputed from dL/dy = gb."""
    rows, channels = xb.shape
    for r in range(rows):
        if act == _SILU:
            if has_z:
                for c in range(channels):
                    xc = xb[r, c] - mean[c]
                    d = _silu_grad(gb[r, c], xc * scale[c] + shift[c] + zb[r, c])
                    g[c] += d
                    gx[c] += d * xc
            else:
                for c in range(channels):
                    xc = xb[r, c] - mean[c]
                    d = _silu_grad(gb[r, c], xc * scale[c] + shift[c])
                    g[c] += d
                    gx[c] += d * xc
        elif has_z:
            for c in range(channels):
                xc = xb[r, c] - mean[c]
                d = _linear_grad(gb[r, c], xc * scale[c] + shift[c] + zb[r, c], neg)
                g[c] += d
                gx[c] += d * xc
        else:
            for c in range(channels):
                xc = xb[r, c] - mean[c]
                d = _linear_grad(gb[r, c], xc * scale[c] + shift[c], neg)
                g[c] += d
                gx[c] += d * xc


@njit(**_HELPER)
def _cl_dx(gb, xb, dxb, mean, scale, k0, k2):
    """_cf_dx for a block with per-channel vectors."""
    rows, channels = xb.shape
    for r in range(rows):
        for c in range(channels):
            dxb[r, c] = scale[c] * gb[r, c] + k0[c] + k2[c] * (xb[r, c] - mean[c])


@njit(**_HELPER)
def _cl_dx_eval(gb, dxb, scale):
    """_cf_dx_eval for a block with per-channel vectors."""
    rows, channels = gb.shape
    for r in range(rows):
        for c in range(channels):
            dxb[r, c] = scale[c] * gb[r, c]


@njit(**_HELPER)
def _cl_dx_act(gb, xb, zb, dxb, mean, scale, shift, k0, k2, act, neg, has_z):
    """_cf_dx_act for a block with per-channel vectors."""
    rows, channels = xb.shape
    for r in range(rows):
        if act == _SILU:
            if has_z:
                for c in range(channels):
                    xc = xb[r, c] - mean[c]
                    d = _silu_grad(gb[r, c], xc * scale[c] + shift[c] + zb[r, c])
                    dxb[r, c] = scale[c] * d + k0[c] + k2[c] * xc
            else:
                for c in range(channels):
                    xc = xb[r, c] - mean[c]
                    d = _silu_grad(gb[r, c], xc * scale[c] + shift[c])
                    dxb[r, c] = scale[c] * d + k0[c] + k2[c] * xc
        elif has_z:
            for c in range(channels):
                xc = xb[r, c] - mean[c]
                d = _linear_grad(gb[r, c], xc * scale[c] + shift[c] + zb[r, c], neg)
                dxb[r, c] = scale[c] * d + k0[c] + k2[c] * xc
        else:
            for c in range(channels):
                xc = xb[r, c] - mean[c]
                d = _linear_grad(gb[r, c], xc * scale[c] + shift[c], neg)
                dxb[r, c] = scale[c] * d + k0[c] + k2[c] * xc


@_Kernel
def cl_forward(like, rows, channels, x_at, z_at, y_at, weight_at, bias_at, mean_at, var_at,
               invstd_at, neg, eps, act, has_z, has_weight, has_bias, training,
               threads):  # fmt: skip
    """cf_forward for x of shape (M, C)."""
    shape = (rows, channels)
    x, y = _view(x_at, like, shape), _view(y_at, like, shape)
    z = _view(z_at if has_z else x_at, like, shape)
    mean, var = _view(mean_at, like, (channels,)), _view(var_at, like, (channels,))
    invstd = _view(invstd_at, like, (channels,))
    weight = _view(weight_at if has_weight else mean_at, like, (channels,))
    bias = _view(bias_at if has_bias else mean_at, like, (channels,))
    neg = x.dtype.type(neg)
    per, blocks = _cl_blocks(rows, channels, threads)
    if training:
        block_mean = np.empty((blocks, channels), np.float64)
        block_m2 = np.empty((blocks, channels), np.float64)
        for k in prange(blocks):
            _cl_block_stats(x[k * per : min(rows, k * per + per)], block_mean[k], block_m2[k])
        # The pieces' merge of cf_forward, vectorized over channels
        mean64 = np.zeros(channels, np.float64)
        for k in range(blocks):
            length = float(min(rows, k * per + per) - k * per)
            for c in range(channels):
                mean64[c] += block_mean[k, c] * length
        for c in range(channels):
            mean64[c] /= rows
        m2_64 = np.zeros(channels, np.float64)
        for k in range(blocks):
            length = float(min(rows, k * per + per) - k * per)
            for c in range(channels):
                delta = block_mean[k, c] - mean64[c]
                m2_64[c] += block_m2[k, c] + length * delta * delta
        _finish_stats(mean64, m2_64, rows, eps, mean, var, invstd)
    scale, shift = _coefficients(mean, invstd, weight, bias, has_weight, has_bias)
    for k in prange(blocks):
        r0, r1 = k * per, min(rows, k * per + per)
        _cl_epilogue(x[r0:r1], z[r0:r1], y[r0:r1], mean, scale, shift, act, neg, has_z)


@_Kernel
def cl_backward(like, rows, channels, dy_at, x_at, z_at, dx_at, dpre_at, weight_at, bias_at,
                mean_at, invstd_at, dweight_at, dbias_at, neg, act, has_z, has_weight, has_bias,
                training, write_dpre, threads):  # fmt: skip
    """cf_backward for x of shape (M, C)."""
    shape = (rows, channels)
    dy, x, dx = _view(dy_at, like, shape), _view(x_at, like, shape), _view(dx_at, like, shape)
    z = _view(z_at if has_z else x_at, like, shape)
    dpre = _view(dpre_at if write_dpre else dx_at, like, shape)
    mean, invstd = _view(mean_at, like, (channels,)), _view(invstd_at, like, (channels,))
    dweight, dbias = _view(dweight_at, like, (channels,)), _view(dbias_at, like, (channels,))
    weight = _view(weight_at if has_weight else mean_at, like, (channels,))
    bias = _view(bias_at if has_bias else mean_at, like, (channels,))
    neg = x.dtype.type(neg)
    per, blocks = _cl_blocks(rows, channels, threads)
    scale, shift = _coefficients(mean, invstd, weight, bias, has_weight, has_bias)
    recompute = act != _IDENTITY and not write_dpre
    g_rows = dpre if write_dpre else dy
    block_g = np.empty((blocks, channels), np.float64)
    block_gx = np.empty((blocks, channels), np.float64)
    for k in prange(blocks):
        r0, r1 = k * per, min(rows, k * per + per)
        g = np.zeros(channels, x.dtype)
        gx = np.zeros(channels, x.dtype)
        if recompute:
            _cl_grad_sums_act(dy[r0:r1], x[r0:r1], z[r0:r1], g, gx, mean, scale, shift, act,
                              neg, has_z)  # fmt: skip
        else:
            if write_dpre:
                _cl_dpre(dy[r0:r1], x[r0:r1], z[r0:r1], dpre[r0:r1], mean, scale, shift, act,
                         neg, has_z)  # fmt: skip
            _cl_grad_sums(g_rows[r0:r1], x[r0:r1], g, gx, mean)
        block_g[k] = g
        block_gx[k] = gx
    g64 = np.zeros(channels, np.float64)
    gx64 = np.zeros(channels, np.float64)
    for k in range(blocks):
        for c in range(channels):
            g64[c] += block_g[k, c]
            gx64[c] += block_gx[k, c]
    for c in range(channels):
        dbias[c] = g64[c]
        dweight[c] = gx64[c] * invstd[c]
    k0, k2 = _grad_coefficients(scale, invstd, dweight, dbias, rows, training)
    for k in prange(blocks):
        r0, r1 = k * per, min(rows, k * per + per)
        if not training:  # as in cf_backward
            g_block = g_rows[r0:r1]
            if recompute:
                _cl_dpre(dy[r0:r1], x[r0:r1], z[r0:r1], dx[r0:r1], mean, scale, shift, act, neg,
                         has_z)  # fmt: skip
                g_block = dx[r0:r1]
            _cl_dx_eval(g_block, dx[r0:r1], scale)
        elif recompute:
            _cl_dx_act(dy[r0:r1], x[r0:r1], z[r0:r1], dx[r0:r1], mean, scale, shift, k0, k2,
                       act, neg, has_z)  # fmt: skip
        else:
            _cl_dx(g_rows[r0:r1], x[r0:r1], dx[r0:r1], mean, scale, k0, k2)


@njit(**_HELPER)
def running_update(like, channels, running_mean_at, running_var_at, mean_at, var_at, bessel,
                   momentum):  # fmt: skip
    """reference.update_running_stats in one call: old + momentum * (new - old), with the
    unbiased variance var * bessel."""
    running_mean = _view(running_mean_at, like, (channels,))
    running_var = _view(running_var_at, like, (channels,))
    mean, var = _view(mean_at, like, (channels,)), _view(var_at, like, (channels,))
    for c in range(channels):
        running_mean[c] += momentum * (mean[c] - running_mean[c])
        running_var[c] += momentum * (var[c] * bessel - running_var[c])


# ---------------------------------------------------------------------------------------
# The backend: torch tensors in, torch tensors out (see batchnorm.ops.Backend). Small layers
# spend more time here than in the kernels, hence the fast paths and few torch calls.

#: Per dtype, an empty array whose type tells the kernels the dtype of the addresses.
_LIKE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def accepts(x: Tensor) -> bool:
    """CPU float32/float64 tensors; everything else stays on the reference."""
    return x.is_cpu and x.dtype in _LIKE


def _sync_threads() -> int:
    """Numba's thread count follows torch.get_num_threads(); returns it."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if threads != numba.get_num_threads():
        numba.set_num_threads(threads)
    return threads


def _channels_last_order(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()), 1)


def _layout(x: Tensor) -> str:
    """The kernel layout x is in, or the nearest one if x is neither (it will be copied)."""
    if x.dim() == 2:
        return "cl"
    if x.is_contiguous():
        return "cl" if x.numel() == x.shape[0] * x.shape[1] else "cf"
    if x.permute(_channels_last_order(x)).is_contiguous():
        return "cl"
    return "cl" if x.stride(1) < min(x.stride()[2:]) else "cf"


def _in_layout(t: Tensor, layout: str, dtype: torch.dtype) -> Tensor:
    """t with x's dtype and the memory layout ``layout`` (a copy only if it is not so)."""
    if t.dtype != dtype:
        t = t.detach().to(dtype)
    if layout == "cf" or t.dim() <= 2:  # also per-channel vectors
        return t if t.is_contiguous() else t.detach().contiguous()
    order = _channels_last_order(t)
    moved = t.permute(order)
    if moved.is_contiguous():
        return t
    inverse = [order.index(i) for i in range(t.dim())]
    return moved.detach().contiguous().permute(inverse)


def _shape(x: Tensor, layout: str) -> tuple[int, ...]:
    """The kernel's shape of x: (N, C, S) for cf, (M, C) for cl."""
    channels = x.shape[1]
    if layout == "cf":
        return (x.shape[0], channels, x.numel() // max(x.shape[0] * channels, 1))
    return (x.numel() // max(channels, 1), channels)


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


def _negative_slope(activation: str, negative_slope: float) -> float:
    """The slope below zero of identity, relu and leaky_relu (silu ignores it)."""
    if activation == "leaky_relu":
        return float(negative_slope)
    return 1.0 if activation == "identity" else 0.0


class NumbaBackend:
    """The Numba kernels behind batchnorm.ops for CPU float32/float64 tensors.

    Activations without a kernel epilogue go to ``fallback`` (batchnorm.ops gives the
    reference backend), so that the set of activations can grow in one place. Every tensor
    handed to a kernel is contiguous in the kernel's layout and stays referenced here for
    the duration of the call."""

    name = "numba"

    def __init__(self, fallback=None) -> None:
        self.fallback = fallback

    def _fallback(self, activation: str):
        if activation in ACTIVATION_CODES:
            return None
        if self.fallback is None:
            raise ValueError(
                f"the numba backend has no kernel for activation {activation!r} and no "
                f"fallback; supported: {sorted(ACTIVATION_CODES)}"
            )
        return self.fallback

    def _forward(self, x, weight, bias, residual, mean, var, invstd, eps, activation, slope,
                 training):  # fmt: skip
        layout = _layout(x)
        x = _in_layout(x, layout, x.dtype)
        y = torch.empty_like(x)
        # Every tensor whose address a kernel reads is held by a local until it returns.
        z = None if residual is None else _in_layout(residual, layout, x.dtype)
        weight, bias = _vector(weight, x.dtype), _vector(bias, x.dtype)
        shape = _shape(x, layout)
        kernel, threads = (cl_forward if layout == "cl" else cf_forward).pick(x.numel())
        kernel(_LIKE[x.dtype], *shape, x.data_ptr(), _address(z), y.data_ptr(),
               _address(weight), _address(bias), mean.data_ptr(), var.data_ptr(),
               invstd.data_ptr(), _negative_slope(activation, slope), eps,
               ACTIVATION_CODES[activation], z is not None, weight is not None,
               bias is not None, training, threads)  # fmt: skip
        return y

    def forward_train(self, x, weight, bias, residual, eps, activation, negative_slope):
        if other := self._fallback(activation):
            return other.forward_train(x, weight, bias, residual, eps, activation, negative_slope)
        mean, var, invstd = (torch.empty(x.shape[1], dtype=x.dtype) for _ in range(3))
        y = self._forward(x, weight, bias, residual, mean, var, invstd, eps, activation,
                          negative_slope, True)  # fmt: skip
        return y, mean, var, invstd

    def forward_eval(self, x, weight, bias, residual, mean, invstd, activation, negative_slope):
        if other := self._fallback(activation):
            return other.forward_eval(
                x, weight, bias, residual, mean, invstd, activation, negative_slope
            )
        mean, invstd = _vector(mean, x.dtype), _vector(invstd, x.dtype)
        return self._forward(x, weight, bias, residual, mean, mean, invstd, 0.0, activation,
                             negative_slope, False)  # fmt: skip

    def backward(self, dy, x, weight, bias, residual, mean, invstd, training, activation,
                 negative_slope, need_dpre):  # fmt: skip
        if other := self._fallback(activation):
            return other.backward(dy, x, weight, bias, residual, mean, invstd, training,
                                  activation, negative_slope, need_dpre)  # fmt: skip
        layout = _layout(x)
        x = _in_layout(x, layout, x.dtype)
        dy = _in_layout(dy, layout, x.dtype)
        # Every tensor whose address a kernel reads is held by a local until it returns.
        z = None if residual is None else _in_layout(residual, layout, x.dtype)
        weight, bias = _vector(weight, x.dtype), _vector(bias, x.dtype)
        mean, invstd = _vector(mean, x.dtype), _vector(invstd, x.dtype)
        dx = torch.empty_like(x)
        # dL/dresidual is dL/dpre: dy itself without activation, else a tensor of its own.
        write_dpre = need_dpre and activation != "identity"
        dpre = torch.empty_like(x) if write_dpre else (dy if need_dpre else None)
        dweight = torch.empty(x.shape[1], dtype=x.dtype)
        dbias = torch.empty(x.shape[1], dtype=x.dtype)
        shape = _shape(x, layout)
        kernel, threads = (cl_backward if layout == "cl" else cf_backward).pick(x.numel())
        kernel(_LIKE[x.dtype], *shape, dy.data_ptr(), x.data_ptr(), _address(z),
               dx.data_ptr(), _address(dpre) if write_dpre else 0, _address(weight),
               _address(bias), mean.data_ptr(), invstd.data_ptr(), dweight.data_ptr(),
               dbias.data_ptr(), _negative_slope(activation, negative_slope),
               ACTIVATION_CODES[activation], z is not None, weight is not None,
               bias is not None, training, write_dpre, threads)  # fmt: skip
        return dx, dweight, dbias, dpre

    def update_running_stats(self, running_mean, running_var, mean, var, count, momentum,
                             unbiased=True):  # fmt: skip
        """reference.update_running_stats, done by one small kernel (see batchnorm.ops)."""
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
