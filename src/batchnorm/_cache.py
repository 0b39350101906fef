"""Where the package keeps files between runs: one folder, ``$XDG_CACHE_HOME/batchnorm``
(``~/.cache/batchnorm``), a subfolder per use (generated data, compiled kernels, benchmark
results)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/batchnorm``, or ``~/.cache/batchnorm`` (read at each call, so that
    a test or a user can point it elsewhere)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batchnorm"
