"""What the Numba kernels of both layouts share: compilation options, the serial/parallel
pair of each kernel, tensors passed as addresses, the activations and their gradients (with
a vectorizable exp), and the per-channel coefficients. See the package's docstring."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
import types

import numba
import numpy as np
import torch
from numba import njit
from numba.core import types as nbtypes
from numba.extending import intrinsic, overload

from batchnorm._cache import cache_root
from batchnorm.backends.numba_cpu.bits import _bits_of, _float_from_bits

# Floating-point flags: re-association only. It lets LLVM vectorize the per-piece sums
# (about 10x faster than a sequential float sum), which changes only the order in which at
# most CHUNK (cf) or MAX_BLOCK_ROWS (cl) values are added before the float64 merge. No other
# fast-math flag: NaN and Inf propagate as in torch, and exp and division stay IEEE.
FASTMATH = {"reassoc"}

#: Activation codes passed to the kernels (the names are those of reference.ACTIVATIONS).
ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}
_IDENTITY, _SILU = 0, 3

#: cf: values of one row summed as one piece, in the compute dtype, before the float64 merge.
CHUNK = 4096
#: cl: rows in one block, whose per-channel sums add this many terms in the compute dtype
#: before the float64 merge (each pass reads a block once: it need not fit a cache).
MAX_BLOCK_ROWS = 256
#: Inputs with fewer values run serially (see _Kernel). Measured on 2 cores: around this
#: size the parallel kernels' thread wake-ups cost about as much as the second core saves.
SERIAL_BELOW = 1 << 16


class _Kernel:
    """One kernel compiled twice: with ``parallel=True`` and serially (prange runs as range).

    Below SERIAL_BELOW values the serial one runs: waking threads costs a few µs per parallel
    loop, more than the work of a small layer. Both are cached on disk under names of their
    own, which carry HELPERS_STAMP."""

    def __init__(self, fn) -> None:
        def renamed(suffix: str):
            copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix)
            copy.__qualname__ = fn.__qualname__ + suffix
            return copy

        options = {**_HELPER, "nogil": True}
        self.parallel = njit(parallel=True, **options)(renamed(f"_{HELPERS_STAMP}"))
        self.serial = njit(**options)(renamed(f"_serial_{HELPERS_STAMP}"))
        self.__doc__ = fn.__doc__

    def pick(self, numel: int):
        """(compiled variant, threads) for an input of ``numel`` values."""
        threads = 1 if numel < SERIAL_BELOW or _forked_child else _sync_threads()
        return (self.serial, 1) if threads == 1 else (self.parallel, threads)


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def _enable_cache() -> bool:
    """Whether the compiled kernels can be cached on disk (else they compile in each process).

    Numba caches next to this file, or where NUMBA_CACHE_DIR says, and refuses to compile at
    all (at import time) when neither is writable, as in a read-only container or a shared
    install. Then the cache goes to the user's cache folder or the temp folder instead."""
    if numba.config.CACHE_DIR or _writable(os.path.join(os.path.dirname(__file__), "__pycache__")):
        return True
    for folder in (
        str(cache_root() / "numba"),
        os.path.join(tempfile.gettempdir(), f"batchnorm-numba-{os.getuid()}"),
    ):
        if _writable(folder):
            numba.config.CACHE_DIR = folder
            return True
    return False


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
#: Options of the helpers in the kernel modules: not cached themselves, since they are
#: compiled into the kernels that call them.
INLINE = {"fastmath": FASTMATH, "error_model": "numpy"}
#: Options of this module's own compiled functions and of the kernels (cached on disk).
_HELPER = {**INLINE, "cache": _enable_cache()}

#: Numba keys a cached function by the content of its own source file only; the kernels
#: compile in the helpers of this file, halves.py and bits.py, so their cache names carry
#: the hash of the three.
_STAMPED = [os.path.join(os.path.dirname(__file__), f) for f in ("jit.py", "halves.py", "bits.py")]
_digest = hashlib.sha256()
for _path in _STAMPED:
    with open(_path, "rb") as _source:
        _digest.update(_source.read())
HELPERS_STAMP = _digest.hexdigest()[:12]


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


@njit(inline="always", **_HELPER)
def _vectors(stats, channels, mean_at, invstd_at, weight_at, bias_at, has_weight, has_bias):
    """The per-channel vectors of a kernel: mean, invstd, weight and bias (the latter two
    views of mean when absent, never read then), all of the statistics' dtype."""
    vector = (channels,)
    mean, invstd = _view(mean_at, stats, vector), _view(invstd_at, stats, vector)
    weight = _view(weight_at if has_weight else mean_at, stats, vector)
    bias = _view(bias_at if has_bias else mean_at, stats, vector)
    return mean, invstd, weight, bias


def _given(address):
    """Whether an optional tensor (the residual) was given: its address, or None. A constant
    of the compiled kernel: called without a residual, a kernel compiles without its loads
    (as a run-time flag it cost the loops 7-17% in bfloat16 and up to 43% of a float32
    relu backward in cache, same-process A/B on 2 threads)."""
    return address is not None


@overload(_given, inline="always")
def _given_overload(address):
    given = not isinstance(address, nbtypes.NoneType)
    return lambda address: given


def _given_or(address, default):
    """``address`` if it was given (see _given), else ``default``."""
    return default if address is None else address


@overload(_given_or, inline="always")
def _given_or_overload(address, default):
    if isinstance(address, nbtypes.NoneType):
        return lambda address, default: default
    return lambda address, default: address


# Activations. identity, relu and leaky_relu are one piecewise-linear map with slope `neg`
# below zero (1, 0 and negative_slope), its pieces chosen by selects: no branch inside the
# loops, so they vectorize. silu is the other side of a test on the activation's code,
# the same for every element, which LLVM moves out of the loops (see _act).


@intrinsic
def _select(typingctx, condition, if_true, if_false):
    """``if_true if condition else if_false`` as one LLVM select, without a branch. Written
    as an if-expression, the gradient of relu took branches that LLVM did not turn back
    into selects inside the backward loops, which then did not vectorize (measured: the
    fused BN+ReLU backward 1.5x slower than plain batch norm's)."""
    if if_true != if_false:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])

    return if_true(condition, if_true, if_false), codegen


@njit(**_HELPER)
def _linear_act(v, neg):
    """v if v > 0 (or NaN, as torch.relu keeps it), else v * neg; relu(-inf) is 0. (A
    leaky_relu of slope 0, whose -inf gives NaN in torch, is not given to these kernels.)"""
    slope = neg != 0
    return _select(not v <= 0, v, _select(slope, v * neg, neg))


@njit(**_HELPER)
def _linear_grad(dy, pre, neg):
    """dL/dpre of _linear_act, as torch: relu gives exactly 0 where pre <= 0 and dy
    elsewhere (a NaN pre included); leaky_relu gives dy where pre > 0, else dy * neg."""
    slope = neg != 0
    below = _select(slope, not pre > 0, pre <= 0)  # the two tests differ at a NaN pre
    return _select(below, _select(slope, dy * neg, neg), dy)


# exp, vectorizable. np.exp compiles to a call of libm's scalar exp (numba vectorizes it only with
# Intel's SVML), which made a fused SiLU 4-5x slower than BN + torch's SiLU. This one is a range
# reduction, exp(v) = 2^k exp(r) with |r| <= ln2 / 2, a polynomial of exp(r) accurate to an ulp
# (in float32 one fitted to it, within 8.7e-8 of exp in a sweep of 3 million points; in float64
# Taylor's), and 2^k built from its bits. LLVM inlines it into the loops (else they would not
# vectorize), compiled with their one flag, re-association: the reduction is v - k ln2 in
# float64, and in float32 two fused multiply-adds with ln2 in two parts (float32 throughout:
# twice the lanes of float64 per vector; within an ulp in float32, 1e-13 relative in float64,
# where |k| <= 1023 scales ln2's rounding). v is clamped where exp would overflow or become
# subnormal: silu and its gradient there differ from exact by less than 1e-36 (float32) or
# 1e-300 (float64), and a NaN still propagates through silu's other factors.

#: 1/n! for n = 13 .. 0: Taylor coefficients of exp, in Horner's order.
_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(13, -1, -1))
_LN2 = math.log(2.0)


#: ln2 = _LN2_HI32 + _LN2_LO32 in float32, the first with 9 significant bits, so that
#: k * _LN2_HI32 is exact for the |k| <= 127 of float32 (Cody and Waite's reduction).
_LN2_HI32 = np.float32(0.693359375)
_LN2_LO32 = np.float32(_LN2 - 0.693359375)
_INV_LN2_32 = np.float32(1.0 / _LN2)


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once: LLVM's fma, whose parts the re-association flag cannot
    regroup (it could (v - k hi) - k lo into v - k (hi + lo), undoing the reduction)."""
    if not (a == b == c and isinstance(a, nbtypes.Float)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


#: 1.5 * 2^23: a float32 of magnitude below 2^22 added to it is rounded to an integer, which
#: the sum's low mantissa bits hold (no rounding or conversion instruction).
_ROUND32 = np.float32(12582912.0)
#: exp(r) = 1 + r (c[0] + r (c[1] + ...)) on [-ln2 / 2, ln2 / 2]: a polynomial of degree 6
#: fitted to it (relative error 2e-9 in exact arithmetic), in Horner's order from the top.
_EXP32 = tuple(np.float32(c) for c in (1.3846145e-3, 8.3741201e-3, 0.041667961, 0.16666432,
                                         0.49999994, 1.0, 1.0))  # fmt: skip


@njit(**_HELPER)
def _exp32(v):
    v = min(max(v, np.float32(-87.0)), np.float32(88.0))
    shifted = _fma(v, _INV_LN2_32, _ROUND32)  # k rounded to nearest, in its low bits
    k = shifted - _ROUND32
    r = _fma(-k, _LN2_LO32, _fma(-k, _LN2_HI32, v))
    # Horner's form in fused multiply-adds (the flag does not contract; with a multiply and an
    # add a step SiLU's loops took 1.2-1.7x the time), written out (a loop would keep the
    # caller's from vectorizing); 2^k from shifted's bits, 0x4B400000 + k, of which the low 8
    # bits hold k + 127. (Through np.floor and an int32 conversion of k, with Taylor's
    # polynomial to degree 7 as in _exp64, a fused SiLU's NCHW forward + backward took 1-6 %
    # longer: float32, (8,64,48,48) to (64,256,28,28), one and two threads, 2026-12-05.)
    t, f = _EXP32, _fma
    p = f(f(f(f(f(f(t[0], r, t[1]), r, t[2]), r, t[3]), r, t[4]), r, t[5]), r, t[6])
    return p * _float_from_bits(np.int32(((_bits_of(shifted) + 127) & 255) << 23))


@njit(**_HELPER)
def _exp64(v):
    v = min(max(v, -708.0), 709.0)
    k = np.floor(v * (1.0 / _LN2) + 0.5)
    r = v - k * _LN2
    t, f = _TAYLOR, _fma  # Taylor to degree 13, in the written-out form of _exp32
    p = f(f(f(f(f(f(f(t[0], r, t[1]), r, t[2]), r, t[3]), r, t[4]), r, t[5]), r, t[6]), r, t[7])
    p = f(f(f(f(f(f(p, r, t[8]), r, t[9]), r, t[10]), r, t[11]), r, t[12]), r, t[13])
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


@njit(**_HELPER)
def _silu(v):
    """v * sigmoid(v); at v = -inf torch's product is -inf * 0 = NaN, and so is v - v."""
    # np.float32(1) keeps v's dtype, where a bare 1 would promote float32 to float64
    return _select(v > -np.inf, v / (np.float32(1) + _exp(-v)), v - v)


@njit(**_HELPER)
def _silu_grad(dy, pre):
    """dy * s * (1 + pre * (1 - s)) with s = sigmoid(pre); NaN at pre = -inf, as torch."""
    s = np.float32(1) / (np.float32(1) + _exp(-pre))
    grad = dy * s * (np.float32(1) + pre * (np.float32(1) - s))
    return _select(pre > -np.inf, grad, pre - pre)


# The per-element math of both layouts, with pre = (x - mean) * scale + shift [+ z] and
# xc = x - mean. The tests on act and training are the same for every element of a loop:
# LLVM moves them out of it (loop unswitching), and each variant vectorizes as if written
# out on its own (measured: as fast as the hand-written variants). has_z is a constant of
# the compiled kernel (see _given).
# These scalar helpers are functions that LLVM inlines into the loops before vectorizing:
# numba's inline="always" copied their IR into every call site, and the channels-first
# kernels compiled 1.4-1.9x longer so (cf_backward float32: 11.7 s against 7.8 s parallel,
# 4.9 against 2.6 serial) into loops as fast (same-process A/B, 2 threads).


# Identity is the linear activation of slope 1 (the backend passes neg = 1): only silu is
# a test between formulas. LLVM splits a loop on a test that is the same for all its
# elements (loop unswitching) only while the loop is small, so each further test risked a
# scalar loop (measured: the bfloat16 epilogue, whose conversions make the loop larger, ran
# 10x slower so).


@njit(**_HELPER)
def _pre(xc, scale, shift, z, has_z):
    # -0.0 is the exact identity of addition (+0.0 would turn a -0.0 into +0.0)
    return xc * scale + shift + (z if has_z else np.float32(-0.0))


@njit(**_HELPER)
def _act(pre, act, neg):
    """The activation of code ``act`` (see ACTIVATION_CODES) at ``pre``."""
    return _silu(pre) if act == _SILU else _linear_act(pre, neg)


@njit(**_HELPER)
def _dpre(dy, pre, act, neg):
    """dL/dpre from dL/dy for the activation of code ``act``."""
    return _silu_grad(dy, pre) if act == _SILU else _linear_grad(dy, pre, neg)


@njit(**_HELPER)
def _centred_dpre(dy, x, z, mean, scale, shift, act, neg, has_z):
    """(x - mean, dL/dpre) of one value, dL/dpre from dL/dy with pre recomputed. Values in,
    not arrays and indices: an index passed into a helper loses numba's knowledge that it
    is not negative, and the test it then adds keeps the loop from vectorizing."""
    xc = x - mean
    return xc, _dpre(dy, _pre(xc, scale, shift, z, has_z), act, neg)


@njit(**_HELPER)
def _dx(dpre, xc, scale, k0, k2, training):
    """dx = scale * dpre + k0 + k2 * (x - mean) (see _grad_coefficients); in eval mode, where
    k0 = k2 = 0, x does not enter (an infinite x keeps dx finite). Written as a choice of
    one operand, not of two formulas: LLVM then selects instead of splitting the loop, which
    it does for a few invariant tests only (measured: a loop that also tested act and a
    run-time has_z stayed scalar, 5x slower)."""
    return scale * dpre + k0 + k2 * (xc if training else k2)


@njit(inline="always", **_HELPER)
def _channel_coefficients(c, invstd, weight, bias, has_weight, has_bias):
    """Channel c's (scale, shift) of pre = (x - mean) * scale + shift."""
    scale = invstd[c] * weight[c] if has_weight else invstd[c]
    shift = bias[c] if has_bias else invstd.dtype.type(0)
    return scale, shift


@njit(**_HELPER)
def _coefficients(mean, invstd, weight, bias, has_weight, has_bias):
    """Per-channel (scale, shift) of pre = (x - mean) * scale + shift, in x's dtype."""
    scale = np.empty_like(invstd)
    shift = np.empty_like(invstd)
    for c in range(scale.shape[0]):
        scale[c], shift[c] = _channel_coefficients(c, invstd, weight, bias, has_weight, has_bias)
    return scale, shift


@njit(inline="always", **_HELPER)
def _merge_stats(piece_mean, piece_m2, lengths, c, count):
    """(mean, var, invstd) of channel c in float64 from its pieces' (count, mean, M2):
    piece_*[a, c, b], of lengths[a, b] values. The count-weighted mean, then
    M2 = sum(M2_p + n_p (mean_p - mean)^2). Summing means (rather than Chan's running
    update) keeps an infinite piece's mean infinite, as torch's is. (The kernels call it in
    their own prange over the channels.)"""
    outer, _, inner = piece_mean.shape
    total = 0.0
    for a in range(outer):
        for b in range(inner):
            total += piece_mean[a, c, b] * lengths[a, b]
    mean = total / count
    m2 = 0.0
    for a in range(outer):
        for b in range(inner):
            delta = piece_mean[a, c, b] - mean
            m2 += piece_m2[a, c, b] + lengths[a, b] * delta * delta
    return mean, m2 / count


@njit(**_HELPER)
def _finish_stats(c, mean64, var64, eps, mean, var, invstd):
    """Channel c's mean, var and invstd in the statistics' dtype (invstd of the rounded var).

    Not inlined on purpose: numba's parallel pass drops stores, in a prange, to an array that
    the kernel does not read afterwards (var: its stores vanished, measured with numba
    0.68); a call it cannot see into keeps them."""
    mean[c] = mean64
    var[c] = var64
    invstd[c] = 1.0 / np.sqrt(var[c] + eps)


@njit(**_HELPER)
def _finish_grad_sums(c, sum_g, sum_gx, invstd, dweight, dbias):
    """Channel c's dbias = sum dpre and dweight = sum dpre * xhat. Not inlined, for the
    reason of _finish_stats (a kernel that reads them only in the same iteration of its
    prange lost these stores)."""
    dbias[c] = sum_g
    dweight[c] = sum_gx * invstd[c]


@njit(inline="always", **_HELPER)
def _grad_sums(piece_g, piece_gx, c):
    """Channel c's sum of dpre and of dpre * (x - mean) over its pieces, in float64 (pieces
    laid out as in _merge_stats)."""
    outer, _, inner = piece_g.shape
    g, gx = 0.0, 0.0
    for a in range(outer):
        for b in range(inner):
            g += piece_g[a, c, b]
            gx += piece_gx[a, c, b]
    return g, gx


@njit(inline="always", **_HELPER)
def _piece_stats(s, d1, d2, count):
    """(mean, M2) in float64 of a piece of ``count`` values from its sums d1 = sum(x - s)
    and d2 = sum((x - s)^2) around one of its values s. One pass reads the piece; the sums
    around a value of the piece (not 0) keep the digits of a channel with a large mean
    (mean 1e4, std 1 in float32), and M2 loses at most a factor ``count`` of precision
    whatever s is (s's own deviation is part of M2). No branch, so that a loop over
    channels vectorizes: where s or d1 is not finite the callers take the mean from the
    plain sum instead, as torch does, and M2 is NaN."""
    return s + np.float64(d1) / count, d2 - np.float64(d1) * d1 / count


@njit(**_HELPER)
def _grad_coefficients(scale, invstd, dweight, dbias, count, training):
    """(k0, k2) of dx = scale * dpre + k0 + k2 * (x - mean), which is
    dx = scale * (dpre - dbias / M - xhat * dweight / M); both are zero in eval mode."""
    k0 = np.zeros_like(scale)
    k2 = np.zeros_like(scale)
    if training:
        for c in range(scale.shape[0]):
            k0[c], k2[c] = _channel_grad_coefficients(scale[c], invstd[c], dweight[c],
                                                      dbias[c], count)  # fmt: skip
    return k0, k2


@njit(inline="always", **_HELPER)
def _channel_grad_coefficients(scale, invstd, dweight, dbias, count):
    """One channel's (k0, k2) of _grad_coefficients in training."""
    return -scale * (dbias / count), -scale * invstd * (dweight / count)


def _sync_threads() -> int:
    """Numba's thread count follows torch.get_num_threads(); returns it.

    Numba's OpenMP threading layer shares torch's OpenMP runtime, and launching it (the
    first call of numba.get_num_threads) sets that runtime's thread count to Numba's
    default, all cores: torch's own count, which the user may have set
    (torch.set_num_threads(1)), is put back."""
    wanted = torch.get_num_threads()
    threads = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    # numba's count is per calling thread; asking numba for it costs a µs, hence this copy
    if getattr(_numba_threads, "count", None) != threads:
        if threads != numba.get_num_threads():
            numba.set_num_threads(threads)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        _numba_threads.count = threads
    return threads


#: Per calling thread: the count _sync_threads last gave numba.
_numba_threads = threading.local()


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
