"""The batch-norm operation: autograd, torch.library registration and the running update,
around the kernels of the backend that :mod:`batchnorm.ops.dispatch` picks.

One forward and one backward implementation serve two entry points:

* eager mode calls them through a ``torch.autograd.Function``, whose per-call overhead is a
  fraction of a ``torch.library`` custom op's, which is too much for small layers (the
  figures: docs/performance.md);
* under ``torch.compile`` the same code runs as the custom ops ``batchnorm::forward`` and
  ``batchnorm::backward``, which have fake implementations and registered autograd, so
  compiled graphs do not break on them.

An operator backend (ATen's ``torch.batch_norm``) takes the whole call instead, in eager
mode, where the dispatch prefers it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd import forward_ad

from batchnorm import reference
from batchnorm.backends import Call, KernelBackend
from batchnorm.backends.reference import ReferenceBackend
from batchnorm.ops.dispatch import forced, select, select_kernels
from batchnorm.ops.transforms import (
    apply_function,
    differentiated,
    is_wrapped,
    refuse_dual_statistics,
    refuse_unbatched_statistics,
)

_REFERENCE = ReferenceBackend()


class Reduction(Protocol):
    """The cross-process step of SyncBatchNorm (see batchnorm.nn.sync): the core computes
    with the statistics of the global batch, and makes its gradient that of the global
    batch, through these two calls. One object serves one call (it keeps the count)."""

    #: Values per channel in the global batch, known after ``statistics``.
    count: int

    def statistics(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The global batch's (mean, biased var), in the statistics dtype of x; None when
        every process's batch is empty."""
        ...

    def gradient_sums(self, sum_dpre: Tensor, sum_dpre_xhat: Tensor) -> tuple[Tensor, Tensor]:
        """The global sums of dL/dpre and dL/dpre * xhat, from this process's."""
        ...


#: Tensor types whose memory a kernel may read as it is.
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _all_readable(*tensors: Tensor | None) -> bool:
    """Whether a kernel can read the memory of every tensor given (None aside) as its values:
    plain tensors with storage and no lazy negation. Not: torch.func's wrappers, fake tensors
    (tracing, torch.export), other tensor subclasses, torch._neg_view tensors."""
    for t in tensors:  # a loop with the test written out: this runs on every call
        if t is not None and not (
            type(t) in _PLAIN_TENSORS and torch._C._has_storage(t) and not t.is_neg()
        ):
            return False
    return True


def _kernels(x: Tensor, training: bool, activation: str, slope: float, *tensors: Tensor | None,
             chosen: KernelBackend | None = None):  # fmt: skip
    """The kernel backend for a call: ``chosen``, the one the dispatch picked for it after
    checking that its tensors are readable (_all_readable, see batch_norm), else the
    dispatch's pick, or the reference where a tensor is not readable (its torch ops handle
    every tensor type: torch.func batches and differentiates them)."""
    if chosen is not None:
        return chosen
    if not _all_readable(x, *tensors):
        return _REFERENCE
    return select_kernels(x, training, activation, tensors[-1] is not None, slope)


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
    reduction: Reduction | None = None,
    chosen: KernelBackend | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (y, mean, invstd, var): the statistics that normalized x (mean and invstd are
    saved for backward; var, the biased batch variance, feeds the running update). With a
    ``reduction`` (training only), those of the global batch. ``chosen``: the kernel backend
    the dispatch picked for the call (else it is picked here).

    Nothing is mutated here, so the function can back a functional custom op."""
    backend = _kernels(x, training, activation, negative_slope, weight, bias, running_mean,
                       running_var, residual, chosen=chosen)  # fmt: skip
    if training and reduction is None and x.numel():  # the usual training call
        y, mean, var, invstd = backend.forward_train(
            x, weight, bias, residual, eps, activation, negative_slope
        )
        return y, mean, invstd, var
    stats_dtype = reference.compute_dtype(x.dtype)
    if not training:
        mean = running_mean.to(stats_dtype, copy=True)  # type: ignore[union-attr]
        var = running_var.to(stats_dtype, copy=True)  # type: ignore[union-attr]
        invstd = reference.invstd_of(var, eps)
        y = backend.forward_eval(
            x, weight, bias, residual, mean, invstd, activation, negative_slope
        )
        return y, mean, invstd, var
    stats = None if reduction is None else reduction.statistics(x.detach())
    if stats is None:  # empty batch: empty output (the caller leaves the statistics alone)
        zeros = x.new_zeros(x.shape[1], dtype=stats_dtype)
        return torch.empty_like(x), zeros, zeros.clone(), zeros.clone()
    mean, var = stats  # normalize this process's batch with the global statistics
    invstd = reference.invstd_of(var, eps)
    if x.numel() == 0:
        return torch.empty_like(x), mean, invstd, var
    y = backend.forward_eval(x, weight, bias, residual, mean, invstd, activation, negative_slope)
    return y, mean, invstd, var


def backward_impl(
    *args: Any, chosen: KernelBackend | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Return (dx, dweight, dbias, dpre) for the arguments of KernelBackend.backward (dy, x,
    weight, bias, residual, mean, invstd, training, activation, negative_slope, need_dpre);
    dpre (= dL/d residual) is None unless needed. ``chosen``: the forward's kernel backend."""
    dy, x, weight, bias, residual, mean, invstd, training, activation, slope, _ = args
    if x.numel() == 0:
        zeros = mean.new_zeros(mean.shape)
        return torch.zeros_like(x), zeros, zeros.clone(), torch.zeros_like(x)
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if chosen is not None and not _all_readable(dy):  # the forward checked the others
        chosen = None
    backend = _kernels(x, training, activation, slope, dy, weight, bias, mean, invstd, residual,
                       chosen=chosen)  # fmt: skip
    return backend.backward(dy, *args[1:])


# ---------------------------------------------------------------------------------------
# Autograd, shared by the eager Functions and the custom op. All take the arguments of
# forward_impl: (x, weight, bias, running_mean, running_var, residual, training, eps,
# activation, negative_slope).
#
# torch.func: the Functions keep forward and setup_context apart and set generate_vmap_rule,
# so vmap runs them on batched tensors (the kernels then fall back to the reference, see
# _kernels); forward-mode AD (jvp, jacfwd, forward-over-reverse) uses the closed form of
# reference.forward_tangent.


def _save(ctx, inputs: tuple, mean: Tensor, invstd: Tensor) -> None:
    x, weight, bias, _, _, residual, training, eps, activation, slope, *rest = inputs
    ctx.save_for_backward(x, weight, bias, residual, mean, invstd)
    if forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        # forward-mode AD may ask for the jvp (tangents flow only inside a dual level or a
        # torch.func transform, during this call)
        ctx.save_for_forward(x, weight, bias, residual, mean, invstd)
    ctx.config = (training, eps, activation, slope)
    # the eager Function's trailing arguments: the reduction and the chosen kernel backend
    ctx.reduction, ctx.kernels = (*rest, None, None)[:2]
    ctx.n_inputs = len(inputs)


def _tangent(ctx, dx, dweight, dbias, drunning_mean, drunning_var, dresidual, *_):
    """The tangent of y for the tangents of the inputs (jvp of the Functions). As in torch,
    the running statistics are never differentiated: their tangents are ignored (and
    refused where torch refuses them, see refuse_dual_statistics)."""
    x, weight, bias, residual, mean, invstd = ctx.saved_tensors
    training, _, activation, slope = ctx.config
    dy = reference.forward_tangent(
        x, mean, invstd, weight, bias, residual, dx, dweight, dbias, dresidual, training,
        activation, slope,
    )  # fmt: skip
    return dy, None, None, None


def _grads(ctx, dy: Tensor, backward_fn) -> tuple[Tensor | None, ...]:
    """Gradients for the arguments of ``forward_impl``, in order."""
    x, weight, bias, residual, mean, invstd = ctx.saved_tensors
    training, eps, activation, slope = ctx.config
    need_x, need_w, need_b, _, _, need_r = ctx.needs_input_grad[:6]
    tensors = (dy, x, weight, bias, residual)
    higher_order = torch.is_grad_enabled() and any(
        t is not None and (t.requires_grad or is_wrapped(t)) for t in tensors
    )
    if training and ctx.reduction is not None:
        if higher_order:
            raise RuntimeError(
                "SyncBatchNorm: gradients of its gradients (create_graph=True, torch.func) "
                "are not supported across processes. Hint: revert_sync_batchnorm(model) for "
                "single-process higher-order derivatives."
            )
        dx, dw, db, dr = _reduced_grads(
            dy, x, weight, bias, residual, mean, invstd, activation, slope, ctx.reduction,
            need_x, need_r,
        )  # fmt: skip
    elif higher_order:  # the gradient will be differentiated again
        dx, dw, db, dr = reference.differentiable_backward(
            dy, x, mean, invstd, eps, weight, bias, residual, training, activation, slope
        )
    else:
        dx, dw, db, dr = backward_fn(
            dy, x, weight, bias, residual, mean, invstd, training, activation, slope, need_r
        )
    if weight is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    if bias is not None and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    grads = (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None,
             dr if need_r else None)  # fmt: skip
    return grads + (None,) * (ctx.n_inputs - len(grads))  # the non-tensor arguments


def _reduced_grads(
    dy, x, weight, bias, residual, mean, invstd, activation, slope, reduction, need_x, need_r
):
    """Training gradients with a reduction: this process's sums from the kernels' eval-mode
    backward (Σdpre·x̂ = dweight, Σdpre = dbias), made global for dx only (the parameters'
    gradients stay local: DistributedDataParallel averages them), then dx by
    reference.input_grad with the global count."""
    if x.numel():
        _, dweight, dbias, dpre = backward_impl(
            dy, x, weight, bias, residual, mean, invstd, False, activation, slope,
            need_x or need_r,
        )  # fmt: skip
    else:
        dweight, dbias = mean.new_zeros(x.shape[1]), mean.new_zeros(x.shape[1])
        dpre = torch.zeros_like(x)
    dx = None
    # needs_input_grad is a property of the model, the same in every process, so either
    # every process makes this collective call or none does.
    if need_x:
        sum_dpre, sum_dpre_xhat = reduction.gradient_sums(dbias, dweight)
        if x.numel():
            xhat = reference.normalize(x, mean, invstd)
            dx = reference.input_grad(
                dpre.to(invstd.dtype), xhat, invstd, weight, sum_dpre, sum_dpre_xhat,
                reduction.count,
            ).to(x.dtype)  # fmt: skip
        else:
            dx = torch.zeros_like(x)
    return dx, dweight, dbias, dpre


class _Function(torch.autograd.Function):
    """What the two Functions share: forward_impl as forward, jvp by _tangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return forward_impl(*inputs)

    jvp = staticmethod(_tangent)


class _BatchNormFunction(_Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        _, mean, invstd, var = output
        _save(ctx, inputs, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd, var)
        # Gradients that are not defined come as None, as in torch.nn's layer: for the
        # statistics (not three tensors of zeros made for each call), and for y when the
        # layers after it give none (the parameters' .grad then stays None).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd, _dvar):
        if dy is None:  # without materialized gradients: y's gradient is undefined
            return (None,) * ctx.n_inputs
        return _grads(ctx, dy, partial(backward_impl, chosen=ctx.kernels))


class _KeepOutputFunction(_Function):
    """Batch norm + invertible activation that saves its output instead of its input.

    Backward recovers x from y (reference.recover_input) and then runs the ordinary
    backward, so no formula is restated. Channels whose scale is too small to divide by
    (see reference.weak_channels) keep their input instead.
    """

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _, _, residual, training, eps, activation, slope = inputs
        y, mean, invstd, var = output
        weak = reference.weak_channels(weight, bias, x.shape[1], x.device)
        kept = x.index_select(1, weak) if weak.numel() else None
        ctx.save_for_backward(y, weight, bias, mean, invstd, weak, kept)
        # forward-mode AD needs the input: it is at hand here (only backward recovers it)
        ctx.save_for_forward(x, weight, bias, residual, mean, invstd)
        ctx.config = (training, eps, activation, slope)
        ctx.mark_non_differentiable(mean, invstd, var)
        ctx.set_materialize_grads(False)  # see _BatchNormFunction

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _dinvstd, _dvar):
        if dy is None:  # as in _BatchNormFunction
            return (None,) * 10  # one per argument of forward
        y, weight, bias, mean, invstd, weak, kept = ctx.saved_tensors
        training, _, activation, slope = ctx.config
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


#: The custom ops' schemas: forward_impl's and backward_impl's arguments (a custom op
#: returns tensors only: backward's missing dpre is an empty tensor).
_FORWARD_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
    "Tensor? residual, bool training, float eps, str activation, float negative_slope) -> "
    "(Tensor, Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor mean, "
    "Tensor invstd, bool training, str activation, float negative_slope, bool need_dpre) -> "
    "(Tensor, Tensor, Tensor, Tensor)"
)


def _forward_op_impl(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, invstd, var = forward_impl(*args)
    return _like(y, args[0]), mean, invstd, var


_forward_op = torch.library.custom_op(
    "batchnorm::forward", _forward_op_impl, mutates_args=(), schema=_FORWARD_SCHEMA
)


@_forward_op.register_fake
def _(x: Tensor, *_: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    stats = x.new_empty(x.shape[1], dtype=reference.compute_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats), torch.empty_like(stats)


def _forward_setup(ctx, inputs, output):
    _, mean, invstd, var = output
    _save(ctx, inputs, mean, invstd)
    ctx.mark_non_differentiable(mean, invstd, var)


def _forward_op_backward(ctx, dy, _dmean, _dinvstd, _dvar):
    return _grads(ctx, dy, _backward_op)


_forward_op.register_autograd(_forward_op_backward, setup_context=_forward_setup)


def _backward_op_impl(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dy, x = args[:2]
    dx, dw, db, dpre = backward_impl(*args)
    if dpre is None:  # a custom op returns tensors only
        return _like(dx, x), dw, db, x.new_empty(0)
    return _like(dx, x), dw, db, _like(dpre, x).clone() if dpre is dy else _like(dpre, x)


_backward_op = torch.library.custom_op(
    "batchnorm::backward", _backward_op_impl, mutates_args=(), schema=_BACKWARD_SCHEMA
)


@_backward_op.register_fake
def _(dy: Tensor, x: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mean, need_dpre = args[3], args[-1]
    dpre = torch.empty_like(x) if need_dpre else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean), dpre


def _like(t: Tensor, x: Tensor) -> Tensor:
    """Give ``t`` the strides of ``torch.empty_like(x)``, which the fake kernels promise."""
    if t.stride() == torch.empty_like(x, device="meta").stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def batch_norm(call: Call, reduction: Reduction | None = None) -> Tensor:
    """Run the operation ``call`` with autograd and update the running statistics when
    training. With a ``reduction`` (SyncBatchNorm in training) the statistics, the gradient
    and the running update are those of the global batch.

    Inputs must already be validated (see :mod:`batchnorm.functional`)."""
    reduction = reduction if call.training else None
    compiling = torch.compiler.is_compiling() and reduction is None
    if forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): tangents may flow
        refuse_dual_statistics(call.x, call.training, call.running_mean, call.running_var)
    backend = None  # the kernel backend the dispatch picks (under torch.compile: forward_impl)
    if not compiling and reduction is None:
        backend = select(call)
        if backend.operator:
            return backend.batch_norm(call)  # type: ignore[attr-defined]
    return run_kernels(call, backend, reduction, compiling)  # type: ignore[arg-type]


def run_kernels(
    call: Call,
    backend: KernelBackend | None,
    reduction: Reduction | None = None,
    compiling: bool = False,
) -> Tensor:
    """The part of :func:`batch_norm` after the dispatch: ``call`` on the kernel ``backend``
    the dispatch picked for it (None with a ``reduction`` or when ``compiling``, which pick
    their kernels in forward_impl), with autograd and the running update. Layers call it
    directly once their own checks and the dispatch are done (see
    batchnorm.functional._layer_call)."""
    (x, training, activation, negative_slope, _, keep_output_only, unbiased_running_var,
     weight, bias, running_mean, running_var, residual, momentum, eps) = call  # fmt: skip
    # the default dispatch's choice (see KernelBackend): a forced backend fuses what it takes
    unfused = getattr(backend, "unfused", None)
    if activation != "identity" and unfused is not None and not forced() and unfused(call):
        y = run_kernels(call._replace(activation="identity"), backend, reduction, compiling)
        return reference.activate(y, activation, negative_slope)
    # the kernels read memory: torch.func's wrappers and other tensor types go to the
    # reference (see _kernels), decided here once for forward, backward and update
    chosen = None
    if backend is not None and _all_readable(x, weight, bias, running_mean, running_var,
                                             residual):  # fmt: skip
        chosen = backend
    args = (x, weight, bias, running_mean, running_var, residual, training, float(eps),
            activation, float(negative_slope))  # fmt: skip
    # the dispatch's kernels came with a check of every tensor's storage (see above)
    stored = chosen is not None
    if compiling:
        y, mean, _, var = _forward_op(*args)
    elif keep_output_only and differentiated(x, weight, bias, residual, stored=stored):
        y, mean, _, var = apply_function(_KeepOutputFunction, args, stored)
    elif differentiated(x, weight, bias, residual, stored=stored):
        y, mean, _, var = apply_function(_BatchNormFunction, (*args, reduction, chosen), stored)
    else:
        y, mean, _, var = forward_impl(*args, reduction, chosen)
    if training and running_mean is not None and running_var is not None:
        count = x.numel() // max(x.shape[1], 1) if reduction is None else reduction.count
        if compiling:  # plain torch ops, which the compiler traces
            update = reference.update_running_stats
        elif chosen is not None:
            update = chosen.update_running_stats
        else:
            refuse_unbatched_statistics(x, running_mean, running_var)
            kernels = _kernels(x, training, activation, negative_slope, running_mean, running_var)
            update = kernels.update_running_stats
        update(running_mean, running_var, mean, var, count, momentum, unbiased_running_var)
    return y
