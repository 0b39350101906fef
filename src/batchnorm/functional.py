"""Functional batch norm with the signature and semantics of torch.nn.functional.batch_norm.

The work is done by :mod:`batchnorm.ops`; this layer checks the inputs and turns every
mistake into an error that says what was expected, what was given and what to do.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from batchnorm import ops
from batchnorm.backends import Call
from batchnorm.backends.aten import safe_batch_norm
from batchnorm.backends.cpp_cpu import CppBackend
from batchnorm.reference import ACTIVATIONS, INVERTIBLE_ACTIVATIONS

_HALF_DTYPES = (torch.float16, torch.bfloat16)


class InputError(ValueError, RuntimeError):
    """A value batch norm cannot take where torch raises RuntimeError (sizes that do not
    match, a device mismatch, missing running statistics in eval mode): both our ValueError
    with its hint and the class torch uses, so drop-in code that catches either still
    catches it."""


class InputTypeError(TypeError, NotImplementedError):
    """A dtype batch norm cannot take: a TypeError with our hint, and the class torch raises
    (NotImplementedError for an integer input, RuntimeError, its base, for mixed dtypes)."""


class ArgumentTypeError(TypeError, ValueError):
    """A constructor argument of the wrong type (torch: TypeError; batchnorm 0.1: ValueError)."""


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    negative_slope: float = 0.01,
    residual: Tensor | None = None,
    unbiased_running_var: bool = True,
) -> Tensor:
    """Batch normalization of ``input`` of shape (N, C, *), as ``torch.nn.functional.batch_norm``.

    In training mode the batch statistics normalize the input and, when given,
    ``running_mean``/``running_var`` are updated in place with factor ``momentum``
    (the running variance stores the unbiased estimate). In eval mode the running
    statistics normalize the input.

    Extensions (keyword-only): ``activation`` in ``"relu"``, ``"leaky_relu"`` (with
    ``negative_slope``), ``"silu"`` or ``None``, and ``residual``, a tensor of the input's
    shape added before the activation: ``y = act(BN(x) + residual)``, in one pass;
    ``"elu"`` (alpha 1) is accepted too. ``unbiased_running_var=False`` stores the biased
    batch variance in ``running_var``, as Keras and Flax do.
    """
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        activation, negative_slope, residual, where="batchnorm.functional.batch_norm",
        unbiased_running_var=unbiased_running_var,
    )  # fmt: skip


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
    residual: Tensor | None,
    where: str,
    unbiased_running_var: bool = True,
    keep_output_only: bool = False,
    reduction: ops.Reduction | None = None,
    layer_checked: bool = False,
) -> Tensor:
    """batch_norm with ``where`` naming the caller (a layer) in error messages.

    ``keep_output_only`` saves only the output for backward and recovers the input from it
    (InPlace-ABN); the activation must then be invertible and there is no residual.
    ``reduction``: the cross-process step of SyncBatchNorm (see ops.Reduction); the
    "more than 1 value per channel" rule then applies to the global batch, in it.
    ``layer_checked``: a layer has checked the input's type and rank already (with its own
    message, see nn.base.check_layer_input), which are then not checked again."""
    if isinstance(input, Tensor) and input.dim() < 2 and input.numel() == 0:
        return input.clone()  # torch returns an empty input as it is, whatever its rank
    # the passing cases of check_eps and check_activation without their calls (this runs
    # on every call of every layer)
    if not (eps > 0 if training else eps >= 0):
        check_eps(eps, training, where)  # first, as torch does
    check_inputs(input, running_mean, running_var, weight, bias, residual, training, where,
                 check_count=reduction is None, check_rank=not layer_checked)  # fmt: skip
    if activation is None or activation not in ACTIVATIONS:
        activation = check_activation(activation, where)
    if keep_output_only:
        check_invertible(activation, negative_slope, where)
        if residual is not None:
            raise ValueError(
                f"{where}: a residual cannot be added when only the output is kept for "
                f"backward (the input could not be recovered). Hint: add it before the layer."
            )
    call = Call(input, training, activation, negative_slope, residual is not None,
                keep_output_only, unbiased_running_var, weight, bias, running_mean, running_var,
                residual, 0.0 if momentum is None else momentum, eps)  # fmt: skip
    return ops.batch_norm(call, reduction)


def _layer_call(call: Call | tuple, steps: Tensor | None = None) -> Tensor | None:
    """A layer's call (an input the layer has checked: type, rank, channels) done the way
    ``_batch_norm`` would end up doing it, without the Python between: the checks of
    ``check_inputs`` that pass in the usual case, then the dispatch, then the picked
    backend, directly (ops.run_kernels for kernels). Plain calls on ATen go straight to
    ``torch.batch_norm`` in eval and ``backends.aten.safe_batch_norm`` (its shift included) in
    training. That Python costs a quarter of a (100, 128) eval call, and more between the
    convolutions of a model, where it runs with cold caches (docs/performance.md).

    None when the call is not a usual one, or when a check of ``check_inputs`` would fail:
    the caller then takes ``_batch_norm``, which raises the errors. Usual means: a plain
    floating-point tensor on CPU or CUDA; every other tensor of its device and dtype
    (float32 parameters and statistics for a half input, as under torch.autocast), the
    parameters and statistics (C,)-shaped and contiguous, a residual of the input's shape;
    both running statistics given (in training: both or neither); in training more than
    one value per channel; a valid eps and a known activation; an output that is not the
    only tensor kept for backward (InPlace-ABN); neither torch.compile nor forward-mode AD at
    work (ops.batch_norm treats those apart).

    Where the C++ backend is the one the dispatch asks first (the default), its calls take
    a shorter way: CppBackend.call_fields makes the same decision with fewer Python steps
    (a (100, 128) eval call 10.7 -> 9.6 µs, torch.nn's 11.1); the calls it does not take
    skip the tensors' checks here (``_usual_tensors``) where its own, stricter, passed.

    ``steps``: the layer's num_batches_tracked, counted (one up) where the call is made here,
    by the C++ node itself where it takes the call; left to the caller on None. ``call``
    may be a Call's fields in its order, as a layer gives them: a call that the C++ backend
    takes needs no Call built."""
    declined = 0  # backends at the registry's front that do not take the call
    front = ops.first_backend()
    usual = False  # whether the call's tensors are known to pass _usual_tensors
    if type(front) is CppBackend and call[0].is_cpu:  # in one step (CppBackend.call_fields)
        y = front.call_fields(*call, steps)
        if not isinstance(y, bool):
            return y
        # the C++ backend does not take the call (or a check below fails): the dispatch need
        # not ask it again, nor check again the tensors that its checks passed
        declined, usual = 1, y
    if type(call) is not Call:
        call = Call(*call)
    (input, training, activation, _, _, keep_output_only, _, weight, bias, running_mean,
     running_var, residual, momentum, eps) = call  # fmt: skip
    if not (usual or _usual_tensors(call)):
        return None
    if not (eps > 0 if training else eps >= 0):
        return None
    plain = residual is None and activation == "identity"
    if not (plain or activation in ACTIVATIONS):
        return None
    if keep_output_only or forward_ad._current_level >= 0 or torch.compiler.is_compiling():
        return None
    backend = ops.select(call, declined=declined)
    if steps is not None:
        steps.add_(1)
    if not backend.operator:
        return ops.run_kernels(call, backend)  # type: ignore[arg-type]
    if not plain or backend.name != "aten":
        return backend.batch_norm(call)  # type: ignore[attr-defined]
    if training or 1 in input.shape:  # a shift, or odd strides to repair (see safe_batch_norm)
        return safe_batch_norm(input, weight, bias, running_mean, running_var, training,
                               momentum, eps)  # fmt: skip
    return torch.batch_norm(input, weight, bias, running_mean, running_var, False, momentum,
                            eps, False)  # fmt: skip


def _usual_tensors(call: Call) -> bool:
    """The tensor checks of a usual call (see ``_layer_call``), those that the C++
    backend's ``takes`` makes too (stricter) where it is asked first."""
    (input, training, _, _, _, _, _, weight, bias, running_mean, running_var, residual, _,
     _) = call  # fmt: skip
    dtype, channels, on_cpu = input.dtype, input.shape[1], input.is_cpu
    if not ((on_cpu or input.is_cuda) and type(input) is Tensor):
        return False
    if training:  # both running statistics or neither; more than one value per channel
        if (running_mean is None) is not (running_var is None) or input.numel() <= channels:
            return False
    elif running_mean is None or running_var is None:
        return False
    device = None if on_cpu else input.device
    given = running_mean if running_mean is not None else weight if weight is not None else bias
    if given is None:  # else the input's dtype is checked against a floating parameter's
        if not input.is_floating_point():
            return False
    elif not (given.dtype is dtype or (given.dtype is torch.float32 and dtype in _HALF_DTYPES)):
        return False
    pdtype, shape = dtype if given is None else given.dtype, (channels,)
    for t in (weight, bias, running_mean, running_var):  # a loop: this runs on every call
        if t is not None and not (
            t.dtype is pdtype and t.shape == shape and t.is_contiguous()
            and (t.is_cpu if on_cpu else t.device == device)
        ):  # fmt: skip
            return False
    return residual is None or (
        type(residual) is Tensor and residual.dtype is dtype and residual.shape == input.shape
        and (residual.is_cpu if on_cpu else residual.device == device)
    )  # fmt: skip


def check_activation(activation: str | None, where: str) -> str:
    """The fused activation's name, ``"identity"`` for None; ValueError if it is unknown."""
    if activation is None:
        return "identity"
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{where}: unknown activation {activation!r}; expected one of "
            f"{[a for a in ACTIVATIONS if a != 'identity']} or None (no activation)."
        )
    return activation


def check_eps(eps: float, training: bool, where: str) -> None:
    """torch's rule: eps > 0 in training (the batch variance may be 0), eps >= 0 in eval."""
    if not (eps > 0 if training else eps >= 0):  # also refuses NaN
        rule = "positive in training" if training else "non-negative"
        raise ValueError(
            f"{where}: eps must be {rule}, got {eps}. Hint: eps keeps the division by "
            f"sqrt(var + eps) finite; the usual value is 1e-5."
        )


def check_invertible(activation: str, negative_slope: float, where: str) -> None:
    """The output-only backward must be able to undo the activation."""
    if activation not in INVERTIBLE_ACTIVATIONS:
        raise ValueError(
            f"{where}: activation {activation!r} cannot be inverted, so the input could not be "
            f"recovered from the output; expected one of {INVERTIBLE_ACTIVATIONS}."
        )
    if activation == "leaky_relu" and not negative_slope > 0:
        raise ValueError(
            f"{where}: leaky_relu needs negative_slope > 0 to be invertible, got "
            f"{negative_slope}. Hint: use e.g. 0.01."
        )


def check_inputs(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    training: bool,
    where: str,
    *,
    check_count: bool = True,
    check_rank: bool = True,
) -> None:
    """Raise TypeError/ValueError with a hint for anything batch norm cannot take.

    ``check_count=False`` skips the "more than 1 value per channel" rule, for callers that
    apply it to a larger batch than ``input`` (SyncBatchNorm checks the global batch);
    ``check_rank=False`` skips the type and rank checks a layer has made."""
    if check_rank and not isinstance(input, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(input).__name__}.")
    if not input.is_floating_point():
        raise InputTypeError(
            f"{where}: expected a floating-point input, got dtype {input.dtype}. "
            f"Hint: convert it first, e.g. input.float()."
        )
    if check_rank and input.dim() < 2:
        raise InputError(
            f"{where}: expected an input of shape (N, C, *) with at least 2 dimensions, got "
            f"shape {tuple(input.shape)}. Hint: a single sample needs a batch dimension, "
            f"e.g. input.unsqueeze(0)."
        )
    channels, device, dtype = input.shape[1], input.device, input.dtype
    shape, on_cpu = (channels,), input.is_cpu
    # A loop over a constant tuple, device and dtype read once, the usual case decided by a
    # few comparisons of C attributes: this runs on every call.
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is None or (t.dtype is dtype and t.shape == shape and on_cpu and t.is_cpu):
            continue
        if t.dim() != 1 or t.shape[0] != channels:
            raise InputError(
                f"{where}: the input has {channels} channels (dimension 1 of shape "
                f"{tuple(input.shape)}) but {name} has shape {tuple(t.shape)}. Hint: the "
                f"layer's num_features must equal the number of input channels."
            )
        if t.device != device:
            _check_same_device(where, input, name, t)
        if (
            t.dtype != dtype
            and not (dtype in _HALF_DTYPES and t.dtype == torch.float32)
            and input.numel()  # an empty batch has nothing to mix: torch returns it
        ):
            raise InputTypeError(
                f"{where}: input has dtype {dtype} but {name} has dtype {t.dtype}. "
                f"Hint: move the layer to the input's dtype (layer.to({dtype})) or "
                f"cast the input; only float16/bfloat16 inputs may use float32 parameters."
            )
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(
                f"{where}: expected residual to be a torch.Tensor or None, got "
                f"{type(residual).__name__}."
            )
        if residual.shape != input.shape:
            raise InputError(
                f"{where}: residual must have the input's shape {tuple(input.shape)}, got "
                f"{tuple(residual.shape)}."
            )
        _check_same_device(where, input, "residual", residual)
        if residual.dtype != dtype:
            raise InputTypeError(
                f"{where}: input has dtype {dtype} but residual has dtype {residual.dtype}. "
                f"Hint: cast the residual to the input's dtype (residual.to({dtype}))."
            )
    if training and (running_mean is None) != (running_var is None):
        given, missing = ("running_mean", "running_var")[:: 1 if running_var is None else -1]
        raise ValueError(
            f"{where}: running_mean and running_var must both be given or both be None, got "
            f"{given} without {missing}. Hint: pass both to update them, or neither."
        )
    if not training and (running_mean is None or running_var is None):
        raise InputError(
            f"{where}: eval mode needs running_mean and running_var, got None. Hint: pass "
            f"training=True to normalize with batch statistics."
        )
    if check_count and training and input.numel() == channels and channels > 0:
        raise ValueError(
            f"{where}: expected more than 1 value per channel when training, got input of "
            f"shape {tuple(input.shape)}. Hint: batch statistics need at least 2 values per "
            f"channel; call model.eval() for single-sample inference, use FrozenBatchNorm "
            f"(fixed statistics), train with larger batches, or SyncBatchNorm to take the "
            f"statistics over the batches of all processes."
        )


def _check_same_device(where: str, input: Tensor, name: str, t: Tensor) -> None:
    if t.device != input.device:
        raise InputError(
            f"{where}: input is on {input.device} but {name} is on {t.device}. Hint: move the "
            f"model and its inputs to the same device, e.g. model.to(input.device)."
        )
