"""A float's IEEE-754 bits as an integer and back, in Numba's compiled code: LLVM bit casts,
which cost no instruction. The float32 exp of jit.py builds 2^k and reads its rounded k from
them, and halves.py converts float16 by integer operations with them."""

from __future__ import annotations

from numba.core import types as nbtypes
from numba.extending import intrinsic


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


@intrinsic
def _bits_of(typingctx, value):
    """The IEEE-754 bits of a float32 as an int32 (the inverse of _float_from_bits)."""
    if value != nbtypes.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(nbtypes.int32))

    return nbtypes.int32(value), codegen
