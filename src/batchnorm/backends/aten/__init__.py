"""ATen's own operator, ``torch.batch_norm``, as a backend: C++ autograd, no Python in the
backward, hence the fastest choice for small layers; the activation and residual follow as
separate (C++) ops. It computes torch's running-variance convention only, and is given its
inputs made safe (see :func:`safe_batch_norm`).

Dispatch rule (``preferred``), from ``make bench`` on 2 cores (benchmarks/results/
cpu_kernels.json), among the calls that the C++ backend (first in the dispatch) leaves (it
takes float32 and bfloat16 (N, C), channels-last and inference calls at any size, NCHW
training up to its ``planes_up_to`` values, float32 NCHW training whose output streams (8
MiB or more, planes of a multiple of 16 values, SiLU and a residual that needs its gradient
aside) and bfloat16 NCHW training with a fused ReLU at any size), for the calls whose sums
it keeps accurate (float32 inputs of more than ATEN_MAX_ROWS rows per channel or
ATEN_MAX_PLANE values per plane, whenever it would sum them, go to the kernels): inputs
below ATEN_BELOW_NUMEL values (epilogue included: a few C++ ops beat a Python-called kernel
there), NCHW inputs of small planes (ATEN_BELOW_PLANE; with more than one thread larger
ones, and larger still in half precision) and plain eval (its elementwise loop streams as
fast as ours), except on large bfloat16 inputs (BFLOAT16_EVAL_FROM). With more than one
thread, also half-precision inputs of moderate size: (N, C) and channels-last ones
(ATEN_BELOW_NUMEL_HALF_ROWS_THREADED), and NCHW plain BN in a training step
(ATEN_BELOW_NUMEL_HALF_PLANES_GRAPH). Training on larger inputs stays on the Numba kernels,
also for (N, C) and channels-last inputs that the C++ backend (first in the dispatch) leaves
(where it is off or not built, and fused activations above its sizes): ATen's float32 sums
there lose digits as the mean grows, and with the shift that keeps them (an extra pass) it
is slower than ours (docs/performance.md, "ATen's own accuracy").

On CUDA (cuDNN or ATen's CUDA kernels) every call it takes goes to it, fused epilogues
included, except training on the large NCHW inputs of :func:`cuda_kernels_faster`, which the
Triton kernels compute faster when they are installed (``gpu_kernels``). Other devices keep
the reference until measured (see batchnorm.backends.builtin_backends).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from batchnorm import reference
from batchnorm.backends import Call

#: Below this many values, the Python around a kernel call (autograd.Function, the call
#: itself) costs more than ATen's whole operator: `make bench` measured the Numba path at
#: 0.5-0.8x of ATen at (100, 128) forward + backward.
ATEN_BELOW_NUMEL = 65_536
#: NCHW-contiguous inputs with fewer values than this per (sample, channel) plane go to
#: ATen at any size: the Numba channels-first kernel pays a cost per plane, which the small
#: planes of a model's last stages turn into much of its time, while ATen's NCHW backward
#: is fast there (and needs no shift: its sums stay within a float32 mean's rounding at
#: large means). With more than one thread our three parallel passes scale less on short
#: rows than ATen's one. Measured on 2 shared cores, module forward + backward, identity
#: and relu, Numba's time / ATen's (2026-12-04):
#: 1 thread, 3x3 (8, 1152, 3, 3) 1.34-1.68, 4x4 1.11-1.17, 5x5 0.87-1.12, 6x6 0.73-0.99;
#: 2 threads, 6x6 (8, 256|672, 6, 6) 1.11-1.35, 7x7 (8, 512, 7, 7) 1.00-1.05, 8x8 1.11-1.20,
#: 9x9 (8, 256, 9, 9) 0.89-0.90. On 2026-12-06, the Numba kernels having gained since, 2
#: threads (training forward without autograd in brackets): 4x4 (8|64, 512) 1.51-1.80; 6x6
#: (8, 256) 1.19-1.24 (0.73), relu 1.13, (16, 256) 1.07, (32, 256) 0.92; 7x7 (8, 512)
#: 0.93-0.95 (0.53), relu 0.95, (32, 512) 0.72, (64, 512) 0.77, (128, 1024) 0.54 (0.42);
#: 8x8 (8, 512) 0.89-0.92 (0.46-0.48), relu 0.74, (32, 512) 0.68; 9x9 0.83 (0.43); 1
#: thread: 3x3 (8, 1152) 1.05 (0.77), 4x4 (8, 512) 1.07-1.08 (0.63-0.66), (32, 512) 0.94,
#: 5x5 (8, 512) 0.81-0.86 (0.49-0.52), (32, 512) 0.64, 6x6 (8, 256) 0.86. Hence ATen below
#: 49 values a plane with more than one thread (7x7 planes on our kernels), below 25 on one
#: (5x5 on ours).
ATEN_BELOW_PLANE = 25
ATEN_BELOW_PLANE_THREADED = 49  # with more than one torch thread
#: ... and for bfloat16 and float16 inputs with more than one thread, below 196 values a plane
#: (14x14 on the Numba kernels): at (8, 256, 12, 12) ATen's half-precision NCHW training
#: takes 0.25-0.4x the time of its float32 one, ours 0.6-0.8x. Our layer forced onto each,
#: ATen's time / Numba's (above 1: ours faster), 2 threads, (8|32, 256, P, P), bfloat16 /
#: float16 (2026-12-06): training forward 7x7 0.88, 0.65 / 0.78, 0.56; 12x12 0.93, 1.01 /
#: 0.97, 0.79; 14x14 1.17, 1.26 / 1.13, 1.04; 16x16 1.03-1.10; 24x24 1.16-1.48 / 1.26-1.45;
#: forward + backward 7x7 0.80, 0.77 / 0.69, 0.80; 12x12 0.78, 0.83 / 0.65, 0.68; 14x14
#: 0.99, 1.17 / 0.87, 0.97; 16x16 0.90, 0.98 / 0.83, 1.13; 20x20 0.91, 1.03 / 0.93, 1.29;
#: 24x24 1.07-1.64; with ReLU 7x7 0.79-1.03, 12x12 0.77-0.85, 14x14 0.91-1.01, 16x16
#: 0.91-1.28. On one thread ours keep up from 7x7 (0.82-1.37): the float32 threshold stays.
ATEN_BELOW_PLANE_HALF_THREADED = 196
#: Half-precision inputs of other layouts ((N, C) and channels-last, which ATen takes in its
#: channels-last kernel, accurately in half precision: it stays within the dtype's rounding
#: at means of 0, 3 and 100) go to ATen below this many values with more than one thread,
#: for the same reason. In float16 nothing else is faster there; bfloat16 reaches it where
#: the C++ backend (first in the dispatch) does not take the call. Our layer forced onto
#: each, ATen's time / Numba's, 2 threads, float16 / bfloat16 (2026-12-06): forward +
#: backward (256, 256) 0.76 / 0.76, (512, 256) 0.80 / 0.89, (1024, 256) 0.92 / 0.94,
#: (256, 1024) 0.92 / 0.92, channels-last (8, 512, 7, 7) 0.83 / 0.86, (8, 256, 12, 12) 1.00
#: / 0.98 (below the threshold); (1536, 256) 1.05 / 1.09, (512, 1024) 1.03 / 1.01,
#: channels-last (8, 128, 24, 24) 1.12 / 1.14 (above); the training forward 0.81-1.23 below,
#: 0.97-1.45 above; with ReLU 0.86-1.15 below. On one thread ours keep up from
#: (512, 256) (float16: 0.95 forward + backward, 1.29 training forward).
ATEN_BELOW_NUMEL_HALF_ROWS_THREADED = 300_000
#: Half-precision NCHW inputs of larger planes go to ATen below this many values with more
#: than one thread for plain BN (no activation, no residual) whose call autograd records, as
#: in a training step: there ATen's forward + backward, one C++ node, beats ours, whose
#: Python node costs about 30 µs more a step. Our layer forced onto each, 2 threads, ATen's
#: time / Numba's, forward + backward, bfloat16 / float16 (2026-12-06): (8, 64, 24, 24) 0.83
#: / 0.78, (8, 256, 14, 14) 0.99 / 0.87, (8, 256, 16, 16) 0.90 / 0.83, (4, 128, 32, 32) 0.93
#: / 0.94, (8, 128, 24, 24) 0.92 / 0.94, (8, 32, 48, 48) 0.98 / 1.00 (below); (8, 128, 28,
#: 28) 1.00 / 1.01, (8, 256, 20, 20) 0.97 / 0.86, (8, 64, 40, 40) 1.12 / 1.09, (8, 96, 36,
#: 36) 1.10 / 1.04, (32, 64, 28, 28) 1.24 / 1.22 (above). Not the training forward without
#: autograd (ours 1.01-1.13 there), nor with ReLU, level (0.93-1.09).
ATEN_BELOW_NUMEL_HALF_PLANES_GRAPH = 600_000
#: The CPU dtypes the Numba kernels take (half precision: as torch.autocast("cpu") gives).
_NUMBA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: bfloat16 plain eval from this many values runs on the Numba kernels, whose conversions
#: keep up with the memory (the loop is compute-bound in half precision) where ATen's do not
#: (for the calls the C++ backend, first in the dispatch, leaves: it takes bfloat16 (N, C)
#: and channels-last eval, and NCHW without autograd, at any size). torch.nn's time / ours,
#: module eval, 2 threads (1 thread), 2026-12-04 (Numba): (4096, 1024) 1.26-1.29 (1.15),
#: (32, 128, 32, 32) 1.15-1.20 (1.20), channels_last 1.19-1.24 (1.20), (64, 256, 28, 28)
#: 0.90-1.08 (1.12); below it our Python costs more: channels_last (8, 64, 48, 48) 0.96
#: (1.15), (8, 256, 12, 12) 0.54-0.58 (0.63). float16 stays on ATen, whose float16 loop is
#: faster than its bfloat16 one: 0.85-1.35.
BFLOAT16_EVAL_FROM = 1 << 21
#: ATen's float32 CPU kernels add their per-channel sums in long chains, whose error grows
#: with their length where the terms do not cancel: the (N, C) and channels-last kernel
#: adds a channel's rows one by one, the NCHW kernel a plane's values in a few vector
#: lanes. The Numba kernels' backward adds channels_last.GRAD_PART_ROWS rows (or a vector
#: lane's share of jit.CHUNK values) in one chain, and merges in float64. Calls with more
#: rows per channel, or larger planes, than these constants, in which ATen would sum
#: (training, or eval with a weight or bias to differentiate), go to the kernels. ATen's
#: error of dbias, in float32 ulps of the sum of the terms' magnitudes, eval backward of
#: inputs and gradients constant along the batch (torch 2.13.0, 2026-12-04): (N, C) 6-8 at
#: 128 rows, 5-12 at 256, 23-29 at 512, 50-62 at 1024, 1900 at 65535; NCHW planes of 1024
#: values 2.6, 2048 3.4-27, 4096 32-43, 16384 129 (ours: 0-8 in all; random data: ATen
#: 0.4-17).
ATEN_MAX_ROWS = 256
ATEN_MAX_PLANE = 1024
#: Given an output gradient in another layout than the output's (an expanded one, as
#: ``y.sum().backward()`` gives), ATen's NCHW backward takes a generic path that adds a
#: channel's plane sums in one chain; for inputs of more planes (a larger batch) than this,
#: safe_batch_norm gives it the output's layout. dbias of an output gradient constant along
#: the batch (expanded), float32 ulps of the sum of the terms' magnitudes, (N, C, P), torch
#: 2.13.0, 2026-12-06: N = 128 / 256 / 512 at P = 2: 13 / 30 / 56 (4096: 437), P = 16: 5.8 /
#: 14 / 38, P = 64: 3.3 / 7.7 / 26; 0.1-0.6 with a dense gradient, 0.4-0.8 on the Numba
#: kernels. (The channels-last kernel, which takes (N, C) inputs too, adds a channel's rows
#: in one chain whatever the gradient's layout: long_plain_sums bounds those.)
ATEN_MAX_PLANES = 128
#: NCHW planes (H x W) and inputs from which the Triton kernels train faster than cuDNN.
#: benchmarks/results/cuda_bench.json (H200, one call at a time, torch.nn time / Triton's):
#: (128, 64, 112, 112) training forward 2.14 / 2.98 / 2.23 (float32 / bfloat16 / float16),
#: forward + backward 2.37 / 3.00 / 2.39, with ReLU + residual 2.59 / 3.18 / 2.40; but
#: (32, 64, 112, 112) 0.69-1.31 and (128, 256, 56, 56) 0.85-1.31 by dtype and mode, every
#: channels-last input 0.23-1.16 and eval 0.23-0.99: cuDNN's NCHW training kernels are slow
#: on large planes, and below them Triton's launches cost more than they save.
CUDA_KERNELS_FROM_PLANE = 112 * 112
CUDA_KERNELS_FROM_NUMEL = 1 << 26


def cuda_kernels_faster(call: Call) -> bool:
    """Whether the Triton kernels compute ``call`` faster than cuDNN on a GPU (measured on an
    H200: training on large NCHW-contiguous inputs of large planes)."""
    x = call.x
    return (
        call.training
        and x.dim() > 2
        and x.numel() >= CUDA_KERNELS_FROM_NUMEL
        and x.numel() >= CUDA_KERNELS_FROM_PLANE * x.shape[0] * x.shape[1]
        and x.is_contiguous()
    )


class AtenBackend:
    """``gpu_kernels``: which CUDA inputs a kernel backend registered after this one takes
    (None: none is), so that it is left the calls of :func:`cuda_kernels_faster` on them."""

    name = "aten"
    operator = True
    devices = None

    def __init__(self, gpu_kernels: Callable[[Tensor], bool] | None = None) -> None:
        self.gpu_kernels = gpu_kernels

    def supports(self, call: Call) -> bool:
        """Any device and dtype torch takes, in torch's convention (unbiased running
        variance) and with the input saved for backward."""
        return call.unbiased_running_var and not call.keep_output_only

    def preferred(self, call: Call) -> bool:
        x = call.x
        if x.is_cuda:
            gpu_kernels = self.gpu_kernels
            return not (gpu_kernels is not None and cuda_kernels_faster(call) and gpu_kernels(x))
        if not x.is_cpu:
            return False
        if x.dtype not in _NUMBA_DTYPES:
            return False
        if long_plain_sums(call):
            return False
        if x.numel() < ATEN_BELOW_NUMEL:
            return True
        half = x.dtype is torch.bfloat16 or x.dtype is torch.float16
        threaded = torch.get_num_threads() > 1
        plain = call.activation == "identity" and not call.has_residual
        if x.dim() > 2 and x.is_contiguous():
            if not threaded:
                below = ATEN_BELOW_PLANE
            else:
                below = ATEN_BELOW_PLANE_HALF_THREADED if half else ATEN_BELOW_PLANE_THREADED
            if x.numel() < below * x.shape[0] * x.shape[1]:
                return True
            if (
                half and threaded and plain and x.numel() < ATEN_BELOW_NUMEL_HALF_PLANES_GRAPH
                and _differentiated(x, call.weight, call.bias)
            ):  # fmt: skip
                return True
        elif half and threaded and x.numel() < ATEN_BELOW_NUMEL_HALF_ROWS_THREADED:
            return True
        plain_eval = plain and not call.training
        return plain_eval and (x.dtype is not torch.bfloat16 or x.numel() < BFLOAT16_EVAL_FROM)

    def batch_norm(self, call: Call) -> Tensor:
        y = safe_batch_norm(call.x, call.weight, call.bias, call.running_mean, call.running_var,
                            call.training, call.momentum, call.eps)  # fmt: skip
        if call.residual is not None:
            y = y + call.residual
        return reference.activate(y, call.activation, call.negative_slope)


def long_plain_sums(call: Call) -> bool:
    """Whether ATen's float32 CPU kernel would add more terms in one chain than
    ATEN_MAX_ROWS rows per channel ((N, C) and channels-last inputs) or ATEN_MAX_PLANE values
    per plane (NCHW), and sum at all: in training (statistics and backward), or in eval with
    a weight or bias that autograd differentiates (dweight, dbias)."""
    x = call.x
    values, channels = x.numel(), x.shape[1]
    # first the test that small layers pass (a plane is never longer than the rows)
    if values <= ATEN_MAX_ROWS * channels or x.dtype is not torch.float32:
        return False
    if not _channels_last_kernel(x) and values <= ATEN_MAX_PLANE * x.shape[0] * channels:
        return False
    return call.training or _differentiated(call.weight, call.bias)


def _differentiated(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on these tensors (None: not given): grad mode on and
    one of them requiring grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def safe_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """torch.batch_norm, which updates the running statistics itself (same rule), with its
    inputs made safe for the CPU kernels of ATen (torch 2.13), which give wrong results on:

    * a weight or bias that is not contiguous ((N, C) inputs: wrong dx);
    * an input or output gradient whose size-1 dimensions have other strides than a dense
      tensor's (wrong dx and dbias), so both are given dense strides;
    * an output gradient in another layout than the output's (an expanded one, as
      ``y.sum().backward()`` gives) of an NCHW input of more than ATEN_MAX_PLANES planes
      per channel: ATen's backward then adds a channel's plane sums in one chain, which
      loses digits, so the gradient is given the output's strides;
    * float32 data whose mean is large against its spread, in the channels-last kernel
      that also takes (N, C) inputs: its statistics (a plain float sum) and backward lose
      digits (3e-3 of the output's scale at mean 1e4 on (200, 8), 5-10x an exact float32
      mean's rounding; the NCHW kernel stays within it). The input is shifted by a
      per-channel value from its first sample: batch norm's output and gradients do not
      change under a shift, and the sums become accurate.
    """
    x = _dense(x)
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    # Running statistics that are not contiguous: ATen is given contiguous copies, and the
    # update it makes to them in training is copied back.
    given_mean = _contiguous(running_mean)
    given_var = _contiguous(running_var)
    shift = None  # per channel
    if training and x.dtype is torch.float32 and _channels_last_kernel(x) and x.numel():
        # inf/NaN: no shift, torch's results (the method parses its arguments 0.3 µs faster)
        if x.dim() == 2:
            offset = shift = x.detach()[0].nan_to_num(0.0, 0.0, 0.0)  # (C,)
        else:  # x[0, :, 0, ...] as (1, C, 1, ...) in one C call (indexing and a reshape
            # cost 2-3 µs more, on calls of 20-60 µs)
            first = x.detach().as_strided((1, x.shape[1]) + (1,) * (x.dim() - 2), x.stride())
            offset = first.nan_to_num(0.0, 0.0, 0.0)
            shift = offset.view(-1)
        x = x - offset
        if given_mean is running_mean is not None and not torch._C._has_storage(running_mean):
            # a torch.func wrapper (vmap over stacked buffers), whose .data cannot be had:
            # ATen updates a copy, then the copy and the shift's share go back (below)
            given_mean = running_mean.clone()
    y = torch.batch_norm(x, weight, bias, given_mean, given_var, training, momentum, eps, False)
    if training and running_mean is not None:
        # With a shift, ATen's update, (1 - momentum) * running + momentum * (mean - shift),
        # lacks momentum * shift. ATen saved the running mean for its backward, which in
        # training does not read it; an update through .data leaves its version counter
        # alone, so that backward does not refuse a tensor changed in place (ATen's own
        # update counted already, as torch.nn's does).
        if shift is not None and given_mean is running_mean:
            running_mean.data.add_(shift, alpha=momentum)
        elif shift is not None:  # copy_, not add(out=): vmap has a rule for it
            running_mean.copy_(given_mean.add(shift, alpha=momentum))
        elif given_mean is not running_mean:
            running_mean.copy_(given_mean)  # type: ignore[arg-type]
    if training and given_var is not running_var:
        running_var.copy_(given_var)  # type: ignore[union-attr, arg-type]
    # Only size-1 dimensions can carry odd strides, and only many planes make a long chain:
    # the hook costs 10-20 µs a call (a 1 MiB gradient), so it is not there on every call.
    if y.requires_grad and (
        1 in x.shape or (x.shape[0] > ATEN_MAX_PLANES and not _channels_last_kernel(x))
    ):
        y.register_hook(_with_strides(y.stride()))
    return y


def _channels_last_kernel(x: Tensor) -> bool:
    """Whether ATen's CPU batch norm takes x through its channels-last kernel (or may: any
    layout other than NCHW-contiguous with spatial dimensions). Not on CUDA, whose float32
    results stay within 1.6e-7 of the output's scale at mean 3 and 5e-4 at mean 1e4 (the
    accuracy probe of benchmarks/results/cuda_bench.json): no shift there."""
    return x.is_cpu and (
        x.dim() == 2 or not x.is_contiguous() or x.numel() == x.shape[0] * x.shape[1]
    )


def _contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _dense(t: Tensor) -> Tensor:
    """t itself, or a contiguous copy if its size-1 dimensions have unusual strides."""
    if 1 not in t.shape or t.stride() in (_dense_strides(t.shape, False),
                                          _dense_strides(t.shape, True)):  # fmt: skip
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _dense_strides(shape: torch.Size, channels_last: bool) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape``, contiguous or channels-last."""
    order = [0, *range(2, len(shape)), 1] if channels_last else list(range(len(shape)))
    strides = [0] * len(shape)
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= shape[dim]
    return tuple(strides)


def _with_strides(strides: tuple[int, ...]):
    """A gradient hook that gives the gradient ``strides`` (those of the output)."""

    def hook(grad: Tensor | None) -> Tensor | None:
        if grad is None or grad.stride() == strides:
            return grad
        return torch.empty_strided(grad.shape, strides, dtype=grad.dtype,
                                   device=grad.device).copy_(grad)  # fmt: skip

    return hook
