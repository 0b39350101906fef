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

import torch
from torch import Tensor

from batchnorm import reference
from batchnorm.backends import Call
from batchnorm.ops.dispatch import select, select_kernels

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
    backend = select_kernels(x, training, activation, residual is not None)
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
    y, mean, var, invstd = backend.forward_train(
        x, weight, bias, residual, eps, activation, negative_slope
    )
    return y, mean, invstd, var


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
    backend = select_kernels(x, training, activation, residual is not None)
    return backend.backward(
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
    if not compiling:
        call = Call(x, training, activation, residual is not None, keep_output_only,
                    unbiased_running_var)  # fmt: skip
        backend = select(call)
        if backend.operator:
            return backend.batch_norm(  # type: ignore[attr-defined]
                x, weight, bias, running_mean, running_var, residual, training, momentum, eps,
                activation, negative_slope,
            )  # fmt: skip
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
        if compiling:  # plain torch ops, which the compiler traces
            update = reference.update_running_stats
        else:
            update = select_kernels(x, training, activation).update_running_stats
        update(running_mean, running_var, mean, var, count, momentum, unbiased_running_var)
    return y
