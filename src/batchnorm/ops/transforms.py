"""How a batch-norm call meets autograd's and torch.func's machinery: which calls need an
autograd Function, applying one cheaply, and torch's refusals of transforms that would
update running statistics they cannot hold."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad


def is_wrapped(t: Tensor) -> bool:
    """Whether t is a wrapper without storage: torch.func's batched and grad-tracking
    tensors, and the batched gradients of autograd.grad(is_grads_batched=True)."""
    return not torch._C._has_storage(t)


def refuse_dual_statistics(x: Tensor, training: bool, *stats: Tensor | None) -> None:
    """torch's rule (dual_level only): in eval mode, a dual input cannot be normalized with
    running statistics that carry a tangent too. (In training they only receive the update,
    and their tangent is ignored, as in torch.)"""
    if training or forward_ad.unpack_dual(x).tangent is None:
        return
    for t in stats:
        if t is not None and forward_ad.unpack_dual(t).tangent is not None:
            raise RuntimeError(
                "batch_norm: running_mean and running_var cannot have a forward-mode tangent "
                "(forward grad), as in torch: they are buffers that training updates. Hint: "
                "make the dual tensors from the input and parameters only."
            )


def differentiated(*tensors: Tensor | None, stored: bool = False) -> bool:
    """Whether autograd (backward or forward mode, torch.func included) may ask for a
    derivative of this call: then it runs through an autograd.Function. ``stored``: the
    caller has checked that every tensor has storage (none is a torch.func wrapper)."""
    if torch.is_grad_enabled():
        for t in tensors:  # loops, not any(genexpr): this runs on every call
            if t is not None and t.requires_grad:
                return True
    if forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): tangents may flow
        return True
    if not stored:
        for t in tensors:
            if t is not None and is_wrapped(t):  # torch.func transforms
                return True
    return False


def apply_function(
    function: type[torch.autograd.Function], args: tuple, stored: bool = False
) -> tuple[Tensor, ...]:
    """``function.apply(*args)``, without the Python of ``Function.apply`` where it has
    nothing to do: it binds the arguments to ``forward``'s signature (a no-op for
    ``forward(*inputs)``, but an ``inspect.signature`` per call: a third of a small layer's
    forward + backward), unwraps tensors left over from finished torch.func transforms (none
    here when every tensor has storage: ``stored``, if the caller checked it already) and
    hands calls under active transforms to torch.func, which then go through
    ``function.apply``."""
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    if not stored:
        for t in args:  # a loop, not all(genexpr): this runs on every call
            if isinstance(t, Tensor) and not torch._C._has_storage(t):
                return function.apply(*args)
    # what Function.apply calls last: the C++ apply of torch._C._FunctionBase
    return super(torch.autograd.Function, function).apply(*args)  # type: ignore[misc]


def refuse_unbatched_statistics(x: Tensor, *stats: Tensor) -> None:
    """torch's rule under torch.func.vmap: a batched input cannot update running statistics
    that are not batched (in place, they cannot take one value per vmapped slice). ATen's
    batching rule says so for its calls; this says it for the kernels' (which then run on
    the reference), where the update would fail on mismatched shapes."""
    is_batched = torch._C._functorch.is_batchedtensor
    if is_batched(x) and not all(is_batched(t) for t in stats):
        raise RuntimeError(
            "batch_norm under torch.func.vmap: the input is batched, but running_mean and "
            "running_var, which training updates in place, are not. Hint: vmap over the "
            "buffers too (torch.func.stack_module_state), build the layer with "
            "track_running_stats=False, or call torch.func.replace_all_batch_norm_modules_"
            "(model) first."
        )
