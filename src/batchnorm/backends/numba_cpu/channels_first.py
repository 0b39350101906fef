"""Kernels for the channels-first layout: x seen as (N, C, S), NCHW-contiguous.

The row helpers take 1-D contiguous views (a row of S values, or a piece of at most CHUNK
of them) and per-row scalars. Every loop starts at 0 (a loop from a computed start keeps
numba's negative-index test and does not vectorize). Tensors are read with _ld and written
with _st (halves.py), as in channels_last.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from batchnorm.backends.numba_cpu import jit
from batchnorm.backends.numba_cpu.halves import _is_half, _ld, _st
from batchnorm.backends.numba_cpu.jit import CHUNK, INLINE

#: A kernel runs channel by channel (each thread finishes the channels it has summed, their
#: rows still in its caches: one pass over memory instead of two) when there are at least
#: CHANNELS_PER_THREAD channels per thread and either the tensor exceeds BEYOND_CACHE bytes
#: (about our machines' last-level cache: below it the second pass of the row-by-row kernel
#: reads from that cache, and it runs faster, its memory order being sequential) and its
#: rows are LONG_ROW_BYTES or longer, or, in the forward, it fits in the caches and its rows
#: are under SHORT_ROW values. Same-process A/B against row by row, 2 threads, on the host
#: of 2026-12-04 (slower memory than that of LONG_ROW_BYTES's figures): (64, 256, 28, 28)
#: and (8, 64, 16, 56, 56) forward 0.76-0.90x the time, backward 0.68-1.03x; 1 thread
#: 0.80-0.85x and 0.81-0.97x; (32, 128, 32, 32), 16 MiB, 1 thread: forward 1.3x (hence the
#: size rule); short rows, forward (8, 256, 6, 6) 0.70x and (8, 240, 12, 12) 0.75-0.84x but
#: backward 1.09x (1.26x on 1 thread).
CHANNELS_PER_THREAD = 4
SHORT_ROW = 256
BEYOND_CACHE = 24 << 20
#: Channel by channel, a channel's rows lie C * S values apart, and on a host with fast
#: memory (2026-12-06: a 51 MiB copy in 1.5-3 ms on 2 threads) rows of a few KiB cost more
#: there than the row-by-row kernel's second read of x in memory order: the hardware
#: prefetcher starts again on each row, and each lies in another DRAM page. On long rows
#: channel by channel keeps winning: 0.71-0.85x row by row's time on rows of 12,544 and
#: 50,176 values ((16, 64, 112, 112), (8, 32, 224, 224), (8, 64, 16, 56, 56)). Same-
#: process A/B (the kernels compiled both ways, swapped call by call), module calls, this
#: rule's time / channel by channel for every tensor past BEYOND_CACHE, 2 threads (1),
#: forward and forward + backward: rows of 784 values (64, 256, 28, 28) 0.80 (0.51),
#: 0.87-1.07 (0.74), bfloat16 (128, 256, 28, 28) 0.64 and 0.82, fused SiLU and ReLU forward
#: + backward 0.83 and 0.97; 196 (64, 512, 14, 14) 0.75, 0.87-0.94; 3,136 (32, 64, 56, 56)
#: 0.91, 1.01-1.05; 49 (128, 1024, 7, 7), the Numba backend forced (the dispatch gave such
#: planes to ATen then), 0.62 and 0.66. (Channel by channel prefetching the next
#: channel's rows into L2 as it summed the current one's took 0.81-0.93x the time on rows of
#: 784 and 196 values, and still lost to row by row there: left out.)
LONG_ROW_BYTES = 32 << 10


@njit(inline="always", **INLINE)
def _channel_major(n_batch, channels, size, itemsize, threads, short_rows):
    """Whether a pass runs channel by channel (see CHANNELS_PER_THREAD); ``short_rows``:
    also for rows under SHORT_ROW values of a tensor that fits in the caches."""
    if channels < CHANNELS_PER_THREAD * threads:
        return False
    if n_batch * channels * size * itemsize > BEYOND_CACHE:
        return size * itemsize >= LONG_ROW_BYTES
    return short_rows and size < SHORT_ROW


@njit(inline="always", **INLINE)
def _cf_chunks(size):
    """The pieces of CHUNK values (the last one shorter) a row of ``size`` values is summed in."""
    return (size + CHUNK - 1) // CHUNK


@njit(inline="always", **INLINE)
def _cf_piece(p, chunks, size):
    """(row, start, stop) of piece p: chunk p % chunks of row p // chunks (of the (N * C)
    rows of S values)."""
    if chunks == 1:
        return p, 0, size
    row = p // chunks
    start = (p - row * chunks) * CHUNK
    return row, start, min(size, start + CHUNK)


@njit(**INLINE)
def _cf_lengths(n_batch, size, chunks):
    """The number of values in each piece, (N, chunks), as _merge_stats takes them."""
    lengths = np.empty((n_batch, chunks), np.float64)
    for k in range(chunks):
        lengths[:, k] = min(CHUNK, size - k * CHUNK)
    return lengths


@njit(inline="always", **INLINE)
def _cf_row(a, row, start, stop, chunks):
    """The piece [start, stop) of row ``row`` of a (rows of a 2-D view, or (n, c) of a 3-D
    one): the whole row, without a slice, when the rows are single pieces (a slice per row
    cost more than the work of rows of a few dozen values)."""
    return a[row] if chunks == 1 else a[row][start:stop]


@njit(inline="always", **INLINE)
def _cf_piece_stats(xr, stats):
    """(mean, M2) of a piece in one pass (see jit._piece_stats), with sums in the dtype of
    ``stats``; with an inf or NaN, the plain sum's mean."""
    zero = stats.dtype.type(0)
    s, d1, d2 = _ld(xr[0]), zero, zero
    for i in range(xr.shape[0]):
        d = _ld(xr[i]) - s
        d1 += d
        d2 += d * d
    mean, m2 = jit._piece_stats(s, d1, d2, xr.shape[0])
    if not (np.isfinite(s) and np.isfinite(d1)):
        total = zero
        for i in range(xr.shape[0]):
            total += _ld(xr[i])
        mean, m2 = total / xr.shape[0], np.nan
    return mean, m2


@njit(inline="always", **INLINE)
def _cf_epilogue(xr, zr, yr, m, a, b, act, neg, has_z):
    """yr = act((xr - m) * a + b [+ zr])."""
    if act == jit._IDENTITY and not has_z and _is_half(yr):  # see halves._is_half
        for i in range(xr.shape[0]):
            yr[i] = _st((_ld(xr[i]) - m) * a + b, yr)
        return
    for i in range(xr.shape[0]):
        yr[i] = _st(jit._act(jit._pre(_ld(xr[i]) - m, a, b, _ld(zr[i]), has_z), act, neg), yr)


@njit(inline="always", **INLINE)
def _cf_sums_of(dr, xr, m, stats):
    """(sum d, sum d * (x - m)) over a piece of dpre = dr given."""
    g, gx = stats.dtype.type(0), stats.dtype.type(0)
    for i in range(xr.shape[0]):
        d = _ld(dr[i])
        g += d
        gx += d * (_ld(xr[i]) - m)
    return g, gx


@njit(inline="always", **INLINE)
def _cf_grad_sums(gr, xr, zr, pr, stats, m, a, b, act, neg, has_z, write_dpre):
    """(sum dpre, sum dpre * (x - m)) over a piece; dpre is written to pr if write_dpre, in
    a pass of its own over the piece, which is in L1 (see channels_last._cl_grad_sums),
    and summed from there (its activation computed once), unless pr holds half precision
    (rounded, it would cost the sums their accuracy: computed again)."""
    if act == jit._IDENTITY:  # dpre is dy (never written: dL/dresidual is dy itself)
        return _cf_sums_of(gr, xr, m, stats)
    if write_dpre:
        _cf_dx(gr, xr, zr, pr, m, a, b, a - a, a - a, act, neg, has_z, False, True)
        if not _is_half(pr):
            return _cf_sums_of(pr, xr, m, stats)
    g, gx = stats.dtype.type(0), stats.dtype.type(0)
    for i in range(xr.shape[0]):
        xc, d = jit._centred_dpre(_ld(gr[i]), _ld(xr[i]), _ld(zr[i]), m, a, b, act, neg, has_z)
        g += d
        gx += d * xc
    return g, gx


@njit(inline="always", **INLINE)
def _cf_dx(gr, xr, zr, dxr, m, a, b, k0, k2, act, neg, has_z, training, dpre_only=False):
    """dxr from dL/dy = gr (dpre recomputed) or from dpre itself (act = identity); with
    dpre_only, dL/dpre itself."""
    if act == jit._IDENTITY and not dpre_only:  # as in _cf_grad_sums
        for i in range(xr.shape[0]):
            dxr[i] = _st(jit._dx(_ld(gr[i]), _ld(xr[i]) - m, a, k0, k2, training), dxr)
        return
    for i in range(xr.shape[0]):
        xc, d = jit._centred_dpre(_ld(gr[i]), _ld(xr[i]), _ld(zr[i]), m, a, b, act, neg, has_z)
        dxr[i] = _st(d if dpre_only else jit._dx(d, xc, a, k0, k2, training), dxr)


# The kernels' parallel loops run over blocks, one per thread (the contiguous ranges of
# prange's static schedule), each a call of one of the functions below, in which the helpers
# above are inlined once. Numba's parallel pass compiles each prange body as a function of
# its own, and with the helpers' loops written out in the bodies it took most of a kernel's
# compile: cf_backward float32 took 22-25 s parallel, 8-12 s serial in the test suite; its
# forward and backward on one input, parallel then serial, 25.2 + 8.3 s before, 20.6 +
# 3.7 s after (the serial kernels call the same compiled functions). The functions make
# their views from the kernel's addresses and shape, rows of (N * C, S) where they go row by
# row, and start from a bound known to be >= 0: given the kernel's arrays, whose shapes and
# strides they cannot know to be the same, and indexing them by (n, c), they took 1.10x
# (training forward) and 1.14x (backward) the time on (128, 1024, 7, 7), one thread.


@njit(inline="always", **INLINE)
def _block(t, blocks, total):
    """[start, stop) of block t of ``blocks`` equal blocks of range(total)."""
    return total * t // blocks, total * (t + 1) // blocks


@njit(inline="always", **INLINE)
def _views(like, shape, a_at, b_at, c_at):
    """The arrays of ``shape`` at these three addresses (see jit._view)."""
    return jit._view(a_at, like, shape), jit._view(b_at, like, shape), jit._view(c_at, like, shape)


@njit(**INLINE)
def _cf_stats_pieces(p0, p1, like, shape, x_at, piece_mean, piece_m2, stats):
    """(mean, M2) of pieces [p0, p1) (see _cf_piece) into piece_mean and piece_m2."""
    rows, size = shape[0] * shape[1], shape[2]
    chunks = _cf_chunks(size)
    x = jit._view(x_at, like, (rows, size))
    means, m2s = piece_mean.reshape(rows * chunks), piece_m2.reshape(rows * chunks)
    p0 = max(p0, 0)  # known to be >= 0: no negative-index tests (see above)
    for p in range(p0, p1):
        row, start, stop = _cf_piece(p, chunks, size)
        means[p], m2s[p] = _cf_piece_stats(_cf_row(x, row, start, stop, chunks), stats)


@njit(**INLINE)
def _cf_epilogue_rows(r0, r1, like, shape, x_at, z_at, y_at, mean, scale, shift, act, neg,
                      has_z):  # fmt: skip
    """The epilogue of rows [r0, r1) of (N, C) rows."""
    channels = shape[1]
    x, z, y = _views(like, (shape[0] * channels, shape[2]), x_at, z_at, y_at)
    r0 = max(r0, 0)  # known to be >= 0: no negative-index tests (see above)
    for row in range(r0, r1):
        c = row % channels
        _cf_epilogue(x[row], z[row], y[row], mean[c], scale[c], shift[c], act, neg, has_z)


@njit(**INLINE)
def _cf_forward_channels(c0, c1, like, shape, x_at, z_at, y_at, piece_mean, piece_m2, lengths,
                         mean, var, invstd, weight, bias, stats, eps, act, neg, has_weight,
                         has_bias, has_z):  # fmt: skip
    """Channels [c0, c1) one at a time: the statistics, then the epilogue of its rows while
    they are still in a cache (see CHANNELS_PER_THREAD)."""
    x, z, y = _views(like, shape, x_at, z_at, y_at)
    n_batch, size = shape[0], shape[2]
    chunks = _cf_chunks(size)
    c0 = max(c0, 0)  # known to be >= 0: no negative-index tests (see above)
    for c in range(c0, c1):
        for n in range(n_batch):
            for k in range(chunks):
                start, stop = k * CHUNK, min(size, k * CHUNK + CHUNK)
                piece_mean[n, c, k], piece_m2[n, c, k] = _cf_piece_stats(
                    _cf_row(x[n], c, start, stop, chunks), stats
                )
        mean64, var64 = jit._merge_stats(piece_mean, piece_m2, lengths, c, n_batch * size)
        jit._finish_stats(c, mean64, var64, eps, mean, var, invstd)
        a, b = jit._channel_coefficients(c, invstd, weight, bias, has_weight, has_bias)
        for n in range(n_batch):
            _cf_epilogue(x[n, c], z[n, c], y[n, c], mean[c], a, b, act, neg, has_z)


@jit._Kernel
def cf_forward(like, stats, n_batch, channels, size, x_at, z_at, y_at, weight_at, bias_at,
               mean_at, var_at, invstd_at, neg, eps, act, has_weight, has_bias,
               training, threads):  # fmt: skip
    """y = act(BN(x) [+ z]) for x of shape (N, C, S). Training: first write the batch mean,
    biased var and invstd; eval: read mean and invstd. weight and bias are read only if
    has_weight and has_bias. Tensors are addresses (see _view), the residual z's None when
    there is none (see jit._given): ``like`` gives the dtype of x, y and z, ``stats`` that
    of the per-channel vectors."""
    shape = (n_batch, channels, size)
    # the views are made in the row functions, from the addresses (see _views)
    has_z = jit._given(z_at)
    z_or_x = jit._given_or(z_at, x_at)
    var = jit._view(var_at, stats, (channels,))
    mean, invstd, weight, bias = jit._vectors(stats, channels, mean_at, invstd_at, weight_at,
                                              bias_at, has_weight, has_bias)  # fmt: skip
    neg = stats.dtype.type(neg)
    if training:
        chunks = _cf_chunks(size)
        piece_mean = np.empty((n_batch, channels, chunks), np.float64)
        piece_m2 = np.empty((n_batch, channels, chunks), np.float64)
        lengths = _cf_lengths(n_batch, size, chunks)
        if _channel_major(n_batch, channels, size, like.itemsize, threads, True):
            for t in prange(threads):
                c0, c1 = _block(t, threads, channels)
                _cf_forward_channels(c0, c1, like, shape, x_at, z_or_x, y_at, piece_mean, piece_m2,
                                     lengths, mean, var, invstd, weight, bias, stats, eps, act,
                                     neg, has_weight, has_bias, has_z)  # fmt: skip
            return
        for t in prange(threads):
            p0, p1 = _block(t, threads, n_batch * channels * chunks)
            _cf_stats_pieces(p0, p1, like, shape, x_at, piece_mean, piece_m2, stats)
        for c in prange(channels):
            mean64, var64 = jit._merge_stats(piece_mean, piece_m2, lengths, c, n_batch * size)
            jit._finish_stats(c, mean64, var64, eps, mean, var, invstd)
    scale, shift = jit._coefficients(mean, invstd, weight, bias, has_weight, has_bias)
    for t in prange(threads):
        r0, r1 = _block(t, threads, n_batch * channels)
        _cf_epilogue_rows(r0, r1, like, shape, x_at, z_or_x, y_at, mean, scale, shift, act, neg,
                          has_z)  # fmt: skip


@njit(**INLINE)
def _cf_grad_pieces(p0, p1, like, shape, dy_at, x_at, z_at, dpre, piece_g, piece_gx, stats,
                    mean, scale, shift, act, neg, has_z, write_dpre):  # fmt: skip
    """(sum dpre, sum dpre * (x - mean)) of pieces [p0, p1) into piece_g and piece_gx, dpre
    written if write_dpre (see _cf_grad_sums)."""
    channels, rows, size = shape[1], shape[0] * shape[1], shape[2]
    chunks = _cf_chunks(size)
    dy, x, z = _views(like, (rows, size), dy_at, x_at, z_at)
    pre = dpre.reshape((rows, size))  # a view (dpre is C-contiguous)
    sums_g, sums_gx = piece_g.reshape(rows * chunks), piece_gx.reshape(rows * chunks)
    p0 = max(p0, 0)  # known to be >= 0: no negative-index tests (see above)
    for p in range(p0, p1):
        row, start, stop = _cf_piece(p, chunks, size)
        c = row % channels
        sums_g[p], sums_gx[p] = _cf_grad_sums(
            _cf_row(dy, row, start, stop, chunks), _cf_row(x, row, start, stop, chunks),
            _cf_row(z, row, start, stop, chunks), _cf_row(pre, row, start, stop, chunks),
            stats, mean[c], scale[c], shift[c], act, neg, has_z, write_dpre,
        )  # fmt: skip


@njit(**INLINE)
def _cf_dx_rows(r0, r1, like, shape, g, x_at, z_at, dx_at, mean, scale, shift, k0, k2, act, neg,
                has_z, training):  # fmt: skip
    """dx of rows [r0, r1) of (N, C) rows from g (see _cf_dx)."""
    channels, rows = shape[1], shape[0] * shape[1]
    x, z, dx = _views(like, (rows, shape[2]), x_at, z_at, dx_at)
    g_rows = g.reshape((rows, shape[2]))  # a view (g is C-contiguous)
    r0 = max(r0, 0)  # known to be >= 0: no negative-index tests (see above)
    for row in range(r0, r1):
        c = row % channels
        _cf_dx(g_rows[row], x[row], z[row], dx[row], mean[c], scale[c], shift[c], k0[c], k2[c],
               act, neg, has_z, training)  # fmt: skip


@njit(**INLINE)
def _cf_backward_channels(c0, c1, like, shape, dy_at, x_at, z_at, dx_at, dpre_at, g_at, piece_g,
                          piece_gx, mean, scale, shift, invstd, dweight, dbias, stats, act, neg,
                          act2, neg2, has_z, write_dpre, keep, training):  # fmt: skip
    """Channels [c0, c1) one at a time: the sums, dweight and dbias, then dx of its rows
    while they are still in a cache (see CHANNELS_PER_THREAD). With ``keep``, dpre is kept
    for dx in a scratch of the statistics' dtype, in the thread's caches: one exp a value
    instead of two (SiLU's; see cf_backward)."""
    dy, x, z = _views(like, shape, dy_at, x_at, z_at)
    dx, dpre, g_rows = _views(like, shape, dx_at, dpre_at, g_at)
    n_batch, size = shape[0], shape[2]
    chunks = _cf_chunks(size)
    count, zero, one = n_batch * size, stats.dtype.type(0), stats.dtype.type(1)
    kept = np.empty((n_batch, size) if keep else (1, 1), stats.dtype)
    c0 = max(c0, 0)  # known to be >= 0: no negative-index tests (see above)
    for c in range(c0, c1):
        for n in range(n_batch):
            for k in range(chunks):
                start, stop = k * CHUNK, min(size, k * CHUNK + CHUNK)
                if keep:
                    piece_g[n, c, k], piece_gx[n, c, k] = _cf_grad_sums(
                        _cf_row(dy[n], c, start, stop, chunks),
                        _cf_row(x[n], c, start, stop, chunks),
                        _cf_row(z[n], c, start, stop, chunks),
                        kept[n] if chunks == 1 else kept[n, start:stop], stats, mean[c],
                        scale[c], shift[c], act, neg, has_z, True,
                    )  # fmt: skip
                    continue
                piece_g[n, c, k], piece_gx[n, c, k] = _cf_grad_sums(
                    _cf_row(dy[n], c, start, stop, chunks),
                    _cf_row(x[n], c, start, stop, chunks),
                    _cf_row(z[n], c, start, stop, chunks),
                    _cf_row(dpre[n], c, start, stop, chunks), stats, mean[c], scale[c],
                    shift[c], act, neg, has_z, write_dpre,
                )  # fmt: skip
        sum_g, sum_gx = jit._grad_sums(piece_g, piece_gx, c)
        jit._finish_grad_sums(c, sum_g, sum_gx, invstd, dweight, dbias)
        k0c, k2c = zero, zero  # eval: x does not enter (see jit._dx)
        if training:
            k0, k2 = jit._channel_grad_coefficients(scale[c], invstd[c], dweight[c],
                                                    dbias[c], count)  # fmt: skip
            k0c, k2c = stats.dtype.type(k0), stats.dtype.type(k2)  # as _grad_coefficients
        for n in range(n_batch):
            if keep:
                _cf_dx(kept[n], x[n, c], z[n, c], dx[n, c], mean[c], scale[c], shift[c], k0c,
                       k2c, jit._IDENTITY, one, has_z, training)  # fmt: skip
            else:
                _cf_dx(g_rows[n, c], x[n, c], z[n, c], dx[n, c], mean[c], scale[c], shift[c],
                       k0c, k2c, act2, neg2, has_z, training)  # fmt: skip


@jit._Kernel
def cf_backward(like, stats, n_batch, channels, size, dy_at, x_at, z_at, dx_at, dpre_at,
                weight_at, bias_at, mean_at, invstd_at, dweight_at, dbias_at, neg, act, has_weight,
                has_bias, training, write_dpre, threads):  # fmt: skip
    """dx, dweight, dbias for x of shape (N, C, S), and dpre = dL/d(pre) if write_dpre.

    Two passes over dy and x: per-channel sums of dpre and dpre * (x - mean), then dx. With
    an activation, dpre is recomputed in both passes from x (and z); when dpre is wanted
    (for the residual's gradient) the first pass writes it, sums it and the second reads it
    (in float32 and float64; half precision recomputes it rather than read it rounded).
    Channel by channel, SiLU's dpre is kept for the channel's dx in its caches; row by
    row, a half-precision input's in a float32 tensor."""
    shape, vector = (n_batch, channels, size), (channels,)
    # the views of the (N, C, S) tensors are made in the row functions (see _views), but
    # dpre's, which the row-by-row sums take as one of their arrays (or kept_all)
    has_z = jit._given(z_at)
    z_or_x = jit._given_or(z_at, x_at)
    dpre_at = dpre_at if write_dpre else dx_at
    dpre = jit._view(dpre_at, like, shape)
    mean, invstd, weight, bias = jit._vectors(stats, channels, mean_at, invstd_at, weight_at,
                                              bias_at, has_weight, has_bias)  # fmt: skip
    dweight, dbias = jit._view(dweight_at, stats, vector), jit._view(dbias_at, stats, vector)
    neg = stats.dtype.type(neg)
    scale, shift = jit._coefficients(mean, invstd, weight, bias, has_weight, has_bias)
    chunks = _cf_chunks(size)
    piece_g = np.empty((n_batch, channels, chunks), np.float64)
    piece_gx = np.empty((n_batch, channels, chunks), np.float64)
    reread = write_dpre and like.itemsize > 2  # see the docstring
    g_at = dpre_at if reread else dy_at
    # identity is the linear activation of slope 1 (see jit._act): dx from a dpre read back
    one = stats.dtype.type(1)
    act2, neg2 = (jit._IDENTITY, one) if reread else (act, neg)
    if _channel_major(n_batch, channels, size, like.itemsize, threads, False):  # see cf_forward
        # SiLU's dpre kept for the channel's dx (see _cf_backward_channels): forward +
        # backward, (64, 256, 28, 28) float32, two threads, 11.5-13.8 -> 9.4-9.6 ms (bfloat16
        # 13.0 -> 10.1); one thread level (2026-12-04, when rows of 784 values ran channel
        # by channel: see LONG_ROW_BYTES).
        keep = act == jit._SILU and not write_dpre
        for t in prange(threads):
            c0, c1 = _block(t, threads, channels)
            _cf_backward_channels(c0, c1, like, shape, dy_at, x_at, z_or_x, dx_at, dpre_at, g_at,
                                  piece_g, piece_gx, mean, scale, shift, invstd, dweight, dbias,
                                  stats, act, neg, act2, neg2, has_z, write_dpre, keep,
                                  training)  # fmt: skip
        return
    # Row by row, a half-precision input's SiLU keeps its dpre too, in a tensor of float32:
    # one exp a value fewer for 4 more bytes written and read (bfloat16 forward + backward,
    # two threads, (32, 128, 32, 32) 3.20 -> 2.77 ms, (8, 96, 48, 48) 1.35 -> 1.05,
    # (16, 256, 24, 24) 1.84 -> 1.44; float16 alike). Float32 inputs lost 10-20 %.
    keep_all = act == jit._SILU and not write_dpre and _is_half(dpre)
    kept_all = np.empty((n_batch, channels, size) if keep_all else (1, 1, 1), stats.dtype)
    pieces = n_batch * channels * chunks
    for t in prange(threads):
        p0, p1 = _block(t, threads, pieces)
        if keep_all:
            _cf_grad_pieces(p0, p1, like, shape, dy_at, x_at, z_or_x, kept_all, piece_g, piece_gx,
                            stats, mean, scale, shift, act, neg, has_z, True)  # fmt: skip
        else:
            _cf_grad_pieces(p0, p1, like, shape, dy_at, x_at, z_or_x, dpre, piece_g, piece_gx,
                            stats, mean, scale, shift, act, neg, has_z, write_dpre)  # fmt: skip
    for c in prange(channels):
        sum_g, sum_gx = jit._grad_sums(piece_g, piece_gx, c)
        jit._finish_grad_sums(c, sum_g, sum_gx, invstd, dweight, dbias)
    k0, k2 = jit._grad_coefficients(scale, invstd, dweight, dbias, n_batch * size, training)
    g_rows = jit._view(g_at, like, shape)
    for t in prange(threads):
        r0, r1 = _block(t, threads, n_batch * channels)
        if keep_all:
            _cf_dx_rows(r0, r1, like, shape, kept_all, x_at, z_or_x, dx_at, mean, scale, shift, k0,
                        k2, jit._IDENTITY, one, has_z, training)  # fmt: skip
        else:
            _cf_dx_rows(r0, r1, like, shape, g_rows, x_at, z_or_x, dx_at, mean, scale, shift, k0,
                        k2, act2, neg2, has_z, training)  # fmt: skip
