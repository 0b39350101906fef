"""The batch-norm operation: backend dispatch, autograd and torch.library registration.

One forward and one backward implementation serve two entry points:

* eager mode calls them through a ``torch.autograd.Function``, whose per-call overhead is a
  fraction of a ``torch.library`` custom op's, which is too much for small layers (the
  figures: docs/performance.md);
* under ``torch.compile`` the same code runs as the custom ops ``batchnorm::forward`` and
  ``batchnorm::backward``, which have fake implementations and registered autograd, so
  compiled graphs do not break on them.

Backends implement the math of :mod:`batchnorm.reference` (the fallback for every dtype and
device); faster ones register themselves with :func:`register_backend`. In eager mode,
calls that ATen's own operator computes identically and faster (small inputs, plain eval)
go to ``torch.batch_norm`` instead: see :func:`_use_aten`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from batchnorm import reference


class Backend(Protocol):
    """What a kernel family provides. Inputs are already validated; weight/bias may be None."""

    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        eps: float,
        activation: str,
        negative_slope: float,
    ) -> tuple[Tensor, ...]:
        """Return (y, mean, biased var) for a batch with at least one value per channel, or
        (y, mean, biased var, invstd) to spare the caller computing invstd again."""
        ...

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        activation: str,
        negative_slope: float,
    ) -> Tensor: ...

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        training: bool,
        activation: str,
        negative_slope: float,
        need_dpre: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Return (dx, dweight, dbias, dpre); dpre = dL/d(residual), None unless needed."""
        ...


#: Optionally, a backend also has ``update_running_stats(running_mean, running_var, mean, var,
#: count, momentum, unbiased)``, the in-place update of reference.update_running_stats (same
#: formula, tested against it), which eager mode then calls instead.


class ReferenceBackend:
    """Plain torch ops; correct for every dtype and device."""

    name = "reference"

    def forward_train(self, x, weight, bias, residual, eps, activation, negative_slope):
        mean, var = reference.batch_stats(x)
        invstd = reference.invstd_of(var, eps)
        y = reference.forward(x, mean, invstd, weight, bias, residual, activation, negative_slope)
        return y, mean, var

    def forward_eval(self, x, weight, bias, residual, mean, invstd, activation, negative_slope):
        return reference.forward(
            x, mean, invstd, weight, bias, residual, activation, negative_slope
        )

    def backward(
        self, dy, x, weight, bias, residual, mean, invstd, training, activation, negative_slope,
        need_dpre,
    ):  # fmt: skip
        dx, dw, db, dpre = reference.backward(
            dy, x, mean, invstd, weight, bias, residual, training, activation, negative_slope
        )
        return dx, dw, db, dpre if need_dpre else None


REFERENCE = ReferenceBackend()

# Backends tried in order; each is paired with a predicate saying whether it takes an input.
_BACKENDS: list[tuple[Callable[[Tensor], bool], Backend]] = []
_forced_backend: Backend | None = None


def register_backend(accepts: Callable[[Tensor], bool], backend: Backend) -> None:
    """Put a faster backend in front of the reference for the inputs it ``accepts``."""
    _BACKENDS.insert(0, (accepts, backend))


def select_backend(x: Tensor) -> Backend:
    if _forced_backend is not None:
        return _forced_backend
    for accepts, backend in _BACKENDS:
        if accepts(x):
            return backend
    return REFERENCE


#: The name under which tests and benchmarks force ATen's operator (see ``_use_aten``).
ATEN = "aten"
#: None: ATen where measurements say it is faster (the default); True: wherever it
#: computes the same thing; False: never.
_aten_policy: bool | None = None


class use_backend:
    """Context manager forcing one backend (``"reference"``, ``"aten"`` or a registered
    name); for tests and benchmarks."""

    def __init__(self, name: str) -> None:
        candidates = {REFERENCE.name: REFERENCE}
        candidates.update({b.name: b for _, b in _BACKENDS})  # type: ignore[attr-defined]
        if name != ATEN and name not in candidates:
            raise ValueError(f"unknown backend {name!r}; available: {available_backends()}")
        self.backend = None if name == ATEN else candidates[name]
        self.aten = name == ATEN

    def __enter__(self) -> Backend | None:
        global _forced_backend, _aten_policy
        self._previous = (_forced_backend, _aten_policy)
        _forced_backend, _aten_policy = self.backend, self.aten
        return self.backend

    def __exit__(self, *exc: object) -> None:
        global _forced_backend, _aten_policy
        _forced_backend, _aten_policy = self._previous


def available_backends() -> list[str]:
    names = [REFERENCE.name] + [b.name for _, b in _BACKENDS]  # type: ignore[attr-defined]
    return [*names, ATEN]


#: Below this many values a CPU batch norm costs more in Python around a kernel (the
#: autograd.Function, the kernel's call) than in the kernel: ATen's C++ operator, whose
#: autograd runs no Python, is faster there (`make bench` times the Numba path at (100, 128)
#: as ``ours_numba``: benchmarks/results/cpu_kernels.json, docs/performance.md). Same as the
#: Numba kernels' serial/parallel threshold.
ATEN_BELOW_NUMEL = 65_536


def _use_aten(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor | None,
    training: bool,
    activation: str,
    unbiased_running_var: bool,
    keep_output_only: bool,
) -> bool:
    """Whether torch.batch_norm (ATen) computes this call, exactly as we would, and faster.

    It can in PyTorch's running-statistics convention, followed by the activation and
    residual as separate (C++) ops. On CPU float32 and float64, `make bench` measured it
    faster for small inputs (epilogue included) and for plain BN in eval mode (its
    elementwise loop streams faster). Training on larger inputs stays on our Numba kernels,
    also for (N, C) and channels-last inputs where ATen is slightly faster: ATen's float32
    backward there loses accuracy on large batches (a test holds it). The measurements:
    benchmarks/results/cpu_kernels.json and docs/performance.md. Other devices and dtypes
    keep the reference path (tested on CUDA against torch.nn)."""
    if _aten_policy is False or not unbiased_running_var or keep_output_only:
        return False
    if (running_mean is None) != (running_var is None):
        return False
    if _aten_policy:
        return True
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if x.numel() < ATEN_BELOW_NUMEL:  # an epilogue too: a few C++ ops beat a Python call
        return True
    # Large inputs: eval of plain BN only; a fused epilogue saves whole passes over memory.
    return not training and activation == "identity" and residual is None


# ---------------------------------------------------------------------------------------
# The two implementations every entry point shares.


def forward_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor | None,
    training: bool,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (y, mean, invstd, var): the statistics that normalized x (mean and invstd are
    saved for backward; var, the biased batch variance, feeds the running update).

    Nothing is mutated here, so the function can back a functional custom op."""
    channels = x.shape[1]
    stats_dtype = reference.compute_dtype(x.dtype)
    backend = select_backend(x)
    if not training:
        mean = running_mean.to(stats_dtype, copy=True)  # type: ignore[union-attr]
        var = running_var.to(stats_dtype, copy=True)  # type: ignore[union-attr]
        invstd = reference.invstd_of(var, eps)
        y = backend.forward_eval(
            x, weight, bias, residual, mean, invstd, activation, negative_slope
        )
        return y, mean, invstd, var
    if x.numel() == 0:  # empty batch: empty output (the caller leaves the statistics alone)
        zeros = x.new_zeros(channels, dtype=stats_dtype)
        return torch.empty_like(x), zeros, zeros.clone(), zeros.clone()
    y, mean, var, *invstd = backend.forward_train(
        x, weight, bias, residual, eps, activation, negative_slope
    )
    return y, mean, invstd[0] if invstd else reference.invstd_of(var, eps), var


def backward_impl(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    activation: str,
    negative_slope: float,
    need_dpre: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Return (dx, dweight, dbias, dpre); dpre (= dL/d residual) is None unless needed."""
    if x.numel() == 0:
        zeros = mean.new_zeros(mean.shape)
        return torch.zeros_like(x), zeros, zeros.clone(), torch.zeros_like(x)
    dy = dy.to(x.dtype)
    return select_backend(x).backward(
        dy, x, weight, bias, residual, mean, invstd, training, activation, negative_slope,
        need_dpre,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Autograd, shared by the eager Function and the custom op. Both take the arguments of
# forward_impl: (x, weight, bias, running_mean, running_var, residual, training, eps,
# activation, negative_slope).


def _save(ctx, inputs: tuple, mean: Tensor, invstd: Tensor) -> None:
    x, weight, bias, _, _, residual, training, eps, activation, slope = inputs
    ctx.save_for_backward(x, weight, bias, residual, mean, invstd)
    ctx.config = (training, eps, activation, slope)


def _grads(ctx, dy: Tensor, backward_fn) -> tuple[Tensor | None, ...]:
    """Gradients for the arguments of ``forward_impl``, in order."""
    x, weight, bias, residual, mean, invstd = ctx.saved_tensors
    training, eps, activation, slope = ctx.config
    need_x, need_w, need_b, _, _, need_r = ctx.needs_input_grad[:6]
    if torch.is_grad_enabled():
        # create_graph=True: differentiate the reference math again so that higher-order
        # gradients are exact (the hand-written backward treats mean/invstd as constants).
        dx, dw, db, dr = _differentiable_grads(
            dy, x, weight, bias, residual, mean, invstd, training, eps, activation, slope
        )
    else:
        dx, dw, db, dr = backward_fn(
            dy, x, weight, bias, residual, mean, invstd, training, activation, slope, need_r
        )
        dw = dw.to(weight.dtype) if weight is not None else dw
        db = db.to(bias.dtype) if bias is not None else db
    keep = (need_x, need_w, need_b, False, False, need_r)
    grads = (dx, dw, db, None, None, dr)
    return tuple(g if k else None for g, k in zip(grads, keep, strict=True)) + (None,) * 4


def _differentiable_grads(dy, x, weight, bias, residual, mean, invstd, training, eps, act, slope):
    tensors = (x, weight, bias, residual)
    inputs = [t for t in tensors if t is not None and t.requires_grad]
    with torch.enable_grad():
        if training:
            mean, var = reference.batch_stats(x)
            invstd = reference.invstd_of(var, eps)
        y = reference.forward(x, mean, invstd, weight, bias, residual, act, slope)
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in tensors)


class _BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        y, mean, invstd, var = forward_impl(*inputs)
        _save(ctx, inputs, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd, var)
        return y, mean, invstd, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd, _dvar):
        return _grads(ctx, dy, backward_impl)


class _KeepOutputFunction(torch.autograd.Function):
    """Batch norm + invertible activation that saves its output instead of its input.

    Backward recovers x from y (reference.recover_input) and then runs the ordinary
    backward, so no formula is restated. Channels whose scale is too small to divide by
    (see reference.weak_channels) keep their input instead.
    """

    @staticmethod
    def forward(ctx, *inputs):
        x, weight, bias, _, _, _, training, eps, activation, slope = inputs
        y, mean, invstd, var = forward_impl(*inputs)
        weak = reference.weak_channels(weight, bias, x.shape[1], x.device)
        kept = x.index_select(1, weak) if weak.numel() else None
        ctx.save_for_backward(y, weight, bias, mean, invstd, weak, kept)
        ctx.config = (training, activation, slope)
        ctx.mark_non_differentiable(mean, invstd, var)
        return y, mean, invstd, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _dinvstd, _dvar):
        y, weight, bias, mean, invstd, weak, kept = ctx.saved_tensors
        training, activation, slope = ctx.config
        x = reference.recover_input(y, mean, invstd, weight, bias, activation, slope)
        if kept is not None:
            x.index_copy_(1, weak, kept.to(x.dtype))
        dx, dw, db, _ = backward_impl(
            dy, x, weight, bias, None, mean, invstd, training, activation, slope, False
        )
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(bias.dtype) if need_b else None
        return (dx if need_x else None, dw, db) + (None,) * 7


# ---------------------------------------------------------------------------------------
# torch.library custom ops, used under torch.compile.


@torch.library.custom_op("batchnorm::forward", mutates_args=())
def _forward_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor | None,
    training: bool,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, invstd, var = forward_impl(
        x, weight, bias, running_mean, running_var, residual, training, eps, activation,
        negative_slope,
    )  # fmt: skip
    return _like(y, x), mean, invstd, var


@_forward_op.register_fake
def _(x, weight, bias, running_mean, running_var, residual, training, eps, activation,
      negative_slope):  # fmt: skip
    stats = x.new_empty(x.shape[1], dtype=reference.compute_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats), torch.empty_like(stats)


def _forward_setup(ctx, inputs, output):
    _, mean, invstd, var = output
    _save(ctx, inputs, mean, invstd)
    ctx.mark_non_differentiable(mean, invstd, var)


def _forward_op_backward(ctx, dy, _dmean, _dinvstd, _dvar):
    return _grads(ctx, dy, _backward_op)


torch.library.register_autograd(
    "batchnorm::forward", _forward_op_backward, setup_context=_forward_setup
)


@torch.library.custom_op("batchnorm::backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    activation: str,
    negative_slope: float,
    need_dpre: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, dpre = backward_impl(
        dy, x, weight, bias, residual, mean, invstd, training, activation, negative_slope,
        need_dpre,
    )  # fmt: skip
    if dpre is None:  # a custom op returns tensors only
        return _like(dx, x), dw, db, x.new_empty(0)
    return _like(dx, x), dw, db, _like(dpre, x).clone() if dpre is dy else _like(dpre, x)


@_backward_op.register_fake
def _(dy, x, weight, bias, residual, mean, invstd, training, activation, negative_slope,
      need_dpre):  # fmt: skip
    dpre = torch.empty_like(x) if need_dpre else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean), dpre


def _like(t: Tensor, x: Tensor) -> Tensor:
    """Give ``t`` the strides of ``torch.empty_like(x)``, which the fake kernels promise."""
    if t.stride() == torch.empty_like(x, device="meta").stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
    unbiased_running_var: bool = True,
    keep_output_only: bool = False,
) -> Tensor:
    """Run the operation with autograd and update the running statistics when training.

    Inputs must already be validated (see :mod:`batchnorm.functional`)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and _use_aten(
        x, running_mean, running_var, residual, training, activation, unbiased_running_var,
        keep_output_only,
    ):  # fmt: skip
        # Updates the running statistics itself, with the same rule.
        y = torch.batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps, False
        )
        if residual is not None:
            y = y + residual
        return reference.activate(y, activation, negative_slope)
    args = (x, weight, bias, running_mean, running_var, residual, training, float(eps),
            activation, float(negative_slope))  # fmt: skip
    if compiling:
        y, mean, _, var = _forward_op(*args)
    elif torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual)
    ):
        function = _KeepOutputFunction if keep_output_only else _BatchNormFunction
        y, mean, _, var = function.apply(*args)
    else:
        y, mean, _, var = forward_impl(*args)
    if training and running_mean is not None and running_var is not None:
        count = x.numel() // max(x.shape[1], 1)
        update = reference.update_running_stats
        if not compiling:  # a backend may do the same update faster (eager mode only)
            update = getattr(select_backend(x), "update_running_stats", update)
        update(running_mean, running_var, mean, var, count, momentum, unbiased_running_var)
    return y


def _register_builtin_backends() -> None:
    """The Numba kernels take CPU float32/float64 inputs; without numba, the reference."""
    try:
        from batchnorm.kernels import cpu
    except ImportError:  # numba is a dependency, but a broken install should still import
        return
    register_backend(cpu.accepts, cpu.NumbaBackend(fallback=REFERENCE))


_register_builtin_backends()
