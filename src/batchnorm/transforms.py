"""Model-level tools: swap batch-norm implementations in a model (see also
:mod:`batchnorm.folding` and :mod:`batchnorm.recalibration`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

# Exact-type pairs between torch.nn and this package.
_TORCH_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_OURS_TO_TORCH = {ours: theirs for theirs, ours in _TORCH_TO_OURS.items()}


def _swap(bn: nn.Module, new_type: type[nn.Module]) -> nn.Module:
    """A ``new_type`` layer with the options, state, modes, device and dtype of ``bn``."""
    any_tensor = bn.running_mean if bn.running_mean is not None else bn.weight
    factory = {} if any_tensor is None else {"device": any_tensor.device, "dtype": any_tensor.dtype}
    new = new_type(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **factory
    )
    if bn.affine and bn.bias is None:
        new.register_parameter("bias", None)
    with torch.no_grad():
        new.load_state_dict(bn.state_dict())
    for p_new, p_old in zip(new.parameters(), bn.parameters(), strict=True):
        p_new.requires_grad_(p_old.requires_grad)
    new.train(bn.training)
    return new


Builder = Callable[[nn.Module, type[nn.Module]], nn.Module]
#: convert's targets, one line each: which exact types to replace by which, and how to
#: build the replacement from the old layer.
_TARGETS: dict[str, tuple[dict[type[nn.Module], type[nn.Module]], Builder]] = {
    "batchnorm": (_TORCH_TO_OURS, _swap),
    "torch": (_OURS_TO_TORCH, _swap),
}
#: Targets announced but not in this build yet: convert says so instead of "unknown".
_PENDING = {"frozen": "FrozenBatchNorm1d/2d/3d are not part of this build yet"}


def convert(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Replace the batch-norm layers of ``model`` in place and return it.

    ``to="batchnorm"`` swaps every ``torch.nn.BatchNorm{1,2,3}d`` for this package's
    module; ``to="torch"`` swaps ours back; ``to="frozen"`` (once FrozenBatchNorm lands)
    freezes them. Weights, buffers, options, training mode, device and dtype are kept, so
    outputs do not change. A model that *is* a batch-norm layer is returned converted (the
    caller must use the return value).
    """
    if to in _PENDING and to not in _TARGETS:
        raise NotImplementedError(f"convert(to={to!r}): {_PENDING[to]}.")
    if to not in _TARGETS:
        known = sorted({*_TARGETS, *_PENDING})
        raise ValueError(f"convert: unknown target {to!r}; expected one of {known}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}.")
    mapping, build = _TARGETS[to]
    if type(model) in mapping:
        return build(model, mapping[type(model)])
    for name, child in list(model.named_children()):
        setattr(model, name, convert(child, to))
    return model
