"""Model-level tools that swap the batch-norm layers of a model: between torch.nn's and
ours (:func:`convert`), to frozen ones and back (:func:`freeze`, :func:`unfreeze`), to
SyncBatchNorm and back (:func:`convert_sync_batchnorm`, :func:`revert_sync_batchnorm`).

Each tool decides per module (:data:`Decision`) from what :func:`~batchnorm.tools.foreign.
identify` says it is: only classes whose computation is known (exact types: torch.nn's,
this package's, timm's and torchvision's) are replaced, by the class of
:data:`batchnorm.nn.FLAVOURS` that computes the same; every other batch-norm-like module is
kept, with the reason in the report (freeze, unfreeze) or in a :class:`SkippedLayerWarning`.
See also :mod:`batchnorm.tools.fold` and :mod:`batchnorm.tools.recalibrate`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn import dims_of_input, flavour, flavour_of
from batchnorm.nn.base import _BatchNormBase
from batchnorm.nn.frozen import _FrozenBatchNorm
from batchnorm.nn.sync import SyncBatchNorm
from batchnorm.tools.foreign import Known, identify, rebuild


class SkippedLayerWarning(UserWarning):
    """A model tool left batch-norm layers in place because it cannot replace them without
    changing what they compute (the message names each one and why)."""


#: What a tool decides for one module: its replacement, why it keeps it, or None when the
#: module is none of its business (not a batch norm, or already what the tool makes).
Decision = nn.Module | str | None


def _swap(bn: nn.Module, new_type: type[nn.Module], **options: Any) -> nn.Module:
    """A ``new_type`` layer with the options, state, modes, device and dtype of ``bn``;
    ``options`` (``activation``, ``negative_slope``) are set on this package's layers."""
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
    for name, value in options.items():
        if getattr(new, name) != value:
            setattr(new, name, value)
    new.train(bn.training)
    return new


def _from_foreign(new: nn.Module, old: nn.Module, known: Known) -> nn.Module:
    """Remember the class of another library that ``new`` replaces, for the way back."""
    if known.foreign:
        new.original_class = type(old)
    return new


def _replace(
    model: nn.Module, decide: Callable[[nn.Module], Decision]
) -> tuple[nn.Module, list[str], list[tuple[str, str, str]]]:
    """Apply ``decide`` to every module, top-down, in place: (model, report, skipped), the
    report with one line per layer changed or kept (and why), skipped the kept ones as
    (name, class, reason)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    report: list[str] = []
    skipped: list[tuple[str, str, str]] = []

    def visit(name: str, module: nn.Module) -> nn.Module:
        decision = decide(module)
        label = name or "<model>"
        if isinstance(decision, nn.Module):
            report.append(f"{label}: {type(module).__name__} -> {type(decision).__name__}")
            return decision
        if isinstance(decision, str):
            report.append(f"{label}: kept {type(module).__name__}, {decision}")
            skipped.append((label, type(module).__name__, decision))
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            setattr(module, child_name, visit(path, child))
        return module

    return visit("", model), report, skipped


#: How many layer names a warning lists for one reason.
_NAMES_SHOWN = 5


def _warn_skipped(tool: str, skipped: list[tuple[str, str, str]]) -> None:
    """One SkippedLayerWarning for the layers a tool kept, grouped by class and reason."""
    if not skipped:
        return
    groups: dict[tuple[str, str], list[str]] = {}
    for name, kind, reason in skipped:
        groups.setdefault((kind, reason), []).append(name)
    lines = []
    for (kind, reason), names in groups.items():
        shown = ", ".join(names[:_NAMES_SHOWN])
        more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
        lines.append(f"{shown}{more}: kept {kind}, {reason}")
    warnings.warn(
        f"{tool} left {len(skipped)} batch-norm layer(s) as they are:\n  " + "\n  ".join(lines),
        SkippedLayerWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------- the decisions


def _to_batchnorm(module: nn.Module) -> Decision:
    """torch.nn's batch norms, timm's BatchNormAct2d and FrozenBatchNormAct2d, torchvision's
    FrozenBatchNorm2d -> this package's layer that computes the same."""
    known = identify(module)
    if not isinstance(known, Known):
        return known
    if known.family == "torch":
        return _swap(module, flavour("batchnorm", known.dims))
    if known.family == "torch_sync":
        sync = _swap(module, SyncBatchNorm)
        sync.process_group = module.process_group
        sync.original_class = nn.SyncBatchNorm
        return sync
    if known.family == "timm_act":
        act = _swap(module, flavour("act", 2), activation=known.activation,
                    negative_slope=known.negative_slope)  # fmt: skip
        return _from_foreign(act, module, known)
    if known.foreign:  # a frozen layer of torchvision or timm
        return _from_foreign(_frozen(module, known), module, known)
    return None  # already ours


#: Why a layer of this package has no torch.nn twin, by family.
_NO_TORCH_TWIN = {
    "act": "torch.nn has no batch norm fused with an activation ({activation})",
    "sync": "torch.nn's SyncBatchNorm cannot fuse its activation ({activation})",
    "frozen": "torch.nn has no frozen batch norm (batchnorm.unfreeze makes it trainable)",
    "ghost": "torch.nn has no ghost batch norm",
    "renorm": "torch.nn has no batch renormalization",
    "inplace": "torch.nn has no in-place activated batch norm",
}


def _to_torch(module: nn.Module) -> Decision:
    """This package's layers -> torch.nn's (or the class of another library they were
    converted from, e.g. timm's BatchNormAct2d); layers without a twin are kept."""
    known = identify(module)
    if not isinstance(known, Known):
        ours = isinstance(module, (_BatchNormBase, _FrozenBatchNorm))
        return known if ours and isinstance(known, str) else None
    if known.foreign or known.family in ("torch", "torch_sync"):
        return None
    original = getattr(module, "original_class", None)
    if original is not None and known.family != "sync" and _is_foreign_class(original):
        return rebuild(original, module)
    if known.family == "batchnorm" or (known.family == "act" and known.activation is None):
        return _swap(module, flavour("torch", known.dims))
    if known.family == "sync" and known.activation is None:
        sync = _swap(module, nn.SyncBatchNorm)
        sync.process_group = module.process_group
        return sync
    return _NO_TORCH_TWIN[known.family].format(activation=known.activation)


def _is_foreign_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("timm", "torchvision")


def _frozen(module: nn.Module, known: Known) -> nn.Module:
    """This package's FrozenBatchNorm with the eval-mode function of ``module``."""
    frozen = flavour("frozen", known.dims)(
        module.num_features if hasattr(module, "num_features") else module.running_mean.numel(),
        module.eps,
        device=module.running_mean.device,
        dtype=module.running_mean.dtype,
        activation=known.activation,
        negative_slope=known.negative_slope,
    )
    with torch.no_grad():
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        if module.weight is not None:
            frozen.weight.copy_(module.weight)
        if module.bias is not None:
            frozen.bias.copy_(module.bias)
    frozen.train(module.training)
    return frozen


def _freeze(module: nn.Module) -> Decision:
    known = identify(module)
    if not isinstance(known, Known):
        return known if isinstance(module, _BatchNorm) else None  # frozen-like: frozen
    if known.frozen:
        return None
    if known.dims is None:
        return "its input rank is unknown (e.g. SyncBatchNorm: revert it first)"
    if not module.track_running_stats:
        return "it has no running statistics (track_running_stats=False)"
    return _frozen(module, known)


def _unfreeze(module: nn.Module) -> Decision:
    known = identify(module)
    if not isinstance(known, Known):
        return None if isinstance(module, _BatchNorm) else known  # frozen-like only
    if not known.frozen:
        return None
    factory = {"device": module.running_mean.device, "dtype": module.running_mean.dtype}
    if known.activation is None:
        bn = flavour("batchnorm", known.dims)(module.running_mean.numel(), module.eps, **factory)
    else:
        bn = flavour("act", known.dims)(
            module.running_mean.numel(), module.eps, activation=known.activation,
            negative_slope=known.negative_slope, **factory,
        )  # fmt: skip
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, key).copy_(getattr(module, key))
    return bn.train(module.training)


# --------------------------------------------------------------------------- the tools


def freeze(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace every trainable batch-norm layer whose computation is known by FrozenBatchNorm:
    torch.nn's ``BatchNorm1d/2d/3d``, this package's layers and timm's ``BatchNormAct2d``.

    The frozen layer computes what the original computes in eval mode (running
    statistics, affine map, fused activation), for any batch size, and never changes.
    Any other batch-norm layer (a subclass with its own forward or submodules, a layer
    without running statistics, SyncBatchNorm) is kept, with the reason in the report.
    Returns the model (changed in place; a model that is itself a BN is returned new) and
    a report with one line per layer changed or kept, and why.
    """
    model, report, _ = _replace(model, _freeze)
    return model, report


def unfreeze(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Turn every frozen batch norm whose computation is known (this package's
    FrozenBatchNorm, torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d) into a
    trainable BatchNorm of this package.

    Weights become parameters again, running statistics are kept, ``num_batches_tracked``
    starts at 0 and the training mode of each frozen layer is kept. A fused activation
    stays fused (a ``BatchNormAct``). Returns the model and a report, as :func:`freeze`.
    """
    model, report, _ = _replace(model, _unfreeze)
    return model, report


#: convert's targets.
_TARGETS: dict[str, Callable[[nn.Module], Decision]] = {
    "batchnorm": _to_batchnorm,
    "torch": _to_torch,
    "frozen": _freeze,
}


def convert(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Replace the batch-norm layers of ``model`` in place and return it.

    ``to="batchnorm"`` swaps every ``torch.nn.BatchNorm{1,2,3}d`` (and ``SyncBatchNorm``)
    for this package's module, timm's ``BatchNormAct2d`` for ``BatchNormAct2d`` and the
    frozen layers of torchvision and timm for ``FrozenBatchNorm2d``; ``to="torch"`` swaps
    ours back (to the class of the other library a layer came from, if any);
    ``to="frozen"`` turns every known BN with running statistics into a FrozenBatchNorm
    (as :func:`freeze`, whose report says what changed). Weights, buffers, options,
    training mode, device and dtype are kept, so outputs do not change (frozen layers
    compute what eval mode computes). A model that *is* a batch-norm layer is returned
    converted (the caller must use the return value).

    Layers whose computation a swap would change (unknown subclasses, a fused activation
    torch.nn lacks, ...) are kept, and a :class:`SkippedLayerWarning` names them and why.
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: unknown target {to!r}; expected one of {sorted(_TARGETS)}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}.")
    model, _, skipped = _replace(model, _TARGETS[to])
    _warn_skipped(f"convert(to={to!r})", skipped)
    return model


# ---------------------------------------------------------------------------------------
# SyncBatchNorm

#: The families convert_sync_batchnorm turns into SyncBatchNorm: plain batch norm, with a
#: fused activation or not (InPlace-ABN's function is BN + activation too).
_SYNCABLE = ("torch", "torch_sync", "batchnorm", "act", "inplace", "timm_act")


def _to_sync(module: nn.Module, process_group: Any) -> Decision:
    known = identify(module)
    if not isinstance(known, Known):
        return known if isinstance(module, _BatchNorm) else None  # frozen-like: nothing to sync
    if known.family in ("sync", "frozen") or known.frozen:
        return None  # synchronized already, or no batch statistics to synchronize
    if known.family not in _SYNCABLE:
        return (
            f"it computes its own training statistics ({known.family}), which SyncBatchNorm "
            f"would replace"
        )
    sync = _swap(module, SyncBatchNorm)
    sync.process_group = process_group
    sync.activation = known.activation
    sync.negative_slope = known.negative_slope
    sync.original_class = type(module)
    if hasattr(module, "qconfig"):
        sync.qconfig = module.qconfig
    return sync


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace the batch-norm layers of ``module`` by :class:`SyncBatchNorm`, in place, and
    return it (a module that is itself a batch-norm layer is returned converted).

    Converts torch.nn's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, this package's plain,
    fused-activation and in-place layers and timm's ``BatchNormAct2d`` (the activation
    stays fused); weights, buffers, options, ``requires_grad``, training mode, device and
    dtype are kept, and each new layer remembers its original class for
    :func:`revert_sync_batchnorm`. Other batch-norm layers are kept (a
    :class:`SkippedLayerWarning` names them and why); frozen ones need no synchronization."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_sync_batchnorm: expected an nn.Module, got {type(module).__name__}."
        )
    module, _, skipped = _replace(module, lambda m: _to_sync(m, process_group))
    _warn_skipped("convert_sync_batchnorm", skipped)
    return module


def _from_sync(module: nn.Module) -> Decision:
    if type(module) is SyncBatchNorm:
        return _revert(module)
    if isinstance(module, SyncBatchNorm):
        return identify(module)  # a subclass: why it is unknown
    return None


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every :class:`SyncBatchNorm` in ``module`` back into a single-process layer, in
    place, and return it.

    A layer made by :func:`convert_sync_batchnorm` gets its original class back. One built
    directly becomes this package's ``BatchNorm1d/2d/3d``, chosen by the rank of the last
    input it saw (2-D/3-D: 1d, 4-D: 2d, 5-D: 3d); a layer that has never run, or saw another
    rank, raises ValueError. A fused activation stays fused: a plain ``BatchNormNd`` target
    becomes ``BatchNormActNd``. Subclasses of SyncBatchNorm are kept (with a
    :class:`SkippedLayerWarning`)."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"revert_sync_batchnorm: expected an nn.Module, got {type(module).__name__}."
        )
    module, _, skipped = _replace(module, _from_sync)
    _warn_skipped("revert_sync_batchnorm", skipped)
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
    if _is_foreign_class(target):  # e.g. timm's BatchNormAct2d
        return rebuild(target, sync)
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
