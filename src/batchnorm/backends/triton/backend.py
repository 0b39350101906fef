"""The Triton backend: torch tensors in, kernel launches, torch tensors out.

``TritonBackend`` implements :class:`batchnorm.ops.Backend` (and ``update_running_stats``)
for CUDA tensors of float32, float16 and bfloat16 (float64 works as well), and for tensors
of any device when the kernels were created under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this package was first imported): see :func:`supports`.

Half-precision inputs accumulate in float32 and return their statistics (mean, var, invstd,
dweight, dbias) in float32, as reference.compute_dtype says; outputs (y, dx, dpre) have x's
dtype. Weight, bias and the statistics may have another floating dtype than x (float32
parameters with a float16 x under torch.autocast): the kernels load and convert them.

Layouts: x is used as it is when it is contiguous in channels-first order or in
channels-last order (this covers (N, C)); any other strides are first copied into the
nearer of the two. dy and the residual are brought into x's layout the same way, so one set
of offsets serves every tensor of a call. The grid and tile choices are described in
:mod:`batchnorm.backends.triton.kernels_forward`; ``TritonBackend``'s arguments override them
(the tests use tiny tiles to cross every block boundary on small inputs).
"""

from __future__ import annotations

import contextlib
import functools
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from batchnorm import reference
from batchnorm.backends import Call
from batchnorm.backends.layout import dense_in_layout, like
from batchnorm.backends.triton import kernels_backward, kernels_forward

#: Whether the kernels run in Triton's interpreter (on CPU, with NumPy) rather than compiled
#: for a GPU. Fixed when the kernel modules were imported: ``triton.jit`` reads
#: TRITON_INTERPRET then.
INTERPRETED = not isinstance(kernels_forward.normalize_kernel, triton.runtime.JITFunction)

#: The dtypes :func:`supports` accepts (the kernels also run float64; it stays with ATen and
#: the reference on GPUs, where float64 throughput is low anyway).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

ACTIVATIONS = reference.ACTIVATIONS

#: Every dtype the kernels run (float64 included).
_KERNEL_DTYPES = (*SUPPORTED_DTYPES, torch.float64)

_ACC = {torch.float64: tl.float64}  # every other dtype accumulates in float32

#: Options of every launch. No FMA contraction: each operation rounds on its own, as in the
#: interpreter (NumPy) that the tests run, and as Triton 3.10 will default to (3.9 warns
#: when the option is left unset). The interpreter ignores launch options.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


#: The oldest NVIDIA GPUs the kernels are dispatched to: Ampere (compute capability 8.0),
#: with bfloat16 arithmetic; they were measured on Hopper (9.0). Older GPUs, and AMD GPUs
#: (torch's "cuda" device under ROCm, untested), keep cuDNN/MIOpen and the reference.
MIN_CAPABILITY = (8, 0)


def supports(x: Tensor) -> bool:
    """Whether the Triton backend takes ``x``: float32, float16 or bfloat16 tensors on an
    NVIDIA GPU of MIN_CAPABILITY or later, or on any device when the kernels run in
    Triton's interpreter."""
    if x.dtype not in SUPPORTED_DTYPES:
        return False
    return INTERPRETED or (x.is_cuda and _kernels_run_on(x.device.index))


@functools.cache
def _kernels_run_on(index: int) -> bool:
    """Whether CUDA device ``index`` is an NVIDIA GPU of MIN_CAPABILITY or later."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def split_float(value: float) -> tuple[float, float]:
    """``value`` as hi + lo, two float32 numbers (about 48 bits together).

    Compiled Triton passes a Python float to a kernel as float32; the interpreter passes it
    as float64. The kernels add the two halves in their compute dtype, so a float64 input
    sees the full negative slope, eps or momentum, and both modes compute the same thing."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, float(value - hi)


def _vector(t: Tensor | None, like: Tensor) -> Tensor:
    """A per-channel vector (weight, bias, mean, invstd) as a contiguous tensor on x's
    device; ``like`` stands in for None (the kernels do not read it then)."""
    if t is None:
        return like
    t = t.detach()
    if t.device != like.device:
        t = t.to(like.device)
    return t if t.is_contiguous() else t.contiguous()


def _device_guard(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bf16_by_hand(x: Tensor) -> bool:
    """Round bfloat16 outputs by hand: only under the interpreter (see kernels_forward._out)."""
    return INTERPRETED and x.dtype == torch.bfloat16


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ---------------------------------------------------------------------------------------
# The launch plan.


@dataclass(frozen=True)
class _Plan:
    """How x of kernel shape (N, C, S) is cut: tiles of [block_n, block_c, block_s], grouped
    into pieces of ``tiles_per_piece``; the grid is (channel blocks, pieces)."""

    N: int
    C: int
    S: int
    stride_n: int
    stride_c: int
    block_n: int
    block_c: int
    block_s: int
    tiles_s: int
    tiles: int
    tiles_per_piece: int
    pieces: int

    @property
    def grid(self) -> tuple[int, int]:
        return (triton.cdiv(self.C, self.block_c), self.pieces)

    @property
    def args(self) -> tuple[int, ...]:
        """The shape arguments every data kernel takes, in order."""
        return (self.N, self.C, self.S, self.stride_n, self.stride_c, self.tiles_s,
                self.tiles, self.tiles_per_piece)  # fmt: skip

    @property
    def blocks(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_C": self.block_c, "BLOCK_S": self.block_s}


#: CUDA's limit on the grid's second dimension (the pieces).
_MAX_GRID_Y = 65535


class TritonBackend:
    """Batch norm in Triton kernels (see the module docstrings for the design).

    Arguments tune the tiling; the defaults are meant for GPUs (not tuned yet):

    * ``tile_values``: values per tile and channel block (a power of two);
    * ``block_channels``: channels per tile in channels-last layout (a power of two); in
      channels-first layout a tile takes several channels only when S is short;
    * ``tiles_per_piece``: tiles per program; None picks about ``programs_per_sm`` programs
      per multiprocessor on a GPU, and one piece per channel block in the interpreter
      (where every program runs in turn, so fewer is faster);
    * ``merge_block_pieces`` x ``merge_block_channels``: the block of partials the merge
      kernels add at a time.
    """

    name = "triton"
    operator = False
    #: CUDA GPUs; under Triton's interpreter (TRITON_INTERPRET=1) CPU tensors too.
    devices = ("cuda", "cpu") if INTERPRETED else ("cuda",)

    def supports(self, call: Call) -> bool:
        return supports(call.x)

    def preferred(self, call: Call) -> bool:
        """On a GPU, every call that reaches it: ATen (cuDNN), before it in the dispatch
        order, keeps what it computes faster (backends.aten.cuda_kernels_faster); what it
        leaves is faster here than on the reference (a dozen torch ops). Under the
        interpreter, never: CPU calls keep their own dispatch."""
        return not INTERPRETED

    def __init__(
        self,
        tile_values: int = 2048,
        block_channels: int = 64,
        tiles_per_piece: int | None = None,
        programs_per_sm: int = 8,
        merge_block_pieces: int = 32,
        merge_block_channels: int = 32,
    ) -> None:
        for label, value in [("tile_values", tile_values), ("block_channels", block_channels),
                             ("merge_block_pieces", merge_block_pieces),
                             ("merge_block_channels", merge_block_channels)]:  # fmt: skip
            if value < 1 or value & (value - 1):
                raise ValueError(f"{label} must be a power of two, got {value}")
        self.tile_values = tile_values
        self.block_channels = block_channels
        self.tiles_per_piece = tiles_per_piece
        self.programs_per_sm = programs_per_sm
        self.merge_block_pieces = merge_block_pieces
        self.merge_block_channels = merge_block_channels

    # -- planning ----------------------------------------------------------------------

    def _plan(self, x: Tensor, layout: str) -> _Plan:
        channels = x.shape[1]
        if layout == "cf":
            n, s = x.shape[0], x.numel() // max(x.shape[0] * channels, 1)
            stride_n, stride_c = channels * s, s
            block_s = min(_pow2(s), self.tile_values)
            # Short rows (S < 128): a tile takes several neighbouring channels, so that one
            # tile row still spans ~128 contiguous values.
            block_c = min(_pow2(channels), self.block_channels, max(1, 128 // block_s))
        else:
            n, s = x.numel() // max(channels, 1), 1
            stride_n, stride_c = channels, 1
            block_s = 1
            block_c = min(_pow2(channels), self.block_channels)
        block_n = min(_pow2(n), max(1, self.tile_values // (block_c * block_s)))
        tiles_s = triton.cdiv(s, block_s)
        tiles = triton.cdiv(n, block_n) * tiles_s
        per_piece = self.tiles_per_piece
        if per_piece is None:
            if x.is_cuda and not INTERPRETED:
                programs = self.programs_per_sm * _multiprocessors(x.device.index or 0)
                pieces = max(1, programs // triton.cdiv(channels, block_c))
                per_piece = triton.cdiv(tiles, pieces)
            else:
                per_piece = tiles
        per_piece = max(1, per_piece, triton.cdiv(tiles, _MAX_GRID_Y))
        return _Plan(n, channels, s, stride_n, stride_c, block_n, block_c, block_s, tiles_s,
                     tiles, per_piece, triton.cdiv(tiles, per_piece))  # fmt: skip

    def _merge_grid(self, channels: int) -> tuple[int]:
        return (triton.cdiv(channels, self.merge_block_channels),)

    @property
    def _merge_blocks(self) -> dict[str, int]:
        return {"BLOCK_P": self.merge_block_pieces, "BLOCK_C": self.merge_block_channels}

    # -- the Backend protocol ------------------------------------------------------------

    def forward_train(self, x, weight, bias, residual, eps, activation, negative_slope):
        """(y, mean, biased var, invstd) of a batch with at least one value per channel."""
        _check_activation(activation)
        layout, x = dense_in_layout(x.detach())
        plan = self._plan(x, layout)
        stats_dtype = reference.compute_dtype(x.dtype)
        acc = _ACC.get(x.dtype, tl.float32)
        mean, var, invstd = (x.new_empty(plan.C, dtype=stats_dtype) for _ in range(3))
        # the pieces' (count, mean, M2), in float64 (see kernels_forward.stats_partial_kernel)
        parts = [x.new_empty((plan.pieces, plan.C), dtype=torch.float64) for _ in range(3)]
        with _device_guard(x):
            kernels_forward.stats_partial_kernel[plan.grid](
                x, *parts, *plan.args, ACC=acc, **plan.blocks, **LAUNCH_OPTIONS
            )
            kernels_forward.stats_merge_kernel[self._merge_grid(plan.C)](
                *parts, mean, var, invstd, plan.pieces, plan.C, *split_float(eps),
                **self._merge_blocks, **LAUNCH_OPTIONS,
            )  # fmt: skip
        y = self._normalize(x, layout, plan, weight, bias, residual, mean, invstd, activation,
                            negative_slope)  # fmt: skip
        return y, mean, var, invstd

    def forward_eval(self, x, weight, bias, residual, mean, invstd, activation, negative_slope):
        """y = act((x - mean) * invstd * weight + bias [+ residual]) with given statistics."""
        _check_activation(activation)
        layout, x = dense_in_layout(x.detach())
        if x.numel() == 0:
            return torch.empty_like(x)
        plan = self._plan(x, layout)
        return self._normalize(x, layout, plan, weight, bias, residual, mean, invstd,
                               activation, negative_slope)  # fmt: skip

    def _normalize(self, x, layout, plan, weight, bias, residual, mean, invstd, activation,
                   negative_slope):  # fmt: skip
        y = torch.empty_like(x)
        z = None if residual is None else like(residual.detach(), x, layout)
        with _device_guard(x):
            kernels_forward.normalize_kernel[plan.grid](
                x, x if z is None else z, y, _vector(mean, x), _vector(invstd, x),
                _vector(weight, x), _vector(bias, x), *plan.args,
                *split_float(negative_slope), HAS_Z=z is not None,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                ACTIVATION=activation, ACC=_ACC.get(x.dtype, tl.float32),
                BF16_BY_HAND=_bf16_by_hand(x), **plan.blocks, **LAUNCH_OPTIONS,
            )  # fmt: skip
        return y

    def backward(self, dy, x, weight, bias, residual, mean, invstd, training, activation,
                 negative_slope, need_dpre):  # fmt: skip
        """(dx, dweight, dbias, dpre or None); dpre = dL/d(pre-activation) = dL/dresidual.

        Training: the gradient flows through the batch mean and variance; eval: it does not
        (dx = weight * invstd * dpre). dweight and dbias are computed in both."""
        _check_activation(activation)
        layout, x = dense_in_layout(x.detach())
        dy = like(dy.detach(), x, layout)
        z = None if residual is None else like(residual.detach(), x, layout)
        plan = self._plan(x, layout)
        stats_dtype = reference.compute_dtype(x.dtype)
        acc = _ACC.get(x.dtype, tl.float32)
        acc_dtype = torch.float64 if acc == tl.float64 else torch.float32
        dweight = x.new_empty(plan.C, dtype=stats_dtype)
        dbias = x.new_empty(plan.C, dtype=stats_dtype)
        dx = torch.empty_like(x)
        # Without an activation dL/dpre is dy itself (as the Numba backend returns it).
        write_dpre = need_dpre and activation != "identity"
        dpre = torch.empty_like(x) if write_dpre else (dy if need_dpre else None)
        parts = [x.new_empty((plan.pieces, plan.C), dtype=acc_dtype) for _ in range(2)]
        mean, invstd = _vector(mean, x), _vector(invstd, x)
        weight_, bias_ = _vector(weight, x), _vector(bias, x)
        z_ = x if z is None else z
        slope = split_float(negative_slope)
        flags = {"HAS_Z": z is not None, "HAS_WEIGHT": weight is not None,
                 "HAS_BIAS": bias is not None, "ACTIVATION": activation, "ACC": acc,
                 **plan.blocks, **LAUNCH_OPTIONS}  # fmt: skip
        with _device_guard(x):
            kernels_backward.grad_partial_kernel[plan.grid](
                dy, x, z_, mean, invstd, weight_, bias_, *parts, *plan.args, *slope, **flags
            )
            kernels_backward.grad_merge_kernel[self._merge_grid(plan.C)](
                *parts, dbias, dweight, plan.pieces, plan.C, **self._merge_blocks,
                **LAUNCH_OPTIONS,
            )  # fmt: skip
            kernels_backward.grad_input_kernel[plan.grid](
                dy, x, z_, dx, dpre if write_dpre else dx, mean, invstd, weight_, bias_,
                dbias, dweight, plan.N * plan.S, *plan.args, *slope, TRAINING=bool(training),
                WRITE_DPRE=write_dpre, BF16_BY_HAND=_bf16_by_hand(x), **flags,
            )  # fmt: skip
        return dx, dweight, dbias, dpre

    def update_running_stats(self, running_mean, running_var, mean, var, count, momentum,
                             unbiased=True):  # fmt: skip
        """reference.update_running_stats (the same formula, in place) in one small kernel;
        tensors the kernel cannot write in place go to the reference."""
        if count == 0:  # an empty batch leaves the statistics alone, as torch.nn does
            return
        tensors = (running_mean, running_var, mean, var)
        writable = all(
            t.dtype in _KERNEL_DTYPES and (t.is_cuda or INTERPRETED) and t.is_contiguous()
            and t.device == running_mean.device for t in tensors
        ) and not (running_mean.requires_grad or running_var.requires_grad)  # fmt: skip
        if not writable:
            reference.update_running_stats(
                running_mean, running_var, mean, var, count, momentum, unbiased
            )
            return
        channels = running_mean.numel()
        num, den = (count, count - 1) if unbiased and count > 1 else (1, 1)
        block = min(_pow2(channels), 1024)
        with _device_guard(running_mean):
            kernels_forward.running_update_kernel[(triton.cdiv(channels, block),)](
                running_mean, running_var, mean, var, channels, *split_float(momentum), num,
                den, BLOCK=block, **LAUNCH_OPTIONS,
            )  # fmt: skip


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
