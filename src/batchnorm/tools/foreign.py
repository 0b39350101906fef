"""What the model tools know about a module: the batch-norm classes whose computation they
know exactly, this package's and other libraries', and why any other batch-norm-like module
is left alone.

A tool that replaces a layer must keep what the layer computes. Subclasses of torch's
``_BatchNorm`` may have their own ``forward`` or submodules (timm's ``BatchNormAct2d`` adds
an activation and a dropout), so the tools replace only the exact classes listed here and
skip every other batch-norm-like module with a reason (:func:`identify`).

Other libraries are never imported: their classes are recognised by name, module and
attributes (duck typing), and rebuilt from the class object the model already holds.

* timm's ``BatchNormAct2d`` (``timm.layers.norm_act``): a ``torch.nn.BatchNorm2d``
  followed by ``drop`` (``nn.Identity`` unless a drop layer was given) and ``act``; known
  when ``drop`` is ``nn.Identity`` and ``act`` is one this package fuses
  (:func:`fused_activation_of`);
* timm's ``FrozenBatchNormAct2d``: its frozen form (buffers, ``eps``, ``drop``, ``act``);
* torchvision's ``FrozenBatchNorm2d`` (``torchvision.ops.misc``): buffers ``weight``,
  ``bias``, ``running_mean``, ``running_var`` and ``eps``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from batchnorm.nn import FLAVOURS, flavour_of


def fused_activation_of(act: nn.Module) -> tuple[str | None, float] | None:
    """(activation, negative_slope) of this package for an activation module, or None when
    none of ours computes it."""
    kind = type(act)
    if kind is nn.ELU and act.alpha != 1.0:
        return None
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(act.negative_slope)
    names = {nn.Identity: None, nn.ReLU: "relu", nn.SiLU: "silu", nn.ELU: "elu"}
    return (names[kind], 0.01) if kind in names else None


_BUFFERS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Known:
    """A batch-norm layer whose computation the tools know.

    ``family`` is a key of :data:`batchnorm.nn.FLAVOURS`, ``"torch_sync"`` for
    ``torch.nn.SyncBatchNorm``, or a foreign kind (``"timm_act"``, ``"timm_frozen_act"``,
    ``"torchvision_frozen"``); ``dims`` the N of ``BatchNormNd`` (None: any rank);
    ``activation``/``negative_slope`` what follows the affine map."""

    family: str
    dims: int | None
    activation: str | None = None
    negative_slope: float = 0.01

    @property
    def foreign(self) -> bool:
        return self.family in FOREIGN

    @property
    def frozen(self) -> bool:
        return self.family in ("frozen", "timm_frozen_act", "torchvision_frozen")


def class_name(module: nn.Module | type) -> str:
    """``module.Class`` of a layer (or of a class), for reports."""
    cls = module if isinstance(module, type) else type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def identify(module: nn.Module) -> Known | str | None:
    """What ``module`` is for the tools: a :class:`Known` layer; a string saying why a
    batch-norm-like module is not one (the tools skip it with that reason); None for
    anything else."""
    kind = flavour_of(module)
    if kind is not None:
        activation = getattr(module, "activation", None)
        activation = None if activation == "identity" else activation
        return Known(*kind, activation, getattr(module, "negative_slope", 0.01))
    if type(module) is nn.SyncBatchNorm:
        return Known("torch_sync", None)
    for family, recognise in FOREIGN.items():
        result = recognise(module)
        if result is not None:
            return result if isinstance(result, str) else Known(family, 2, *result)
    if isinstance(module, LazyModuleMixin) and isinstance(module, _BatchNorm):
        return "it is an uninitialized lazy module; run one batch through the model first"
    if isinstance(module, _BatchNorm):
        return _unknown_subclass(module)
    if "FrozenBatchNorm" in type(module).__name__:
        return (
            f"{class_name(module)} is a frozen batch norm that batchnorm does not know, so what "
            f"it computes is unknown"
        )
    return None


def _unknown_subclass(module: nn.Module) -> str:
    base = next(c for c in type(module).__mro__[1:] if c in _KNOWN_BASES)
    library = "torch.nn" if base.__module__.startswith("torch") else "batchnorm"
    what = []
    if any(getattr(type(module), f, None) is not getattr(base, f, None)
           for f in ("forward", "_forward")):  # fmt: skip
        what.append("has its own forward")
    children = [name for name, _ in module.named_children()]
    if children:
        what.append(f"has submodules ({', '.join(children)})")
    extra = f" and {' and '.join(what)}" if what else ""
    return (
        f"{class_name(module)} subclasses {library}.{base.__name__}{extra}; only classes whose "
        f"computation is known are replaced"
    )


# --------------------------------------------------------------------------- foreign kinds


def _from(module: nn.Module, library: str, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.split(".")[0] == library


def _has_buffers(module: nn.Module) -> bool:
    buffers = dict(module.named_buffers(recurse=False))
    return all(isinstance(buffers.get(n), Tensor) for n in _BUFFERS) and isinstance(
        getattr(module, "eps", None), float
    )


def _drop_and_act(module: nn.Module) -> tuple[str | None, float] | str:
    """The fused activation of a timm norm+act layer, or why it has none of ours."""
    children = dict(module.named_children())
    if set(children) != {"drop", "act"}:
        return f"{class_name(module)} has submodules {sorted(children)}, not timm's drop and act"
    drop, act = children["drop"], children["act"]
    if type(drop) is not nn.Identity:
        return (
            f"its drop layer is a {type(drop).__name__}, which batchnorm's layers do not apply "
            f"(only nn.Identity is known)"
        )
    activation = fused_activation_of(act)
    if activation is None:
        return (
            f"its activation {act!r} is not one batchnorm fuses (nn.ReLU, nn.LeakyReLU, "
            f"nn.SiLU, nn.ELU with alpha=1, nn.Identity)"
        )
    return activation


def _timm_act(module: nn.Module) -> tuple | str | None:
    if not (_from(module, "timm", "BatchNormAct2d") and isinstance(module, nn.BatchNorm2d)):
        return None
    return _drop_and_act(module)


def _timm_frozen_act(module: nn.Module) -> tuple | str | None:
    if not (_from(module, "timm", "FrozenBatchNormAct2d") and _has_buffers(module)):
        return None
    return _drop_and_act(module)


def _torchvision_frozen(module: nn.Module) -> tuple | str | None:
    if not _from(module, "torchvision", "FrozenBatchNorm2d"):
        return None
    if not _has_buffers(module) or list(module.children()):
        return f"{class_name(module)} lacks the buffers or eps of torchvision's FrozenBatchNorm2d"
    return (None, 0.01)


#: Foreign kind -> recogniser: None (not this kind), (activation, negative_slope) or why not.
FOREIGN: dict[str, Callable[[nn.Module], tuple | str | None]] = {
    "timm_act": _timm_act,
    "timm_frozen_act": _timm_frozen_act,
    "torchvision_frozen": _torchvision_frozen,
}

#: The classes an unknown subclass is described as a subclass of.
_KNOWN_BASES = {cls for by_dims in FLAVOURS.values() for cls in by_dims.values()} | {
    nn.SyncBatchNorm,
    _BatchNorm,
}


# --------------------------------------------------------------------------- rebuilding


def activation_module(activation: str | None, negative_slope: float) -> nn.Module:
    """The torch.nn module of a fused activation (in place, as timm builds them)."""
    if activation is None:
        return nn.Identity()
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope, inplace=True)
    return {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU}[activation](inplace=True)


def rebuild(cls: type[nn.Module], layer: nn.Module) -> nn.Module:
    """A ``cls`` layer (a foreign class recorded as ``original_class``) with the state of
    this package's ``layer``, which computes the same."""
    activation = getattr(layer, "activation", None)
    negative_slope = getattr(layer, "negative_slope", 0.01)
    name = cls.__name__
    if name == "FrozenBatchNorm2d":  # torchvision: (num_features, eps)
        new = cls(layer.num_features, layer.eps)
    elif name == "FrozenBatchNormAct2d":  # timm: (num_features, eps, apply_act, ...)
        new = cls(layer.num_features, layer.eps, apply_act=False)
    else:  # timm's BatchNormAct2d: torch.nn.BatchNorm2d's arguments, then apply_act, ...
        new = cls(
            layer.num_features, layer.eps, layer.momentum, layer.affine,
            layer.track_running_stats, apply_act=False,
        )  # fmt: skip
    if hasattr(new, "act"):
        new.act = activation_module(activation, negative_slope)
    with torch.no_grad():
        for key, value in layer.state_dict().items():
            if key != "num_batches_tracked" or hasattr(new, key):
                setattr(new, key, _like(value, getattr(layer, key)))
    for p_new, p_old in zip(new.parameters(), layer.parameters(), strict=True):
        p_new.requires_grad_(p_old.requires_grad)
    return new.train(layer.training)


def _like(value: Tensor, source: Tensor | None) -> Tensor | nn.Parameter:
    copy = value.detach().clone()
    if isinstance(source, nn.Parameter):
        return nn.Parameter(copy, source.requires_grad)
    return copy
