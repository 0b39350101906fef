"""Triton kernels for batch norm, forward: statistics, the fused epilogue, running update.

Every kernel sees its input as a 3-D array (N, C, S) of one of two dense layouts, with the
element (n, c, s) at ``n * stride_n + c * stride_c + s``:

* channels first (torch's contiguous NC*): stride_n = C * S, stride_c = S;
* channels last (``channels_last``, ``channels_last_3d``, plain (N, C)) seen as (M, C) with
  M = N * prod(spatial) rows: N := M, S := 1, stride_n = C, stride_c = 1.

A program works on 3-D tiles [BLOCK_N, BLOCK_C, BLOCK_S] (all powers of two; BLOCK_S = 1
in channels last, BLOCK_C small in channels first), so the contiguous dimension of either
layout is the fast one of the tile and no element needs an integer division. For one block
of channels the (n, s) plane is cut into ``tiles`` tiles, numbered row-major, and
consecutive tiles are grouped into pieces. Every kernel that walks the data has the same
2-D grid: (channel blocks, pieces), each program looping over the tiles of its piece. The
host (backend.py) picks the tile and piece sizes; they change only which values are added
together first, never the result beyond rounding.

Training statistics, for one (channel block, piece) and then for all:

1. a program subtracts a shift from its values, per channel its piece's first value: the
   variance does not change, and the numbers it then works with are of the size of the
   spread, not of the mean (a float32 mean of 1e4 is only known to 1e-3);
2. each tile gives per-channel (count, mean, M2) of the shifted values by two passes over
   registers: the tile's mean, then the sum of squared deviations from it;
3. the tiles of a piece are merged with Chan et al.'s formula in the compute dtype
   (float32, or float64 for float64 inputs): delta = mean_b - mean_a, mean += delta * n_b / n,
   M2 += M2_b + delta^2 * n_a * n_b / n; the piece stores (count, shift + mean, M2) in
   float64;
4. a second small kernel merges the pieces' partials in float64, a block of pieces at a
   time (the grouped form of the same formula: M2 = sum M2_i + n_i (mean_i - mean)^2),
   then Chan's formula again between blocks.

Why this is stable: no step forms E[x^2] - E[x]^2. Every sum of squares is taken around a
mean that is already close to the data, and every merge adds non-negative terms (M2's and
squared differences of means), so rounding errors stay relative to the variance, not to
mean^2. Without the shift, the float32 means of step 3 would each be rounded to an ulp of
the mean, and Chan's delta^2 terms would carry that error (measured: 2e-4 relative on the
variance of a mean-1e4, std-1 channel with tiny tiles). With it, such a channel's float32
variance is within about 1e-7 of the float64 one, whatever the tiling (tested under the
interpreter; E[x^2] - E[x]^2 in float32 has a relative error of about 30 there).

The backward kernels are in :mod:`.kernels_backward`; they share this module's layout,
tiles, grid and helpers.

Float scalars: compiled Triton passes a Python float as float32, the interpreter as
float64. The kernels therefore take a float as two float32 numbers hi + lo (see
backend.split_float), which give float64 inputs their full precision in both modes.

What is measured: correctness, under Triton's interpreter on CPU, against reference.py in
float64 (tests/backends); that every kernel compiles for a GPU (sm_90, without one). Not
run on a GPU yet: GPU speed is not measured yet, the block sizes are not tuned and no
autotuning is done.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------
# Helpers (inlined into the kernels, the backward ones of kernels_backward.py included).


@triton.jit
def _tile(
    t, c0, N, C, S, stride_n, stride_c, tiles_s,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Offsets and mask of tile ``t`` for channels c0 .. c0 + BLOCK_C, and how many (n, s)
    positions of it are inside the array (the same for every channel)."""
    n0 = (t // tiles_s) * BLOCK_N
    s0 = (t % tiles_s) * BLOCK_S
    n = n0 + tl.arange(0, BLOCK_N)
    c = c0 + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_S)
    # int64: a large batch has more than 2^31 elements; the cost is per row and channel.
    offsets = (
        (n.to(tl.int64) * stride_n)[:, None, None]
        + (c.to(tl.int64) * stride_c)[None, :, None]
        + s[None, None, :]
    )
    mask = (n < N)[:, None, None] & (c < C)[None, :, None] & (s < S)[None, None, :]
    count = tl.minimum(N - n0, BLOCK_N) * tl.minimum(S - s0, BLOCK_S)
    return offsets, mask, count


@triton.jit
def _program_piece(tiles, tiles_per_piece, BLOCK_C: tl.constexpr):
    """This program's first channel, its piece, and the tiles [first, last) of the piece."""
    piece = tl.program_id(1)
    first = piece * tiles_per_piece
    return tl.program_id(0) * BLOCK_C, piece, first, tl.minimum(first + tiles_per_piece, tiles)


@triton.jit
def _pieces_block(p0, pieces, c, C, BLOCK_P: tl.constexpr):
    """Offsets and mask of pieces p0 .. p0 + BLOCK_P, channels c, in a (pieces, C) array."""
    p = p0 + tl.arange(0, BLOCK_P)
    return p.to(tl.int64)[:, None] * C + c[None, :], (p < pieces)[:, None] & (c < C)[None, :]


@triton.jit
def _out(v, ptr, BF16_BY_HAND: tl.constexpr):
    """v converted to the element type of ``ptr``, rounded to nearest even.

    Triton 3.9's interpreter converts float32 to bfloat16 by truncation (and its explicit
    "rtne" mode can drop a carry), where GPUs round to nearest even. Under the interpreter
    the backend sets BF16_BY_HAND for bfloat16 outputs: the rounding is then done on the
    bits, NaN kept, so that the tests check what a GPU stores. Compiled, it is False."""
    if BF16_BY_HAND:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40  # the top half of a NaN, made quiet: still a NaN
        bits = tl.where(v != v, quiet_nan, rounded)
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(ptr.dtype.element_ty)
    return out


@triton.jit
def _per_channel_sum(v):
    """Sum of a [BLOCK_N, BLOCK_C, BLOCK_S] tile over n and s: a [BLOCK_C] vector."""
    return tl.sum(tl.sum(v, axis=2), axis=0)


@triton.jit
def _bcast(v):
    """A [BLOCK_C] vector viewed so that it broadcasts over a tile."""
    return v[None, :, None]


@triton.jit
def _coefficients(
    c0, C, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-channel mean, invstd, scale = invstd * weight and shift = bias, in ACC, so that
    pre = (x - mean) * scale + shift (the order of reference.pre_activation)."""
    c = c0 + tl.arange(0, BLOCK_C)
    valid = c < C
    mean = tl.load(mean_ptr + c, mask=valid, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + c, mask=valid, other=0.0).to(ACC)
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + c, mask=valid, other=0.0).to(ACC)
    shift = tl.zeros([BLOCK_C], ACC)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=valid, other=0.0).to(ACC)
    return mean, invstd, scale, shift


@triton.jit
def _activate(pre, ACTIVATION: tl.constexpr, slope_hi, slope_lo):
    """act(pre) for the activations of reference.ACTIVATIONS (elu with alpha 1)."""
    if ACTIVATION == "relu":
        # pre < 0 rather than pre > 0: relu(NaN) stays NaN, as torch.relu keeps it.
        out = tl.where(pre < 0, tl.zeros_like(pre), pre)
    elif ACTIVATION == "leaky_relu":
        out = tl.where(pre > 0, pre, pre * slope_hi + pre * slope_lo)
    elif ACTIVATION == "silu":
        out = pre / (1.0 + tl.exp(-pre))
    elif ACTIVATION == "elu":
        # exp of the non-positive part only: no overflow in the branch that is discarded.
        out = tl.where(pre > 0, pre, tl.exp(tl.where(pre > 0, 0.0, pre)) - 1.0)
    else:  # identity
        out = pre
    return out


# ---------------------------------------------------------------------------------------
# Training statistics.


@triton.jit
def stats_partial_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    N, C, S, stride_n, stride_c, tiles_s, tiles, tiles_per_piece,  # the walk: see _tile
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """(count, mean, M2) of one piece for a block of channels, into row ``piece`` of the
    (pieces, C) float64 partial arrays."""
    c0, piece, first, last = _program_piece(tiles, tiles_per_piece, BLOCK_C)
    c = c0 + tl.arange(0, BLOCK_C)
    valid = c < C
    # The piece works on x - shift, shift being its first value in each channel: a shift
    # changes the mean by a constant and M2 not at all, and with one near the data the
    # float32 means below carry digits of the spread, not of the mean (a mean of 1e4 would
    # otherwise be rounded to 1e-3, which Chan's merge turns into errors of ~1e-3 std).
    n0 = (first // tiles_s) * BLOCK_N
    s0 = (first % tiles_s) * BLOCK_S
    at = n0.to(tl.int64) * stride_n + c.to(tl.int64) * stride_c + s0
    shift = tl.load(x_ptr + at, mask=valid, other=0.0).to(ACC)
    shift = tl.where(tl.abs(shift) < float("inf"), shift, 0.0)  # NaN and inf: no shift
    count = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for t in range(first, last):
        offsets, mask, tile_count = _tile(
            t, c0, N, C, S, stride_n, stride_c, tiles_s, BLOCK_N, BLOCK_C, BLOCK_S
        )
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        x = tl.where(mask, x - _bcast(shift), 0.0)
        n_b = tile_count.to(ACC)
        # Two passes over registers: the tile's mean, then squared deviations from it.
        mean_b = _per_channel_sum(x) / n_b
        d = tl.where(mask, x - _bcast(mean_b), 0.0)
        m2_b = _per_channel_sum(d * d)
        # Chan et al.: merge the tile into the piece's running (count, mean, M2).
        total = count + n_b
        frac = n_b / total
        delta = mean_b - mean
        mean += delta * frac
        m2 += m2_b + delta * delta * count * frac
        count = total
    out = piece.to(tl.int64) * C + c
    tl.store(count_ptr + out, count.to(tl.float64), mask=valid)
    tl.store(mean_ptr + out, shift.to(tl.float64) + mean.to(tl.float64), mask=valid)
    tl.store(m2_ptr + out, m2.to(tl.float64), mask=valid)


@triton.jit
def stats_merge_kernel(
    count_ptr, part_mean_ptr, part_m2_ptr,  # (pieces, C) in
    mean_ptr, var_ptr, invstd_ptr,  # (C,) out
    pieces, C, eps_hi, eps_lo,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the pieces' partials in float64 into the batch mean, biased var and invstd
    (stored in the statistics dtype, the element type of mean_ptr)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid_c = c < C
    count = tl.zeros([BLOCK_C], tl.float64)
    mean = tl.zeros([BLOCK_C], tl.float64)
    m2 = tl.zeros([BLOCK_C], tl.float64)
    for p0 in range(0, pieces, BLOCK_P):
        at, mask = _pieces_block(p0, pieces, c, C, BLOCK_P)
        n_i = tl.load(count_ptr + at, mask=mask, other=0.0).to(tl.float64)
        mean_i = tl.load(part_mean_ptr + at, mask=mask, other=0.0).to(tl.float64)
        m2_i = tl.load(part_m2_ptr + at, mask=mask, other=0.0).to(tl.float64)
        # The block of pieces as one group: its mean, then M2 around that mean.
        n_b = tl.sum(n_i, axis=0)
        safe_n_b = tl.where(n_b > 0, n_b, 1.0)  # only the padding channels have none
        mean_b = tl.sum(n_i * mean_i, axis=0) / safe_n_b
        dev = mean_i - mean_b[None, :]
        m2_b = tl.sum(m2_i + n_i * dev * dev, axis=0)
        # Chan et al. between blocks.
        total = count + n_b
        frac = n_b / tl.where(total > 0, total, 1.0)
        delta = mean_b - mean
        mean += delta * frac
        m2 += m2_b + delta * delta * count * frac
        count = total
    # Clamp a rounding-negative M2 to 0, but keep a NaN (tl.maximum would drop it): an inf
    # in the batch makes the variance NaN, as torch's is.
    var = tl.where(m2 < 0, 0.0, m2) / tl.where(count > 0, count, 1.0)
    out_ty = mean_ptr.dtype.element_ty
    var_out = var.to(out_ty)
    # invstd of the variance as stored, as reference.invstd_of(var, eps) computes it.
    eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)
    invstd = 1.0 / tl.sqrt(var_out.to(tl.float64) + eps)
    tl.store(mean_ptr + c, mean.to(out_ty), mask=valid_c)
    tl.store(var_ptr + c, var_out, mask=valid_c)
    tl.store(invstd_ptr + c, invstd.to(out_ty), mask=valid_c)


# ---------------------------------------------------------------------------------------
# The fused epilogue (training after the statistics, and eval).


@triton.jit
def normalize_kernel(
    x_ptr, z_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
    N, C, S, stride_n, stride_c, tiles_s, tiles, tiles_per_piece,  # the walk: see _tile
    slope_hi, slope_lo,
    HAS_Z: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """y = act((x - mean) * invstd * weight + bias [+ z]), computed in ACC, stored in y's
    dtype. z (the residual) has x's layout but may have its own dtype."""
    c0, unused_piece, first, last = _program_piece(tiles, tiles_per_piece, BLOCK_C)
    mean, unused_invstd, scale, shift = _coefficients(
        c0, C, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C
    )
    for t in range(first, last):
        offsets, mask, unused_count = _tile(
            t, c0, N, C, S, stride_n, stride_c, tiles_s, BLOCK_N, BLOCK_C, BLOCK_S
        )
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        pre = (x - _bcast(mean)) * _bcast(scale) + _bcast(shift)
        if HAS_Z:
            pre += tl.load(z_ptr + offsets, mask=mask, other=0.0).to(ACC)
        y = _activate(pre, ACTIVATION, slope_hi, slope_lo)
        tl.store(y_ptr + offsets, _out(y, y_ptr, BF16_BY_HAND), mask=mask)


# ---------------------------------------------------------------------------------------
# Running statistics.


@triton.jit
def running_update_kernel(
    running_mean_ptr, running_var_ptr, mean_ptr, var_ptr, C,
    momentum_hi, momentum_lo, bessel_num, bessel_den,
    BLOCK: tl.constexpr,
):
    """In place, in float64: running = (1 - momentum) * running + momentum * new, with
    new = var * bessel_num / bessel_den for the variance (reference.update_running_stats)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = c < C
    momentum = tl.cast(momentum_hi, tl.float64) + tl.cast(momentum_lo, tl.float64)
    # tl.cast, not .to(): compiled Triton passes an int argument equal to 1 as a constant
    bessel = tl.cast(bessel_num, tl.float64) / tl.cast(bessel_den, tl.float64)
    old_mean = tl.load(running_mean_ptr + c, mask=valid, other=0.0).to(tl.float64)
    old_var = tl.load(running_var_ptr + c, mask=valid, other=0.0).to(tl.float64)
    mean = tl.load(mean_ptr + c, mask=valid, other=0.0).to(tl.float64)
    var = tl.load(var_ptr + c, mask=valid, other=0.0).to(tl.float64) * bessel
    new_mean = old_mean * (1.0 - momentum) + mean * momentum
    new_var = old_var * (1.0 - momentum) + var * momentum
    tl.store(running_mean_ptr + c, new_mean.to(running_mean_ptr.dtype.element_ty), mask=valid)
    tl.store(running_var_ptr + c, new_var.to(running_var_ptr.dtype.element_ty), mask=valid)
