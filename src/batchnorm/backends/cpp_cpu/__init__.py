"""The C++ backend: batch norm of float32 and bfloat16 CPU inputs whose channels are the
innermost dimension ((N, C) and channels_last), fused activation and residual included, as
one C++ autograd node (rows.cpp): serial loops for small inputs, torch's intra-op threads
from 65,536 values. Also NCHW inputs: in eval mode when no graph is recorded (inference), a
plane at a time, without a node; in training (or eval with a graph) up to 524,288 values
(the extension's ``planes_up_to``) in the same node, a channel at a time, where the Numba
kernels' Python costs as much as their loops; in float32 at any size where the output
streams (8 MiB or more in planes of a multiple of 16 values, SiLU and a residual that needs
its gradient aside: rows.cpp's planes_streamed; a channel's planes read again from L2, its
output and dx written with non-temporal stores, faster than the Numba kernels' passes); in
bfloat16 training with a fused ReLU or leaky ReLU and no residual at any size (rows.cpp's
planes_fused: faster than the Numba kernels' loops, which the activation makes
compute-bound). bfloat16 inputs take float32 parameters and statistics (torch.autocast's
convention; a model cast to bfloat16 runs on the Numba kernels): loaded to float32, computed
in float32 with float64 sums of float32 partial sums, rounded to bfloat16 (to nearest, ties
to even, as torch's conversion). float16 inputs (float32 parameters and statistics) on CPUs
with AVX-512, whose instructions the inference loops of both half-precision dtypes are
written in (rows.cpp's eval_halves): in inference, either layout, faster than ATen's eval
from the smallest layers on, where the call's Python shows, to level (float16) or faster
(bfloat16) on large ones; in training, ``(N, C)`` and channels_last inputs of any size (rows
narrower than 256 values a thread's rows as one run of values: rows.cpp's kHalfRunsBelow),
and NCHW batches of at least 8 planes of up to 196 values (kFloat16PlanesUpTo; the
statistics and sums of a channel from a float32 copy that F16C converts, the output and dx
in AVX-512's loops), where they were faster than ATen's float16 kernels and the Numba
kernels. Outputs (and training dx) of 16 MiB or more are written with non-temporal stores
(rows.cpp's kStreamFrom), in float16 and bfloat16 where each row or plane is a multiple of
16 values (streams_lanes).

Why: on these inputs ATen's float32 kernel loses digits as the mean grows (see
backends.aten.safe_batch_norm), and the shift that keeps them costs two more ops; the Numba
kernels are accurate but pay a Python autograd node and a Python kernel call, which cost
more than the whole computation of a small layer. A C++ node around the kernels of rows.cpp
is accurate and cheaper than ATen's own operator. Raw calls, one thread, the same process
(2026-12-05), ATen's time / ours: (100, 128) forward 1.37-1.50, forward + backward
1.18-1.23; channels_last (8, 512, 3, 3) 1.57 and 1.28; (32768, 128) training forward
1.27, eval 1.01, the backward alone 0.86-0.88 before the loops' prefetches (memory-bound
there, in the same passes as ATen's); with them, module forward + backward of
channels_last (32, 128, 32, 32) 0.98 in `make bench` (2026-12-05 07:00), raw calls
1.07-1.21 in the same process.

It is built on first use with torch.utils.cpp_extension (a C++ compiler, and ninja, which
the ``ninja`` package brings; 1-2 minutes on a 2-core machine, with a notice on stderr)
for this machine's CPU and this torch, and cached under ``$XDG_CACHE_HOME/batchnorm/cpp``
(``~/.cache/batchnorm/cpp``), from which later processes load it in milliseconds;
``batchnorm compile`` builds it ahead of time. Where it cannot be built (no compiler), a
warning says so once and these calls go to the Numba kernels and ATen (with its shift), as
before. ``BATCHNORM_CPP=0`` turns the backend off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd import forward_ad

from batchnorm import reference
from batchnorm._cache import cache_root
from batchnorm.backends import Call

#: Compiler flags: the loops vectorize over the channels for this machine's CPU (its name and
#: flags are part of the cache key). Without -march=native the float64 sums ran at 0.9x of
#: ATen's speed at (100, 128) instead of 1.4x. -fopenmp-simd: the `omp simd` pragma that sets
#: some loops' vector width (rows.cpp's for_channels). -fopenmp where torch runs its threads on
#: OpenMP (Linux builds): at::parallel_for then runs on torch's own OpenMP threads (the
#: extension links no OpenMP runtime of its own; torch's, already loaded, serves it), else
#: the loops run serially.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd") + (
    ("-fopenmp",)
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available()
    else ()
)
SOURCE = Path(__file__).with_name("rows.cpp")
#: Environment variable: "0" turns the backend off.
SWITCH = "BATCHNORM_CPP"
#: The fused activations rows.cpp computes, by its codes (enum Activation there). ELU
#: follows the node as torch's own op (C++ autograd too; see rows.cpp).
ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}
_ACTIVATION_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}
#: The input dtypes of the calls the extension may take (``takes`` decides: float16 on
#: CPUs with AVX-512, in training rows of any size and NCHW batches of short planes).
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: What the extension's ``takes`` says of a call (rows.cpp's Kind): it computes the call
#: (TAKES); it does not, but the call's tensors pass ``functional._layer_call``'s checks,
#: which then need not run (USUAL); neither is known (UNCHECKED).
UNCHECKED, USUAL, TAKES = 0, 1, 2

_lock = threading.Lock()
#: The built module; False once it could not be had (off, or the build failed).
_extension: ModuleType | bool | None = None
#: How the extension was had: "built", "loaded from the cache", "off" or "not built: ...".
outcome = "not needed yet"


class CppBackend:
    name = "cpp_cpu"
    operator = True
    devices = ("cpu",)

    def supports(self, call: Call) -> bool:
        """Calls of float32 or bfloat16 CPU inputs (with float32 parameters and statistics,
        as under torch.autocast), the input dense with its channels innermost or
        NCHW-contiguous (NCHW in training or with a graph to record: up to ``planes_up_to``
        values, float32 ones of 8 MiB or more in planes of a multiple of 16 values with any
        activation but SiLU and no residual that needs its gradient, bfloat16 training with
        ReLU or leaky ReLU and no residual at any size; float16 inputs where the CPU has
        AVX-512: of either layout in eval without a graph, ``(N, C)`` and channels_last ones
        of any size in training or with a graph, NCHW batches of 8 or more planes of up to
        196 values), a residual of its dtype and strides, with any activation (see
        ACTIVATION_CODES), in torch's running-variance convention, the input saved for
        backward; in training more than one value per channel, in eval running statistics;
        not under forward-mode AD or torch.jit.trace (the node has no tangent rule and
        traces as nothing), and only where the extension builds. The tensors' checks are the
        extension's ``takes``; the device comes first, so that a call on another device (a
        GPU's) never builds the extension."""
        return self._kind(call) == TAKES

    def _kind(self, call: Call) -> int:
        """``takes``'s word on the call (UNCHECKED where the Python checks of ``supports``
        fail first, or the extension is not built)."""
        return _kind_of(call.x, call.training, call.activation, call.keep_output_only,
                        call.unbiased_running_var, call.weight, call.bias, call.running_mean,
                        call.running_var, call.residual)  # fmt: skip

    def preferred(self, call: Call) -> bool:
        """Every call it supports, fused ReLU and leaky ReLU at any size included (both
        compute dL/d(pre-activation) again in each backward pass: rows.cpp's
        ActivationGradient; SiLU's node writes it out, its exp costing more than the pass).
        Until 2026-12-06 float32 ones of 2,000,000 values or more went to the Numba kernels,
        measured faster there on rows of 256 channels or more on 2026-12-05 (0.87-0.95); on
        the loops of 2026-12-06 ours are the faster on two threads and, but for rows of 512
        channels (0.92-1.01), the faster or level on one. Same-process A/B, module
        forward + backward, Numba's time / ours, 2 threads (1): ReLU (4096, 1024) 1.07-1.15
        (1.00-1.24), (32768, 128) 1.13 (0.99-1.00), channels_last (32, 128, 32, 32)
        1.22-1.27 (1.08), (16, 256, 28, 28) 1.02 (1.03), (64, 256, 28, 28) 1.18 (1.24),
        (8, 512, 28, 28) 1.03 (0.92-1.01); leaky ReLU (4096, 1024) 1.11 (1.04-1.24),
        channels_last (64, 256, 28, 28) 1.21 (1.09), (8, 512, 28, 28) 1.01 (0.92-1.01)."""
        return True

    def call_fields(self, x: Tensor, training: bool, activation: str, negative_slope: float,
                    has_residual: bool, keep_output_only: bool, unbiased_running_var: bool,
                    weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                    running_var: Tensor | None, residual: Tensor | None, momentum: float,
                    eps: float, steps: Tensor | None = None) -> Tensor | bool:  # fmt: skip
        """``batch_norm(Call(*fields), steps)`` for a layer's call that
        ``functional._layer_call`` would give the dispatch and the dispatch to this backend
        (asked first): the same decision in fewer steps (those steps' Python cost a tenth of
        a small layer's call), from the call's fields (a Call's, in its order: the layer
        builds no Call for a call this backend takes). Not under torch.compile (which traces
        ``_layer_call``'s own way), then ``takes`` (which makes most of ``_layer_call``'s
        checks) and the others (eps, the activation's name; it prefers every call it takes).
        A call it does not compute gives whether its tensors passed ``_layer_call``'s checks
        (USUAL), which then need not run again, and leaves ``steps`` uncounted."""
        if torch.compiler.is_compiling():
            return False
        kind = _kind_of(x, training, activation, keep_output_only, unbiased_running_var, weight,
                        bias, running_mean, running_var, residual)  # fmt: skip
        valid = (eps > 0 if training else eps >= 0) and activation in reference.ACTIVATIONS
        if kind == TAKES and valid:
            return _node_call(x, weight, bias, running_mean, running_var, residual, training,
                              momentum, eps, activation, negative_slope, steps)  # fmt: skip
        return kind != UNCHECKED

    def batch_norm(self, call: Call, steps: Tensor | None = None) -> Tensor:
        return _node_call(call.x, call.weight, call.bias, call.running_mean, call.running_var,
                          call.residual, call.training, call.momentum, call.eps, call.activation,
                          call.negative_slope, steps)  # fmt: skip


def _kind_of(x: Tensor, training: bool, activation: str, keep_output_only: bool,
             unbiased_running_var: bool, weight: Tensor | None, bias: Tensor | None,
             running_mean: Tensor | None, running_var: Tensor | None,
             residual: Tensor | None) -> int:  # fmt: skip
    """CppBackend._kind of a call of these fields."""
    if not (
        x.is_cpu
        and x.dtype in _DTYPES
        and not keep_output_only
        and unbiased_running_var
        and forward_ad._current_level < 0
        and torch._C._get_tracing_state() is None
    ):
        return UNCHECKED
    built = extension()
    if built is None:
        return UNCHECKED
    return built.takes(x, weight, bias, running_mean, running_var, residual, training,
                       ACTIVATION_CODES.get(activation, 0))  # fmt: skip


def _node_call(x: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None,
               residual: Tensor | None, training: bool, momentum: float, eps: float,
               activation: str, negative_slope: float, steps: Tensor | None) -> Tensor:  # fmt: skip
    """The call in the node (CppBackend.batch_norm); ``steps`` (a layer's
    num_batches_tracked, or None) counted there, one up: from Python, torch's add_ costs
    4-5 µs, a sixth of a small layer's call (rows.cpp's count_step)."""
    code = ACTIVATION_CODES.get(activation)
    y = extension().rows_batch_norm(  # type: ignore[union-attr]
        x, weight, bias, running_mean, running_var, residual, training, float(momentum),
        float(eps), 0 if code is None else code, float(negative_slope), steps,
    )  # fmt: skip
    if code is None:  # ELU: torch's own op after the node (see ACTIVATION_CODES)
        y = reference.activate(y, activation, negative_slope)
    return y


def differentiable_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    training: bool,
    eps: float,
    mean: Tensor,
    invstd: Tensor,
    activation_code: int,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual) in torch ops, for a gradient that will be
    differentiated again (create_graph=True) or that torch.func batches: rows.cpp calls it
    with what the node saved (in eval, ``mean`` is its copy of the running mean)."""
    return reference.differentiable_backward(
        dy, x, mean, invstd, eps, weight, bias, residual, training,
        _ACTIVATION_NAMES[activation_code], negative_slope,
    )  # fmt: skip


def cache_dir() -> Path:
    """Where the built extension is cached: ``$XDG_CACHE_HOME/batchnorm/cpp``."""
    return cache_root() / "cpp"


def _build_name() -> str:
    """The extension's name: a hash of what the build depends on (the source, the flags,
    torch and Python versions, this CPU), so that a change of any builds anew."""
    cpu = platform.processor()
    try:  # Linux: the CPU's model and feature flags, which -march=native compiles for
        cpu += "".join(
            line for line in Path("/proc/cpuinfo").read_text().splitlines()[:32]
            if line.startswith(("model name", "flags"))
        )  # fmt: skip
    except OSError:
        pass
    key = repr((torch.__version__, sys.version_info[:2], platform.machine(), cpu, FLAGS))
    digest = hashlib.sha256(SOURCE.read_bytes() + key.encode()).hexdigest()[:16]
    return f"batchnorm_cpp_{digest}"


def _find_ninja() -> None:
    """torch's build looks for ninja on PATH: the one of the ``ninja`` package (a
    dependency) is added at its end, for environments that are not activated (a venv's
    python run by its path) or have no system ninja."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR and ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = path + os.pathsep + ninja.BIN_DIR if path else ninja.BIN_DIR


def extension() -> ModuleType | None:
    """The built extension (building or loading it on first use), or None where it is off
    or cannot be built."""
    global _extension
    if _extension is None:
        with _lock:
            if _extension is None:
                _extension = _load()
    return _extension or None  # type: ignore[return-value]


def _load() -> ModuleType | bool:
    global outcome
    if os.environ.get(SWITCH) == "0":
        outcome = f"off ({SWITCH}=0)"
        return False
    name = _build_name()
    folder = cache_dir() / name
    try:
        from torch.utils.cpp_extension import load

        _find_ninja()
        folder.mkdir(parents=True, exist_ok=True)
        cached = any(folder.glob(f"{name}.*so")) or any(folder.glob(f"{name}.*pyd"))
        if not cached:
            print(
                f"batchnorm: building the C++ kernels for (N, C) and channels-last layers "
                f"(once, 1-2 minutes); later processes load them from {folder}",
                file=sys.stderr,
                flush=True,
            )
        module = load(name, [str(SOURCE)], extra_cflags=list(FLAGS), build_directory=str(folder))
        outcome = "loaded from the cache" if cached else "built"
        return module
    except Exception as error:  # noqa: BLE001 - any failure leaves the calls on ATen
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
        outcome = f"not built ({reason})"
        warnings.warn(
            f"batchnorm: the C++ kernels could not be built ({reason}); (N, C) and "
            f"channels-last calls run on the Numba kernels and ATen instead (small layers "
            f"1.1-1.3x slower; ATen's training with a shift that keeps its accuracy). Hint: "
            f"install a C++ compiler (e.g. apt install g++) and ninja (pip install ninja), or "
            f"set {SWITCH}=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
