"""When the Numba kernels compile, and compiling them ahead of time (``batchnorm compile``).

Numba compiles a kernel the first time it is called with a new signature, here one per
kernel, dtype and variant: 4 kernels (forward and backward of each layout) x float32 /
float64 / bfloat16 / float16 x serial / parallel (see ``jit._Kernel``) x without / with a
residual (see ``jit._given``), 64 specializations, plus the small running-statistics update
per statistics dtype (float32 serves the halves). Nothing compiles at import: a call
compiles only the specializations it runs, each saved to the disk cache, from which later
processes load it in well under a second.

A compile takes seconds (all of them, ``batchnorm compile``, about 5 minutes on 2 cores:
docs/performance.md), so the first one of a process says so, once, on stderr: the notice
listens to Numba's ``numba:compile`` event, which Numba fires only when it really compiles,
never when it loads from the cache.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from numba.core import event

from batchnorm import reference
from batchnorm.backends.numba_cpu.channels_first import cf_backward, cf_forward
from batchnorm.backends.numba_cpu.channels_last import cl_backward, cl_forward
from batchnorm.backends.numba_cpu.jit import _HELPER, SERIAL_BELOW, running_update

#: The kernels, by layout: cf is NCHW-contiguous, cl channels-last and 2-D (N, C) inputs.
KERNELS = {
    "channels_first": {"forward": cf_forward, "backward": cf_backward},
    "channels_last": {"forward": cl_forward, "backward": cl_backward},
}
LAYOUTS = tuple(KERNELS)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}  # fmt: skip
VARIANTS = ("serial", "parallel")
#: Where the functions of the notice live: compiles of other Numba code are not ours.
_PACKAGE = __name__.rpartition(".")[0] + "."


def cache_dir() -> str | None:
    """The folder the compiled kernels are cached in, or None when they are not cached."""
    if not _HELPER["cache"]:
        return None
    return cf_forward.serial.stats.cache_path


class _CompileNotice(event.Listener):
    """Prints NOTICE on stderr before the first compile of this package's Numba code in the
    process (never when a kernel loads from the disk cache: Numba sends no event then)."""

    def __init__(self) -> None:
        self.shown = False
        self.muted = 0
        self._lock = threading.Lock()

    def on_start(self, ev: event.Event) -> None:
        dispatcher = ev.data.get("dispatcher") if isinstance(ev.data, dict) else None
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
        if self.shown or self.muted or not module.startswith(_PACKAGE):
            return
        with self._lock:
            if self.shown:
                return
            self.shown = True
        print(notice(), file=sys.stderr, flush=True)

    def on_end(self, ev: event.Event) -> None:
        pass


def notice() -> str:
    where = cache_dir()
    cached = (
        f"each is compiled once, then loaded from the cache in {where}. `batchnorm compile` "
        f"compiles all of them ahead of time."
        if where
        else "they are not cached (no writable cache folder: set NUMBA_CACHE_DIR to one), so "
        "every process compiles them again."
    )
    return (
        f"batchnorm: compiling the Numba CPU kernels this input needs (seconds, up to a minute "
        f"on a busy machine); {cached}"
    )


NOTICE = _CompileNotice()
event.register("numba:compile", NOTICE)


@dataclass
class Specialization:
    """One compiled (or loaded) kernel: what it is, where it came from, how long it took."""

    kernel: str  # e.g. "cf_forward"
    dtype: str
    variant: str
    #: "compiled", "loaded from the cache" or "already loaded" (in this process)
    source: str
    seconds: float


def _dispatcher_stats(dispatcher) -> tuple[int, int]:
    stats = dispatcher.stats
    return sum(stats.cache_misses.values()), sum(stats.cache_hits.values())


def _run_kernel(step: str, layout: str, dtype: torch.dtype, variant: str, residual: bool) -> None:
    """Runs one kernel through the backend on a small input: the exact argument types of a
    real call, so the signature compiled is the one a layer uses."""
    from batchnorm.backends.numba_cpu import NumbaBackend

    channels = 8
    values = SERIAL_BELOW if variant == "parallel" else 512  # see jit._Kernel.pick
    if layout == "channels_last":
        shape: tuple[int, ...] = (values // channels, channels)  # (N, C) runs as cl
    else:
        shape = (2, channels, values // (2 * channels))  # contiguous (N, C, L) runs as cf
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    # float32 parameters for half inputs, as under torch.autocast (the kernels' signature)
    stats = reference.compute_dtype(dtype)
    weight, bias = torch.ones(channels, dtype=stats), torch.zeros(channels, dtype=stats)
    z = torch.zeros_like(x) if residual else None
    backend = NumbaBackend()
    _, mean, var, invstd = backend.forward_train(x, weight, bias, z, 1e-5, "identity", 0.01)
    if step == "backward":
        dy = torch.ones_like(x)
        backend.backward(dy, x, weight, bias, z, mean, invstd, True, "identity", 0.01, residual)
    elif step == "running_update":
        running_mean, running_var = torch.zeros_like(mean), torch.ones_like(var)
        backend.update_running_stats(running_mean, running_var, mean, var, len(x), 0.1)


def _timed(dispatcher, run: Callable[[], None]) -> tuple[str, float]:
    """Runs ``run``; returns whether it compiled ``dispatcher``, loaded it or found it
    loaded, and the seconds it took."""
    misses, hits = _dispatcher_stats(dispatcher)
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    after_misses, after_hits = _dispatcher_stats(dispatcher)
    if after_misses > misses:
        return "compiled", seconds
    return ("loaded from the cache" if after_hits > hits else "already loaded"), seconds


def _jobs(dtypes: Iterable[str], layouts: Iterable[str]):
    """(kernel name, dtype name, variant, dispatcher, run) of each specialization, the
    forward of each layout and variant before its backward (whose run needs it)."""
    layouts = list(layouts)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for layout in layouts:
            prefix = "cf" if layout == "channels_first" else "cl"
            for variant in VARIANTS:
                for residual in (False, True):
                    for step, kernel in KERNELS[layout].items():
                        run = partial(_run_kernel, step, layout, dtype, variant, residual)
                        name = f"{prefix}_{step}" + ("+residual" if residual else "")
                        yield name, dtype_name, variant, getattr(kernel, variant), run
        layout = layouts[0] if layouts else LAYOUTS[0]
        run = partial(_run_kernel, "running_update", layout, dtype, "serial", False)
        yield "running_update", dtype_name, "serial", running_update, run


def precompile(
    dtypes: Iterable[str] = tuple(DTYPES),
    layouts: Iterable[str] = LAYOUTS,
    log: Callable[[Specialization], None] | None = None,
) -> list[Specialization]:
    """Compile (or load from the disk cache) every kernel specialization of ``dtypes`` (keys
    of DTYPES: ``"float32"``, ``"float64"``, ``"bfloat16"``, ``"float16"``) and ``layouts``
    (``"channels_first"``, ``"channels_last"``), serial and parallel, without and with a
    residual, plus the running-statistics update of each dtype, so that no later call of
    these compiles; return what was done, in order. ``log`` is called after each one. The
    first-compile notice stays silent meanwhile."""
    done = []
    NOTICE.muted += 1
    try:
        for kernel, dtype_name, variant, dispatcher, run in _jobs(dtypes, layouts):
            source, seconds = _timed(dispatcher, run)
            done.append(Specialization(kernel, dtype_name, variant, source, seconds))
            if log:
                log(done[-1])
    finally:
        NOTICE.muted -= 1
    return done
