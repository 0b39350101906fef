"""Kernels for the channels-first layout: x seen as (N, C, S), NCHW-contiguous."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from batchnorm.backends.numba_cpu.jit import (
    _IDENTITY,
    _SILU,
    CHUNK,
    INLINE,
    _coefficients,
    _finish_stats,
    _grad_coefficients,
    _Kernel,
    _linear_act,
    _linear_grad,
    _silu,
    _silu_grad,
    _view,
)

# ---------------------------------------------------------------------------------------
# Channels first: x is (N, C, S). The row helpers take 1-D contiguous views and per-row
# scalars. Every loop starts at 0 (a loop from a computed start keeps numba's
# negative-index test and does not vectorize) and tests nothing but its data: invariant
# tests sit outside the loops.


@njit(**INLINE)
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


@njit(**INLINE)
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


@njit(**INLINE)
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


@njit(**INLINE)
def _cf_grad_sums(gr, xr, m):
    """(sum g, sum g * (x - mean)) over a piece, g being dL/dpre."""
    T = xr.dtype.type
    g, gx = T(0), T(0)
    for s in range(xr.shape[0]):
        g += gr[s]
        gx += gr[s] * (xr[s] - m)
    return g, gx


@njit(**INLINE)
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


@njit(**INLINE)
def _cf_dx(gr, xr, dxr, m, a, k0, k2):
    """dxr = a * gr + k0 + k2 * (xr - m), gr being dL/dpre."""
    for s in range(xr.shape[0]):
        dxr[s] = a * gr[s] + k0 + k2 * (xr[s] - m)


@njit(**INLINE)
def _cf_dx_eval(gr, dxr, a):
    """dxr = a * gr: eval mode, where x does not enter dx (an infinite x keeps dx finite)."""
    for s in range(gr.shape[0]):
        dxr[s] = a * gr[s]


@njit(**INLINE)
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
