"""Kernels for the channels-last layout: x seen as (M, C) (channels_last, channels_last_3d
and plain (N, C) inputs), in blocks of whole rows.

Each pass splits the rows into blocks of at most MAX_BLOCK_ROWS (at least PIECES_PER_THREAD
per thread); a block's loops run over its rows and, inside, over the C contiguous values
of a row with per-channel vectors, which vectorizes. Tensors are read with _ld and written
with _st (halves.py): x, y, z, dy, dx and dpre are in the input's dtype, the per-channel
vectors in the statistics' dtype (float32 for half inputs).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from batchnorm.backends.numba_cpu import jit
from batchnorm.backends.numba_cpu.halves import _is_half, _ld, _st
from batchnorm.backends.numba_cpu.jit import INLINE, _pre

#: Rows of at most this many channels are summed four at a time in the statistics pass:
#: the per-channel sums live in memory, and adding four rows to them at once instead of
#: one makes the pass over short rows faster. Training forward, same-process A/B against
#: one row at a time, medians of 30 alternating calls with the caches flushed (in cache):
#: one thread, channels_last (32, 128, 32, 32) 0.72-0.99x (0.77-1.06x), (8, 64, 48, 48)
#: 0.80-1.03x (0.72-0.86x), (32, 256, 16, 16) 0.76x (0.69x); two threads (8, 64, 48, 48)
#: 0.90-0.93x (0.72x), (8, 128, 24, 24) 0.88x (0.83x), (32, 128, 32, 32) 0.97-1.01x (bound
#: by memory there), (32, 256, 16, 16) 1.01-1.07x (0.97-1.33x). Longer rows gained
#: nothing: (4096, 1024) 1.01-1.08x. The backward's sums, written the same way, did not
#: gain either (0.78-1.11x) and stay one row at a time.
SHORT_ROW = 256
#: The backward adds its per-channel sums over at most this many rows in one chain, then
#: adds the partial sums: a sum of n terms carries up to n roundings where they do not
#: cancel. A gradient constant along the batch, channels_last (4, 3, 8, 8) eval: dbias 18.6
#: ulps of the sum of |terms| off with all 256 rows of a block in one chain, 3.5 with parts
#: of 64 rows; forward + backward time unchanged within the host's noise (A/B of processes,
#: 2026-12-04).
GRAD_PART_ROWS = 64
#: Blocks per thread at the least, so that a block's float64 results are few against its
#: values but every thread has work (also when the OS slows one down).
PIECES_PER_THREAD = 4


@njit(**INLINE)
def _cl_blocks(rows, threads):
    """(rows per block, number of blocks) of an (M, C) pass."""
    wanted = PIECES_PER_THREAD * threads if threads > 1 else 1  # serial: the largest blocks
    per = max(1, min(jit.MAX_BLOCK_ROWS, (rows + wanted - 1) // wanted))
    return per, (rows + per - 1) // per


@njit(**INLINE)
def _cl_block_stats(xb, stats, block_mean, block_m2, scratch):
    """Per-channel (mean, M2) of a block of rows in one pass (see jit._piece_stats), with
    sums in the dtype of ``stats`` (in ``scratch``, 3 x C); a channel with an inf or NaN
    takes the plain sum's."""
    rows, channels = xb.shape
    s, d1, d2 = scratch[0], scratch[1], scratch[2]
    # The centre s: the mean of the middle two of four rows spread over the block, which
    # one far row does not move. The float32 sums' rounding grows with 1 + (s - mean)^2 /
    # var; the first row alone, 3.4 std from the mean on (122, 8), put the output 2e-6 off
    # (a 50,000-example fuzz run, 2026-12-06: over its bound, 16 ulps of the output's scale).
    q = rows // 4
    for c in range(channels):
        a, b = _ld(xb[0, c]), _ld(xb[q, c])
        e, f = _ld(xb[2 * q, c]), _ld(xb[3 * q, c])
        low, high = max(min(a, b), min(e, f)), min(max(a, b), max(e, f))
        s[c] = low * 0.5 + high * 0.5  # halves first: no overflow
        d1[c] = 0
        d2[c] = 0
    # rows of few channels four at a time (see SHORT_ROW), the rest one by one
    fours = rows // 4 if channels <= SHORT_ROW else 0
    for q in range(fours):
        r = 4 * q
        for c in range(channels):
            a, b = _ld(xb[r, c]) - s[c], _ld(xb[r + 1, c]) - s[c]
            e, f = _ld(xb[r + 2, c]) - s[c], _ld(xb[r + 3, c]) - s[c]
            d1[c] += (a + b) + (e + f)
            d2[c] += (a * a + b * b) + (e * e + f * f)
    for t in range(rows - 4 * fours):
        r = 4 * fours + t
        for c in range(channels):
            d = _ld(xb[r, c]) - s[c]
            d1[c] += d
            d2[c] += d * d
    # all channels in a loop without branches (it vectorizes: a branch per channel cost as
    # much as the sums themselves on blocks of few wide rows), then the rare channels with
    # an inf or NaN
    for c in range(channels):
        block_mean[c, 0], block_m2[c, 0] = jit._piece_stats(s[c], d1[c], d2[c], rows)
    for c in range(channels):
        if not (np.isfinite(s[c]) and np.isfinite(d1[c])):
            total = stats.dtype.type(0)
            for r in range(rows):
                total += _ld(xb[r, c])
            block_mean[c, 0], block_m2[c, 0] = total / rows, np.nan


@njit(**INLINE)
def _cl_epilogue(xb, zb, yb, mean, scale, shift, act, neg, has_z):
    """yb = act((xb - mean) * scale + shift [+ zb])."""
    rows, channels = xb.shape
    if act == jit._IDENTITY and not has_z and _is_half(yb):  # see halves._is_half
        for r in range(rows):
            for c in range(channels):
                yb[r, c] = _st((_ld(xb[r, c]) - mean[c]) * scale[c] + shift[c], yb)
        return
    for r in range(rows):
        for c in range(channels):
            pre = _pre(_ld(xb[r, c]) - mean[c], scale[c], shift[c], _ld(zb[r, c]), has_z)
            yb[r, c] = _st(jit._act(pre, act, neg), yb)


@njit(**INLINE)
def _cl_dpre_row(gr, xr, zr, pr, mean, scale, shift, act, neg, has_z):
    """pr = dL/dpre of one row, from dL/dy = gr with pre recomputed."""
    for c in range(xr.shape[0]):
        _, d = jit._centred_dpre(_ld(gr[c]), _ld(xr[c]), _ld(zr[c]), mean[c], scale[c],
                                 shift[c], act, neg, has_z)  # fmt: skip
        pr[c] = _st(d, pr)


@njit(**INLINE)
def _cl_grad_sums(gb, xb, zb, pb, g, gx, part, mean, scale, shift, act, neg, has_z, write_dpre):
    """Add dpre = dL/dpre and dpre * (x - mean) of a block to the per-channel sums g and gx,
    GRAD_PART_ROWS rows at a time into sums of their own (``part``, 2 x C), which are then
    added to g and gx; write dpre to pb if write_dpre."""
    rows = xb.shape[0]
    pg, pgx = part[0], part[1]
    for k in range((rows + GRAD_PART_ROWS - 1) // GRAD_PART_ROWS):
        r0, r1 = k * GRAD_PART_ROWS, min(rows, k * GRAD_PART_ROWS + GRAD_PART_ROWS)
        pg[:] = 0
        pgx[:] = 0
        _cl_add_grad_terms(gb[r0:r1], xb[r0:r1], zb[r0:r1], pb[r0:r1], pg, pgx, mean, scale,
                           shift, act, neg, has_z, write_dpre)  # fmt: skip
        for c in range(xb.shape[1]):
            g[c] += pg[c]
            gx[c] += pgx[c]


@njit(**INLINE)
def _cl_add_grad_terms(gb, xb, zb, pb, g, gx, mean, scale, shift, act, neg, has_z, write_dpre):
    """Add dpre and dpre * (x - mean) of rows to g and gx one row at a time; write dpre to
    pb if write_dpre (a loop of its own over the row, which is in L1: a store under a test
    keeps the summing loop from vectorizing)."""
    rows, channels = xb.shape
    if act == jit._IDENTITY:  # dpre is dy: a loop without the pre-activation (8% faster)
        for r in range(rows):
            for c in range(channels):
                d = _ld(gb[r, c])
                g[c] += d
                gx[c] += d * (_ld(xb[r, c]) - mean[c])
        return
    for r in range(rows):
        if write_dpre:
            _cl_dpre_row(gb[r], xb[r], zb[r], pb[r], mean, scale, shift, act, neg, has_z)
        for c in range(channels):
            xc, d = jit._centred_dpre(_ld(gb[r, c]), _ld(xb[r, c]), _ld(zb[r, c]), mean[c],
                                      scale[c], shift[c], act, neg, has_z)  # fmt: skip
            g[c] += d
            gx[c] += d * xc


@njit(**INLINE)
def _cl_dx(gb, xb, zb, dxb, mean, scale, shift, k0, k2, act, neg, has_z, training):
    """dxb from dL/dy = gb (dpre recomputed) or from dpre itself (act = identity)."""
    rows, channels = xb.shape
    if act == jit._IDENTITY:  # as in _cl_grad_sums
        for r in range(rows):
            for c in range(channels):
                xc = _ld(xb[r, c]) - mean[c]
                dxb[r, c] = _st(jit._dx(_ld(gb[r, c]), xc, scale[c], k0[c], k2[c], training), dxb)
        return
    for r in range(rows):
        for c in range(channels):
            xc, d = jit._centred_dpre(_ld(gb[r, c]), _ld(xb[r, c]), _ld(zb[r, c]), mean[c],
                                      scale[c], shift[c], act, neg, has_z)  # fmt: skip
            dxb[r, c] = _st(jit._dx(d, xc, scale[c], k0[c], k2[c], training), dxb)


@jit._Kernel
def cl_forward(like, stats, rows, channels, x_at, z_at, y_at, weight_at, bias_at, mean_at,
               var_at, invstd_at, neg, eps, act, has_weight, has_bias, training,
               threads):  # fmt: skip
    """cf_forward for x of shape (M, C)."""
    x, y = jit._view(x_at, like, (rows, channels)), jit._view(y_at, like, (rows, channels))
    has_z = jit._given(z_at)
    z = jit._view(jit._given_or(z_at, x_at), like, (rows, channels))
    var = jit._view(var_at, stats, (channels,))
    mean, invstd, weight, bias = jit._vectors(stats, channels, mean_at, invstd_at, weight_at,
                                              bias_at, has_weight, has_bias)  # fmt: skip
    neg = stats.dtype.type(neg)
    per, blocks = _cl_blocks(rows, threads)
    if training:
        block_mean = np.empty((blocks, channels, 1), np.float64)
        block_m2 = np.empty((blocks, channels, 1), np.float64)
        # the blocks' sums, allocated once: an allocation per block cost ~5% of the pass
        scratch = np.empty((blocks, 3, channels), stats.dtype)
        for k in prange(blocks):
            _cl_block_stats(x[k * per : min(rows, k * per + per)], stats, block_mean[k],
                            block_m2[k], scratch[k])  # fmt: skip
        lengths = np.empty((blocks, 1), np.float64)
        for k in range(blocks):
            lengths[k, 0] = min(rows, k * per + per) - k * per
        for c in prange(channels):
            mean64, var64 = jit._merge_stats(block_mean, block_m2, lengths, c, rows)
            jit._finish_stats(c, mean64, var64, eps, mean, var, invstd)
    scale, shift = jit._coefficients(mean, invstd, weight, bias, has_weight, has_bias)
    for k in prange(blocks):
        r0, r1 = k * per, min(rows, k * per + per)
        _cl_epilogue(x[r0:r1], z[r0:r1], y[r0:r1], mean, scale, shift, act, neg, has_z)


@jit._Kernel
def cl_backward(like, stats, rows, channels, dy_at, x_at, z_at, dx_at, dpre_at, weight_at,
                bias_at, mean_at, invstd_at, dweight_at, dbias_at, neg, act, has_weight,
                has_bias, training, write_dpre, threads):  # fmt: skip
    """cf_backward for x of shape (M, C)."""
    shape = (rows, channels)
    dy, x = jit._view(dy_at, like, shape), jit._view(x_at, like, shape)
    has_z = jit._given(z_at)
    dx, z = jit._view(dx_at, like, shape), jit._view(jit._given_or(z_at, x_at), like, shape)
    dpre = jit._view(dpre_at if write_dpre else dx_at, like, shape)
    mean, invstd, weight, bias = jit._vectors(stats, channels, mean_at, invstd_at, weight_at,
                                              bias_at, has_weight, has_bias)  # fmt: skip
    dweight = jit._view(dweight_at, stats, (channels,))
    dbias = jit._view(dbias_at, stats, (channels,))
    neg = stats.dtype.type(neg)
    per, blocks = _cl_blocks(rows, threads)
    scale, shift = jit._coefficients(mean, invstd, weight, bias, has_weight, has_bias)
    block_g = np.empty((blocks, channels, 1), np.float64)
    block_gx = np.empty((blocks, channels, 1), np.float64)
    sums = np.zeros((blocks, 4, channels), stats.dtype)  # allocated once, as in cl_forward
    for k in prange(blocks):
        r0, r1 = k * per, min(rows, k * per + per)
        g, gx = sums[k, 0], sums[k, 1]
        _cl_grad_sums(dy[r0:r1], x[r0:r1], z[r0:r1], dpre[r0:r1], g, gx, sums[k, 2:], mean,
                      scale, shift, act, neg, has_z, write_dpre)  # fmt: skip
        block_g[k, :, 0] = g
        block_gx[k, :, 0] = gx
    for c in prange(channels):
        sum_g, sum_gx = jit._grad_sums(block_g, block_gx, c)
        jit._finish_grad_sums(c, sum_g, sum_gx, invstd, dweight, dbias)
    k0, k2 = jit._grad_coefficients(scale, invstd, dweight, dbias, rows, training)
    reread = write_dpre and x.itemsize > 2  # see cf_backward's docstring
    g_rows = dpre if reread else dy
    # identity is the linear activation of slope 1 (see jit._act)
    act2, neg2 = (jit._IDENTITY, stats.dtype.type(1)) if reread else (act, neg)
    for k in prange(blocks):
        r0, r1 = k * per, min(rows, k * per + per)
        _cl_dx(g_rows[r0:r1], x[r0:r1], z[r0:r1], dx[r0:r1], mean, scale, shift, k0, k2,
               act2, neg2, has_z, training)  # fmt: skip
