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


def _dims_of(module: nn.Module) -> int | None:
    """1, 2 or 3 for a batch-norm layer of known input rank."""
    from batchnorm.modules import _Dims1d, _Dims2d, _Dims3d
    from batchnorm.variants import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

    for dims, kinds in {
        1: (nn.BatchNorm1d, _Dims1d, FrozenBatchNorm1d),
        2: (nn.BatchNorm2d, _Dims2d, FrozenBatchNorm2d),
        3: (nn.BatchNorm3d, _Dims3d, FrozenBatchNorm3d),
    }.items():
        if isinstance(module, kinds):
            return dims
    return None


def freeze(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace every trainable batch-norm layer (torch.nn's and ours) by FrozenBatchNorm.

    The frozen layer computes what the original computes in eval mode (running
    statistics, affine map, fused activation), for any batch size, and never changes.
    Returns the model (changed in place; a model that is itself a BN is returned new) and
    a report with one line per layer changed or skipped, and why.
    """
    from batchnorm import variants

    frozen_types = {1: variants.FrozenBatchNorm1d, 2: variants.FrozenBatchNorm2d,
                    3: variants.FrozenBatchNorm3d}  # fmt: skip
    report: list[str] = []

    def swap(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module
        dims = _dims_of(module)
        if dims is None or not module.track_running_stats:
            why = (
                "it has no running statistics (track_running_stats=False)"
                if not module.track_running_stats
                else "its input rank is unknown (e.g. SyncBatchNorm: revert it first)"
            )
            report.append(f"{name or '<model>'}: kept {type(module).__name__}, {why}")
            return module
        frozen = frozen_types[dims](
            module.num_features,
            module.eps,
            device=module.running_mean.device,
            dtype=module.running_mean.dtype,
            activation=getattr(module, "activation", None),
            negative_slope=getattr(module, "negative_slope", 0.01),
        )
        with torch.no_grad():
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
            if module.weight is not None:
                frozen.weight.copy_(module.weight)
            if module.bias is not None:
                frozen.bias.copy_(module.bias)
        frozen.train(module.training)
        report.append(f"{name or '<model>'}: {type(module).__name__} -> {type(frozen).__name__}")
        return frozen

    return _replace_modules(model, swap), report


def unfreeze(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Turn every FrozenBatchNorm back into a trainable BatchNorm of this package.

    Weights become parameters again, running statistics are kept, ``num_batches_tracked``
    starts at 0 and the training mode of each frozen layer is kept. A fused activation
    stays fused. Returns the model and a report, as :func:`freeze`.
    """
    from batchnorm import modules, variants

    report: list[str] = []

    def swap(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, variants._FrozenBatchNorm):
            return module
        dims = _dims_of(module)
        bn_type = {1: modules.BatchNorm1d, 2: modules.BatchNorm2d, 3: modules.BatchNorm3d}[dims]
        bn = bn_type(module.num_features, module.eps, device=module.running_mean.device,
                     dtype=module.running_mean.dtype)  # fmt: skip
        if module.activation not in (None, "identity"):
            bn.activation, bn.negative_slope = module.activation, module.negative_slope
        with torch.no_grad():
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, key).copy_(getattr(module, key))
        bn.train(module.training)
        report.append(f"{name or '<model>'}: {type(module).__name__} -> {type(bn).__name__}")
        return bn

    return _replace_modules(model, swap), report


def _replace_modules(model: nn.Module, swap) -> nn.Module:
    """Apply ``swap(qualified_name, module)`` to every module, top-down, in place."""

    def visit(prefix: str, module: nn.Module) -> nn.Module:
        new = swap(prefix, module)
        if new is not module:
            return new
        for name, child in list(module.named_children()):
            setattr(module, name, visit(f"{prefix}.{name}" if prefix else name, child))
        return module

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    return visit("", model)


def _swap_types(model: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    def swap(_name: str, module: nn.Module) -> nn.Module:
        new_type = mapping.get(type(module))
        return module if new_type is None else _swap(module, new_type)

    return _replace_modules(model, swap)


#: convert's targets, one line each.
_TARGETS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "batchnorm": lambda model: _swap_types(model, _TORCH_TO_OURS),
    "torch": lambda model: _swap_types(model, _OURS_TO_TORCH),
    "frozen": lambda model: freeze(model)[0],
}


def convert(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Replace the batch-norm layers of ``model`` in place and return it.

    ``to="batchnorm"`` swaps every ``torch.nn.BatchNorm{1,2,3}d`` for this package's
    module; ``to="torch"`` swaps ours back; ``to="frozen"`` turns every BN with running
    statistics into a FrozenBatchNorm (as :func:`freeze`, whose report says what changed).
    Weights, buffers, options, training mode, device and dtype are kept, so outputs do not
    change (frozen layers compute what eval mode computes). A model that *is* a batch-norm
    layer is returned converted (the caller must use the return value).
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: unknown target {to!r}; expected one of {sorted(_TARGETS)}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}.")
    return _TARGETS[to](model)
