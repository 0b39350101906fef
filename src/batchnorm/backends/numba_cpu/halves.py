"""Loads and stores of every dtype the kernels read and write, half precision included.

Numba has no float16 or bfloat16 on CPU, so the kernels see a half-precision tensor as an
array of 16-bit integers: ``uint16`` for bfloat16 and ``int16`` for float16 (the two dtypes
need different conversions, and the integer type is what tells them apart at compile
time). ``_ld`` turns an element into the dtype the kernels compute in (float32 for both
halves, the element itself for float32 and float64), ``_st`` rounds a computed value to an
array's element type. Both are exact: every half value loads to the float32 of the same
value, and a store rounds to the nearest half value, ties to even, as torch's ``.to()``
does (overflow gives inf, NaN stays NaN). bfloat16 is the upper half of a float32, so its
conversions are a shift and an integer rounding. float16 converts in hardware where the
CPU has the instructions (x86 F16C, every aarch64): LLVM's ``fpext``/``fptrunc`` to
``half``; elsewhere by integer operations, 10-20x slower (measured: 0.4 against 0.04 ns
per value stored on a Zen 5 core). All of them vectorize.
"""

from __future__ import annotations

import platform

import llvmlite.binding as llvm
import numpy as np
import torch
from llvmlite import ir
from numba import njit
from numba.core import types as nbtypes
from numba.extending import intrinsic, overload

from batchnorm.backends.numba_cpu.bits import _bits_of, _float_from_bits
from batchnorm.backends.numba_cpu.jit import _HELPER

#: Per torch dtype: an empty array whose type tells the kernels how its elements are stored
#: (the 16-bit integer views of the halves, see above), and one of the dtype they compute in.
STORAGE = {
    torch.float32: np.empty(0, np.float32),
    torch.float64: np.empty(0, np.float64),
    torch.bfloat16: np.empty(0, np.uint16),
    torch.float16: np.empty(0, np.int16),
}
COMPUTE = {dtype: np.empty(0, np.float64 if dtype == torch.float64 else np.float32)
           for dtype in STORAGE}  # fmt: skip


def _native_float16() -> bool:
    """Whether LLVM converts float16 <-> float32 with instructions here (not library calls,
    which numba's JIT may not link)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        return bool(llvm.get_host_cpu_features().get("f16c"))
    except RuntimeError:  # no feature list on this host
        return False


NATIVE_FLOAT16 = _native_float16()


_I32 = ir.IntType(32)


@intrinsic
def _widen(typingctx, bits):
    """The float32 of a half value given by its bits: uint16 for bfloat16 (the upper half of
    a float32), int16 for float16 (LLVM's fpext from half: see NATIVE_FLOAT16)."""
    if bits not in (nbtypes.uint16, nbtypes.int16):
        return None
    bfloat = bits == nbtypes.uint16

    def codegen(context, builder, signature, args):
        if bfloat:
            upper = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(upper, ir.FloatType())
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return nbtypes.float32(bits), codegen


@intrinsic
def _narrow(typingctx, value, like):
    """The bits of float32 ``value`` rounded to the half type of the scalar ``like`` (uint16:
    bfloat16, int16: float16), to nearest, ties to even. float16: LLVM's fptrunc to half.
    bfloat16, in LLVM IR on 32-bit integers (numba's own integer arithmetic would widen to
    64 bits, half the values per vector instruction): add just under half an ulp plus the
    kept lowest bit, keep the upper half; a NaN keeps its sign and upper mantissa and is
    made quiet."""
    if value != nbtypes.float32 or like not in (nbtypes.uint16, nbtypes.int16):
        return None
    bfloat = like == nbtypes.uint16

    def codegen(context, builder, signature, args):
        v = args[0]
        if not bfloat:
            return builder.bitcast(builder.fptrunc(v, ir.HalfType()), ir.IntType(16))
        bits = builder.bitcast(v, _I32)
        upper = builder.lshr(bits, ir.Constant(_I32, 16))
        odd = builder.and_(upper, ir.Constant(_I32, 1))
        up = builder.add(builder.add(bits, ir.Constant(_I32, 0x7FFF)), odd)
        quiet = builder.or_(upper, ir.Constant(_I32, 0x40))
        is_nan = builder.fcmp_unordered("uno", v, v)
        chosen = builder.select(is_nan, quiet, builder.lshr(up, ir.Constant(_I32, 16)))
        return builder.trunc(chosen, ir.IntType(16))

    return like(value, like), codegen


# float16 by integer operations, where the CPU has no conversion instructions.


@njit(inline="always", **_HELPER)
def _f16_load(h):
    # Written without branches that assign (numba's inliner warns about those): each case's
    # bits are computed and the right ones picked by 0/1 factors.
    bits = np.int64(h) & 0xFFFF
    sign = (bits & 0x8000) << 16
    exponent, mantissa = bits & 0x7C00, bits & 0x3FF
    # a normal number: re-bias the exponent from 15 to 127, widen the mantissa
    normal = ((bits & 0x7FFF) << 13) + ((127 - 15) << 23)
    special = 0x7F800000 | (mantissa << 13)  # inf and NaN keep their mantissa
    # zero and subnormals: mantissa * 2^-24, exact in float32
    tiny = np.int64(_bits_of(np.float32(np.int32(mantissa)) * np.float32(2.0**-24)))
    is_special, is_tiny = np.int64(exponent == 0x7C00), np.int64(exponent == 0)
    wide = normal + is_special * (special - normal) + is_tiny * (tiny - normal)
    return _float_from_bits(np.int32(sign | wide))


@njit(inline="always", **_HELPER)
def _f16_store(v):
    # Branch-free as _f16_load (branches here would also keep the loops from vectorizing).
    bits = np.int64(_bits_of(np.float32(v))) & 0xFFFFFFFF
    sign = (bits >> 16) & 0x8000
    size = bits & 0x7FFFFFFF
    # normal: re-bias the exponent from 127 to 15 and round the 13 dropped bits to nearest
    # even (a carry into the exponent is the right result)
    normal = (size - ((127 - 15) << 23) + 0xFFF + ((size >> 13) & 1)) >> 13
    # below 2^-14, a subnormal half: the 24-bit mantissa in units of 2^-24, rounded the same
    # way; float32 zeros and subnormals drop 31 bits, which leaves 0
    drop = min(max(126 - (size >> 23), 1), 31)
    mantissa = (size & 0x7FFFFF) | 0x800000
    kept = mantissa >> drop
    rest = mantissa - (kept << drop)
    halfway = np.int64(1) << (drop - 1)
    tiny = kept + (np.int64(rest > halfway) | (np.int64(rest == halfway) & kept & 1))
    half = normal + np.int64(size < 0x38800000) * (tiny - normal)
    half += np.int64(size >= 0x477FF000) * (0x7C00 - half)  # 65520 and above round to inf
    half += np.int64(size > 0x7F800000) * (0x7E00 - half)  # NaN
    return np.int16(sign | half)


def _ld(v):
    """An element as a value of the compute dtype (see the module docstring)."""
    return v


@overload(_ld, inline="always")
def _ld_overload(v):
    if v == nbtypes.uint16 or (v == nbtypes.int16 and NATIVE_FLOAT16):
        return lambda v: _widen(v)
    if v == nbtypes.int16:
        return lambda v: _f16_load(v)
    if v in (nbtypes.float32, nbtypes.float64):
        return lambda v: v
    return None


def _is_half(a):
    """Whether the array ``a`` holds half-precision values: a constant of the compiled
    kernel (as jit._given). The epilogues run plain BN of halves (no activation, no
    residual) in a loop of its own: the conversions make that loop compute-bound, and
    without the activation's selects it took 0.75-0.95x the time (same-process A/B, one
    thread, (32768, 128) and (4096, 1024), bfloat16 and float16). A float32 loop waits on
    memory, and the same split did not make it faster."""
    return a.itemsize == 2


@overload(_is_half, inline="always")
def _is_half_overload(a):
    half = a.dtype in (nbtypes.uint16, nbtypes.int16)
    return lambda a: half


def _st(v, out):
    """v rounded to the element type of the array ``out``."""
    return v


@overload(_st, inline="always")
def _st_overload(v, out):
    if out.dtype == nbtypes.uint16:
        return lambda v, out: _narrow(np.float32(v), np.uint16(0))
    if out.dtype == nbtypes.int16:
        if NATIVE_FLOAT16:
            return lambda v, out: _narrow(np.float32(v), np.int16(0))
        return lambda v, out: _f16_store(v)
    if out.dtype in (nbtypes.float32, nbtypes.float64):
        return lambda v, out: v
    return None
