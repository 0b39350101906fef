"""Backends: the code that computes batch norm, one sub-package each.

A backend is an object with a ``name``, a ``supports(call)`` rule (can it compute this call
exactly?) and a ``preferred(call)`` rule (should the default dispatch give it this call? —
its thresholds, with the measurements behind them, live next to it). It is one of two kinds:

* a kernel backend (``operator = False``) provides the forward, backward and running-update
  kernels of :class:`KernelBackend`; :mod:`batchnorm.ops` wraps them in autograd, torch.func
  rules and custom ops, so a new device needs nothing else;
* an operator backend (``operator = True``) computes the whole call, autograd included
  (:class:`OperatorBackend`: ATen's own ``torch.batch_norm``).

A new device is one folder here and one line in :func:`builtin_backends`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class Call(NamedTuple):
    """What a batch-norm call asks of a backend. The first seven fields are what a dispatch
    rule may depend on; the rest complete the call for an operator backend (a kernel backend
    gets them as its kernels' arguments; ``select_kernels`` leaves them at the defaults)."""

    x: Tensor
    training: bool
    activation: str  # one of reference.ACTIVATIONS ("identity" for none)
    negative_slope: float
    has_residual: bool
    #: Keep only the output for backward (InPlace-ABN): ops recovers the input from it.
    keep_output_only: bool = False
    #: Store the unbiased batch variance in running_var (torch.nn's convention).
    unbiased_running_var: bool = True
    weight: Tensor | None = None
    bias: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    residual: Tensor | None = None
    momentum: float = 0.1
    eps: float = 1e-5


class Backend(Protocol):
    name: str
    #: True: ``batch_norm`` computes the whole call; False: the kernels of KernelBackend.
    operator: bool
    #: The device types it computes on (None: any), so that tests run it where it can.
    devices: tuple[str, ...] | None

    def supports(self, call: Call) -> bool:
        """Whether this backend computes ``call`` exactly (device, dtype, activation, ...)."""
        ...

    def preferred(self, call: Call) -> bool:
        """Whether the default dispatch gives it ``call`` (where it is measured fastest)."""
        ...


class KernelBackend(Backend, Protocol):
    """Kernels for inputs already validated; weight, bias and residual may be None. The
    statistics (mean, var, invstd) are in reference.compute_dtype(x.dtype)."""

    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        eps: float,
        activation: str,
        negative_slope: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(y, mean, biased var, invstd) of a batch with at least one value per channel."""
        ...

    # forward_eval and backward take the same tensors in the same order (backward after dy).
    def forward_eval(self, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     residual: Tensor | None, mean: Tensor, invstd: Tensor, activation: str,
                     negative_slope: float) -> Tensor:  # fmt: skip
        """y normalized with the given statistics."""
        ...

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                 residual: Tensor | None, mean: Tensor, invstd: Tensor, training: bool,
                 activation: str, negative_slope: float, need_dpre: bool,
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
        """(dx, dweight, dbias, dpre); dpre = dL/d(residual), None unless ``need_dpre``.
        dweight and dbias are Σdpre·x̂ and Σdpre, also in eval mode (SyncBatchNorm uses
        them as the local sums)."""
        ...

    #: reference.update_running_stats (its signature), in place.
    update_running_stats: Callable[[Tensor, Tensor, Tensor, Tensor, int, float, bool], None]

    # Optional: ``unfused(call) -> bool``, True for a call with an activation that runs
    # faster as the kernels' BN (residual included) followed by torch's activation op, which
    # the default dispatch then applies (see ops.run_kernels; a backend forced with
    # use_backend fuses). A backend without it fuses every activation it supports.


class OperatorBackend(Backend, Protocol):
    def batch_norm(self, call: Call) -> Tensor:
        """The whole call, autograd and the running update included."""
        ...


def builtin_backends() -> list[Backend]:
    """This package's backends in dispatch order (the reference last, as it takes any
    call). A backend whose package cannot be imported (numba or triton missing) is left
    out, so that a broken optional install never stops ``import batchnorm``."""
    from batchnorm.backends.aten import AtenBackend
    from batchnorm.backends.reference import ReferenceBackend

    gpu: list[Backend] = []
    gpu_kernels = None  # which inputs the GPU kernels take: ATen leaves them its slow calls
    # triton takes ~0.2 s to import: only where it can run (a GPU, or its interpreter)
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from batchnorm.backends.triton import TritonBackend, supports
        except ImportError:
            pass
        else:
            gpu, gpu_kernels = [TritonBackend()], supports
    from batchnorm.backends.cpp_cpu import CppBackend

    backends: list[Backend] = [CppBackend(), AtenBackend(gpu_kernels=gpu_kernels), *gpu]
    try:
        from batchnorm.backends.numba_cpu import NumbaBackend
    except ImportError:
        pass
    else:
        backends.append(NumbaBackend())
    backends.append(ReferenceBackend())
    return backends
