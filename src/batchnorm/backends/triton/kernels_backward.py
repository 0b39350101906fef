"""Triton kernels for batch norm, backward: dweight, dbias, dx (and dpre).

They walk the data as the forward kernels do, with the same layouts, tiles and 2-D grid
(channel blocks, pieces), and share their helpers: see :mod:`.kernels_forward` for the
design, and for how float scalars are passed (hi + lo float32 halves).

Backward, for one (channel block, piece): per-channel partial sums of dpre and
dpre * xhat, where dpre = dL/d(pre-activation) is recomputed from x (and the residual),
never stored; float64 sums of the partials give dbias and dweight; a last pass writes dx
(and dpre when the residual needs its gradient), recomputing dpre again.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.backends.triton.kernels_forward import (
    _bcast,
    _coefficients,
    _out,
    _per_channel_sum,
    _pieces_block,
    _program_piece,
    _tile,
)

# ---------------------------------------------------------------------------------------
# Helpers (inlined into the kernels).


@triton.jit
def _activation_grad(dy, pre, ACTIVATION: tl.constexpr, slope_hi, slope_lo):
    """dL/dpre from dL/dy at the pre-activation ``pre`` (reference.activation_grad)."""
    if ACTIVATION == "relu":
        # pre <= 0 rather than pre > 0: at a NaN pre torch passes dy (its test is x <= 0)
        out = tl.where(pre <= 0, tl.zeros_like(dy), dy)
    elif ACTIVATION == "leaky_relu":
        out = tl.where(pre > 0, dy, dy * slope_hi + dy * slope_lo)
    elif ACTIVATION == "silu":
        sig = 1.0 / (1.0 + tl.exp(-pre))
        out = dy * sig * (1.0 + pre * (1.0 - sig))
    elif ACTIVATION == "elu":
        out = tl.where(pre > 0, dy, dy * tl.exp(tl.where(pre > 0, 0.0, pre)))
    else:  # identity
        out = dy
    return out


# ---------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _dpre_and_xhat(
    t, c0, N, C, S, stride_n, stride_c, tiles_s,  # tile t of the walk: see _tile
    dy_ptr, x_ptr, z_ptr, mean, invstd, scale, shift, slope_hi, slope_lo,
    HAS_Z: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Tile t's offsets and mask, dL/dpre (recomputing pre from x and z) and xhat; dpre and
    xhat are 0 off the array."""
    offsets, mask, unused_count = _tile(
        t, c0, N, C, S, stride_n, stride_c, tiles_s, BLOCK_N, BLOCK_C, BLOCK_S
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
    # Zero off the array: padding must add nothing to the sums, and exp() of a padding
    # lane's pre-activation must not overflow.
    centred = tl.where(mask, x - _bcast(mean), 0.0)
    xhat = centred * _bcast(invstd)
    if ACTIVATION == "identity":
        dpre = dy
    else:
        pre = centred * _bcast(scale) + _bcast(shift)
        if HAS_Z:
            pre += tl.load(z_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dpre = _activation_grad(dy, pre, ACTIVATION, slope_hi, slope_lo)
    return offsets, mask, dpre, xhat


@triton.jit
def grad_partial_kernel(
    dy_ptr, x_ptr, z_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
    sum_dpre_ptr, sum_dpre_xhat_ptr,  # (pieces, C) out
    N, C, S, stride_n, stride_c, tiles_s, tiles, tiles_per_piece,  # the walk: see _tile
    slope_hi, slope_lo,
    HAS_Z: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per-piece sums of dpre and dpre * xhat, into row ``piece`` of (pieces, C) arrays."""
    c0, piece, first, last = _program_piece(tiles, tiles_per_piece, BLOCK_C)
    mean, invstd, scale, shift = _coefficients(
        c0, C, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C
    )
    sum_dpre = tl.zeros([BLOCK_C], ACC)
    sum_dpre_xhat = tl.zeros([BLOCK_C], ACC)
    for t in range(first, last):
        offsets, mask, dpre, xhat = _dpre_and_xhat(
            t, c0, N, C, S, stride_n, stride_c, tiles_s, dy_ptr, x_ptr, z_ptr, mean, invstd,
            scale, shift, slope_hi, slope_lo, HAS_Z, ACTIVATION, ACC, BLOCK_N, BLOCK_C, BLOCK_S,
        )
        sum_dpre += _per_channel_sum(dpre)
        sum_dpre_xhat += _per_channel_sum(dpre * xhat)
    c = c0 + tl.arange(0, BLOCK_C)
    out = piece.to(tl.int64) * C + c
    tl.store(sum_dpre_ptr + out, sum_dpre, mask=c < C)
    tl.store(sum_dpre_xhat_ptr + out, sum_dpre_xhat, mask=c < C)


@triton.jit
def grad_merge_kernel(
    part_dpre_ptr, part_dpre_xhat_ptr,  # (pieces, C) in
    dbias_ptr, dweight_ptr,  # (C,) out
    pieces, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dbias = sum(dpre) and dweight = sum(dpre * xhat): the pieces' partials summed in
    float64, stored in the statistics dtype."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid_c = c < C
    dbias = tl.zeros([BLOCK_C], tl.float64)
    dweight = tl.zeros([BLOCK_C], tl.float64)
    for p0 in range(0, pieces, BLOCK_P):
        at, mask = _pieces_block(p0, pieces, c, C, BLOCK_P)
        dbias += tl.sum(tl.load(part_dpre_ptr + at, mask=mask, other=0.0).to(tl.float64), 0)
        dweight += tl.sum(tl.load(part_dpre_xhat_ptr + at, mask=mask, other=0.0).to(tl.float64), 0)
    tl.store(dbias_ptr + c, dbias.to(dbias_ptr.dtype.element_ty), mask=valid_c)
    tl.store(dweight_ptr + c, dweight.to(dweight_ptr.dtype.element_ty), mask=valid_c)


@triton.jit
def grad_input_kernel(
    dy_ptr, x_ptr, z_ptr, dx_ptr, dpre_ptr,
    mean_ptr, invstd_ptr, weight_ptr, bias_ptr, dbias_ptr, dweight_ptr, count,
    N, C, S, stride_n, stride_c, tiles_s, tiles, tiles_per_piece,  # the walk: see _tile
    slope_hi, slope_lo,
    HAS_Z: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, TRAINING: tl.constexpr, WRITE_DPRE: tl.constexpr,
    ACC: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx = scale * (dpre - dbias / M - xhat * dweight / M) in training (the gradient goes
    through mean and var), dx = scale * dpre in eval; scale = invstd * weight, M = count.
    With WRITE_DPRE, also stores dpre (in dpre_ptr's dtype)."""
    c0, unused_piece, first, last = _program_piece(tiles, tiles_per_piece, BLOCK_C)
    mean, invstd, scale, shift = _coefficients(
        c0, C, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C
    )
    if TRAINING:
        c = c0 + tl.arange(0, BLOCK_C)
        m = count.to(ACC)
        mean_dpre = tl.load(dbias_ptr + c, mask=c < C, other=0.0).to(ACC) / m
        mean_dpre_xhat = tl.load(dweight_ptr + c, mask=c < C, other=0.0).to(ACC) / m
    for t in range(first, last):
        offsets, mask, dpre, xhat = _dpre_and_xhat(
            t, c0, N, C, S, stride_n, stride_c, tiles_s, dy_ptr, x_ptr, z_ptr, mean, invstd,
            scale, shift, slope_hi, slope_lo, HAS_Z, ACTIVATION, ACC, BLOCK_N, BLOCK_C, BLOCK_S,
        )
        if TRAINING:
            dx = (dpre - _bcast(mean_dpre) - xhat * _bcast(mean_dpre_xhat)) * _bcast(scale)
        else:
            dx = dpre * _bcast(scale)
        tl.store(dx_ptr + offsets, _out(dx, dx_ptr, BF16_BY_HAND), mask=mask)
        if WRITE_DPRE:
            tl.store(dpre_ptr + offsets, _out(dpre, dpre_ptr, BF16_BY_HAND), mask=mask)
