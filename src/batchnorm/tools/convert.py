"""Model-level tools that swap the batch-norm layers of a model: between torch.nn's and
ours (:func:`convert`), to frozen ones and back (:func:`freeze`, :func:`unfreeze`), to
SyncBatchNorm and back (:func:`convert_sync_batchnorm`, :func:`revert_sync_batchnorm`).
Every swap picks its class from :data:`batchnorm.nn.FLAVOURS`. See also
:mod:`batchnorm.tools.fold` and :mod:`batchnorm.tools.recalibrate`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from batchnorm.nn import FLAVOURS, dims_of, dims_of_input, flavour, flavour_of
from batchnorm.nn.base import _BatchNormBase
from batchnorm.nn.frozen import _FrozenBatchNorm
from batchnorm.nn.sync import SyncBatchNorm


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


def freeze(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace every trainable batch-norm layer (torch.nn's and ours) by FrozenBatchNorm.

    The frozen layer computes what the original computes in eval mode (running
    statistics, affine map, fused activation), for any batch size, and never changes.
    Returns the model (changed in place; a model that is itself a BN is returned new) and
    a report with one line per layer changed or skipped, and why.
    """
    report: list[str] = []

    def swap(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module
        dims = dims_of(module)
        if dims is None or not module.track_running_stats:
            why = (
                "it has no running statistics (track_running_stats=False)"
                if not module.track_running_stats
                else "its input rank is unknown (e.g. SyncBatchNorm: revert it first)"
            )
            report.append(f"{name or '<model>'}: kept {type(module).__name__}, {why}")
            return module
        frozen = flavour("frozen", dims)(
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
    stays fused (a ``BatchNormAct``). Returns the model and a report, as :func:`freeze`.
    """
    report: list[str] = []

    def swap(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, _FrozenBatchNorm):
            return module
        dims = dims_of(module)
        factory = {"device": module.running_mean.device, "dtype": module.running_mean.dtype}
        if module.activation in (None, "identity"):
            bn = flavour("batchnorm", dims)(module.num_features, module.eps, **factory)
        else:
            bn = flavour("act", dims)(
                module.num_features, module.eps, activation=module.activation,
                negative_slope=module.negative_slope, **factory,
            )  # fmt: skip
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


def _swap_family(model: nn.Module, source: str, target: str) -> nn.Module:
    """Swap every layer of the ``source`` family (exact classes) for ``target``'s."""

    def swap(_name: str, module: nn.Module) -> nn.Module:
        kind = flavour_of(module)
        if kind is None or kind[0] != source:
            return module
        return _swap(module, flavour(target, kind[1]))

    return _replace_modules(model, swap)


#: convert's targets, one line each.
_TARGETS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "batchnorm": lambda model: _swap_family(model, "torch", "batchnorm"),
    "torch": lambda model: _swap_family(model, "batchnorm", "torch"),
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


# ---------------------------------------------------------------------------------------
# SyncBatchNorm

_TORCH_BATCH_NORMS = (*FLAVOURS["torch"].values(), nn.SyncBatchNorm)


def _convertible(module: nn.Module) -> bool:
    """torch.nn's batch norms (exact types) and ours whose computation is the plain one
    (BatchNorm1d/2d/3d and fused-activation layers). Variants that override forward (ghost,
    renorm, frozen, ...) keep their own behaviour and are left alone, as are subclasses of
    torch's classes, whose forward may do more than batch norm."""
    if isinstance(module, SyncBatchNorm):
        return False
    if type(module) in _TORCH_BATCH_NORMS:
        return True
    return isinstance(module, _BatchNormBase) and type(module).forward is _BatchNormBase.forward


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace the batch-norm layers of ``module`` by :class:`SyncBatchNorm`, in place, and
    return it (a module that is itself a batch-norm layer is returned converted).

    Converts torch.nn's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` and this package's plain
    and fused-activation layers (the activation stays fused); weights, buffers, options,
    ``requires_grad``, training mode, device and dtype are kept, and each new layer remembers
    its original class for :func:`revert_sync_batchnorm`."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_sync_batchnorm: expected an nn.Module, got {type(module).__name__}."
        )
    if _convertible(module):
        sync = _swap(module, SyncBatchNorm)
        sync.process_group = process_group
        sync.activation = getattr(module, "activation", None)
        sync.negative_slope = getattr(module, "negative_slope", 0.01)
        sync.original_class = type(module)
        if hasattr(module, "qconfig"):
            sync.qconfig = module.qconfig
        return sync
    for name, child in list(module.named_children()):
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every :class:`SyncBatchNorm` in ``module`` back into a single-process layer, in
    place, and return it.

    A layer made by :func:`convert_sync_batchnorm` gets its original class back. One built
    directly becomes this package's ``BatchNorm1d/2d/3d``, chosen by the rank of the last
    input it saw (2-D/3-D: 1d, 4-D: 2d, 5-D: 3d); a layer that has never run, or saw another
    rank, raises ValueError. A fused activation stays fused: a plain ``BatchNormNd`` target
    becomes ``BatchNormActNd``."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"revert_sync_batchnorm: expected an nn.Module, got {type(module).__name__}."
        )
    if isinstance(module, SyncBatchNorm):
        return _revert(module)
    for name, child in list(module.named_children()):
        setattr(module, name, revert_sync_batchnorm(child))
    return module


def _revert(sync: SyncBatchNorm) -> nn.Module:
    rank = sync.last_input_rank
    dims = None if rank is None else dims_of_input(rank)
    target = sync.original_class or (None if dims is None else flavour("batchnorm", dims))
    if target is None:
        seen = "has not run yet" if rank is None else f"last saw a {rank}-D input"
        raise ValueError(
            f"revert_sync_batchnorm: {sync.layer_name} was not made by convert_sync_batchnorm "
            f"and {seen}, so the BatchNormNd to revert to is unknown. Hint: run one forward "
            f"pass first, or set layer.original_class (e.g. batchnorm.BatchNorm2d)."
        )
    kind = flavour_of(target)
    if sync.activation not in (None, "identity") and kind is not None and kind[0] == "batchnorm":
        target = flavour("act", kind[1])
    plain = _swap(sync, target)
    if isinstance(plain, nn.SyncBatchNorm):
        plain.process_group = sync.process_group
    if isinstance(plain, _BatchNormBase):
        for name in ("activation", "negative_slope"):
            if getattr(plain, name) != getattr(sync, name):
                setattr(plain, name, getattr(sync, name))
    elif sync.activation is not None:
        raise ValueError(
            f"revert_sync_batchnorm: {sync.layer_name} fuses activation "
            f"{sync.activation!r}, which {target.__name__} cannot apply. Hint: set "
            f"layer.original_class to one of batchnorm's classes."
        )
    if hasattr(sync, "qconfig"):
        plain.qconfig = sync.qconfig
    return plain
