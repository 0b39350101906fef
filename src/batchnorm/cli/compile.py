"""``batchnorm compile``: compile the Numba CPU kernels into their disk cache ahead of time,
and build the C++ kernels (batchnorm.backends.cpp_cpu) into theirs.

The first call of a kernel specialization (kernel x dtype x serial/parallel x without/with
a residual) compiles it, which takes seconds each, and the first float32 or bfloat16
(N, C) or channels-last call builds the C++ kernels (1-2 minutes); this command does all of it
now, e.g. in a Docker image's build, so that no training run waits for the compiler.
Kernels already in the cache are only loaded. The cache is next to the installed package,
or in the folder NUMBA_CACHE_DIR names. Numba uses a cache folder only where it can write,
so the user who later runs the model must be able to write this one: for an image run as
another user than the build's, e.g. ``ENV NUMBA_CACHE_DIR=/opt/numba-cache`` and
``RUN batchnorm compile && chmod -R a+rwX /opt/numba-cache``. The C++ kernels are cached
under ``$XDG_CACHE_HOME`` (``~/.cache/batchnorm/cpp``), which such an image sets the same
way.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from batchnorm.cli.common import command_parser


def add_parser(commands: Any) -> None:
    """Register ``batchnorm compile`` on the CLI's subparsers."""
    from batchnorm.backends.numba_cpu.compilation import DTYPES, LAYOUTS

    parser = command_parser(
        commands,
        "compile",
        "compile the Numba and C++ CPU kernels into their disk caches now (e.g. in a Docker build)",
        __doc__,
        run,
    )
    parser.add_argument(
        "--dtype", action="append", choices=list(DTYPES),
        help="only this dtype (repeatable; default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--layout", action="append", choices=list(LAYOUTS),
        help="only this layout (repeatable; default: all): channels_first is a contiguous "
        "(N, C, *) input, channels_last a channels_last(_3d) or 2-D (N, C) one",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from batchnorm.backends.numba_cpu.compilation import DTYPES, LAYOUTS, cache_dir, precompile

    where = cache_dir()
    if where is None:
        print(
            "batchnorm compile: error: no writable folder for Numba's cache, so compiled "
            "kernels would last only this process. Hint: set NUMBA_CACHE_DIR to a writable "
            "folder.",
            file=sys.stderr,
        )
        return 1
    dtypes = list(dict.fromkeys(args.dtype or DTYPES))
    layouts = list(dict.fromkeys(args.layout or LAYOUTS))
    print(f"batchnorm compile: Numba CPU kernels, {', '.join(dtypes)}, {', '.join(layouts)}")
    print(f"cache  {where}", flush=True)

    def log(spec) -> None:
        print(
            f"  {spec.kernel:<20} {spec.dtype:<8} {spec.variant:<9} {spec.source:<22} "
            f"{spec.seconds:6.2f} s",
            flush=True,
        )

    start = time.perf_counter()
    done = precompile(dtypes, layouts, log)
    total = time.perf_counter() - start
    by_source: dict[str, list[float]] = {}
    for spec in done:
        by_source.setdefault(spec.source, []).append(spec.seconds)
    counts = "; ".join(
        f"{len(times)} {source} ({sum(times):.1f} s)" for source, times in by_source.items()
    )
    print(f"{len(done)} specializations: {counts}; {total:.1f} s in all")
    if "float32" in dtypes:
        _build_cpp()
    return 0


def _build_cpp() -> None:
    """Build (or load) the C++ kernels of the (N, C) and channels-last calls."""
    from batchnorm.backends import cpp_cpu

    start = time.perf_counter()
    cpp_cpu.extension()
    print(
        f"C++ kernels ((N, C) and channels-last): {cpp_cpu.outcome}, "
        f"{time.perf_counter() - start:.1f} s\ncache  {cpp_cpu.cache_dir()}"
    )
