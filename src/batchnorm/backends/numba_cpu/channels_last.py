"""Kernels for the channels-last layout: x seen as (M, C) (channels_last, channels_last_3d
and plain (N, C) inputs)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from batchnorm.backends.numba_cpu.jit import (
    _IDENTITY,
    _SILU,
    BLOCK,
    INLINE,
    MAX_BLOCK_ROWS,
    PIECES_PER_THREAD,
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
# Channels last: x is (M, C). The block helpers take 2-D contiguous blocks of whole rows
# (one call per block: a call per row costs as much as a row of 128 values) and
# per-channel vectors.


@njit(**INLINE)
def _cl_blocks(rows, channels, threads):
    """(rows per block, number of blocks) of an (M, C) pass."""
    per = max(1, min(BLOCK // max(channels, 1), MAX_BLOCK_ROWS))
    if threads > 1:
        wanted = PIECES_PER_THREAD * threads
        per = max(1, min(per, (rows + wanted - 1) // wanted))
    return per, (rows + per - 1) // per


@njit(**INLINE)
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


@njit(**INLINE)
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


@njit(**INLINE)
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


@njit(**INLINE)
def _cl_grad_sums(gb, xb, g, gx, mean):
    """Add g = dL/dpre and g * (x - mean) of a block to the per-channel sums."""
    rows, channels = xb.shape
    for r in range(rows):
        for c in range(channels):
            g[c] += gb[r, c]
            gx[c] += gb[r, c] * (xb[r, c] - mean[c])


@njit(**INLINE)
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


@njit(**INLINE)
def _cl_dx(gb, xb, dxb, mean, scale, k0, k2):
    """_cf_dx for a block with per-channel vectors."""
    rows, channels = xb.shape
    for r in range(rows):
        for c in range(channels):
            dxb[r, c] = scale[c] * gb[r, c] + k0[c] + k2[c] * (xb[r, c] - mean[c])


@njit(**INLINE)
def _cl_dx_eval(gb, dxb, scale):
    """_cf_dx_eval for a block with per-channel vectors."""
    rows, channels = gb.shape
    for r in range(rows):
        for c in range(channels):
            dxb[r, c] = scale[c] * gb[r, c]


@njit(**INLINE)
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
