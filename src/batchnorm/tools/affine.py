"""The eval-mode affine map of a batch-norm layer, ``BN(x) = scale * x + shift``, and the
weight updates that move it into the Linear, Conv or ConvTranspose layer before or after
it (:func:`batchnorm.fold` decides where that is exact)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.reference import invstd_of

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Exact types only: a subclass may override forward (weight standardisation, quantisation...),
# and folding into it would silently change the model.
LAYERS = (nn.Linear, *CONV, *CONV_TRANSPOSE)
# Names of the frozen batch-norm classes of torchvision, timm, detectron2 and this package:
# buffers weight/bias/running_mean/running_var and an ``eps`` attribute, no running update.
_FROZEN_PREFIX = "FrozenBatchNorm"
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


# --------------------------------------------------------------------------- BN accessors


def is_batchnorm_like(module: nn.Module) -> bool:
    """True for batch-norm layers fold knows: any ``_BatchNorm`` (torch.nn's, ours, SyncBN)
    and frozen batch norms (torchvision/timm/detectron2 ``FrozenBatchNorm2d`` style)."""
    return isinstance(module, _BatchNorm) or _is_frozen_like(module)


def _is_frozen_like(module: nn.Module) -> bool:
    return (
        type(module).__name__.startswith(_FROZEN_PREFIX)
        and all(isinstance(getattr(module, n, None), Tensor) for n in _FROZEN_BUFFERS)
        and isinstance(getattr(module, "eps", None), float)
    )


def bn_affine(module: nn.Module) -> tuple[Tensor, Tensor] | str:
    """The eval-mode map of a batch-norm layer as float64 CPU ``(scale, shift)`` per channel,
    ``BN(x) = scale * x + shift``, or a string saying why it is not such a map.

    The activation of a fused BN+activation module is not part of the map (see
    :func:`fold`); any other extra computation (child modules) makes it not foldable.
    """
    if not is_batchnorm_like(module):
        return f"{type(module).__name__} is not a batch-norm layer"
    children = [name for name, _ in module.named_children()]
    if children:
        return (
            f"it has submodules ({', '.join(children)}) that compute more than batch norm; "
            f"fold only removes plain batch norm"
        )
    mean, var = module.running_mean, module.running_var
    if mean is None or var is None:
        return (
            "track_running_stats=False: it normalizes with the statistics of each batch even "
            "in eval mode, which is not a fixed affine map"
        )
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if any(t is not None and nn.parameter.is_lazy(t) for t in (mean, var, weight, bias)):
        return "it is an uninitialized lazy module; run one batch through the model first"
    scale = invstd_of(_f64(var), module.eps)
    if weight is not None:
        scale = scale * _f64(weight)
    shift = -_f64(mean) * scale
    if bias is not None:
        shift = shift + _f64(bias)
    return scale, shift


def _f64(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64)


def fused_activation(bn: nn.Module) -> str | None:
    """The activation a fused BN+activation module applies after the affine map, or None."""
    activation = getattr(bn, "activation", None)
    return None if activation in (None, "identity") else str(activation)


def num_channels(bn: nn.Module) -> int:
    return int(bn.running_mean.numel()) if bn.running_mean is not None else bn.num_features


# --------------------------------------------------------------------------- weight updates


def fold_into_previous(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """``BN(layer(x)) = layer'(x)``: scale the output channels of weight and bias."""
    w, b = _f64(layer.weight), _bias_f64(layer, out_channels(layer))
    ones = [1] * (w.dim() - 2)
    if isinstance(layer, CONV_TRANSPOSE):  # weight (in, out / groups, *k), grouped by input
        g = layer.groups
        w = (w.view(g, -1, *w.shape[1:]) * scale.view(g, 1, -1, *ones)).view(w.shape)
    else:  # Linear (out, in), Conv (out, in / groups, *k)
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    _assign(layer, w, b * scale + shift)


def fold_into_next(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """``layer(BN(x)) = layer'(x)`` for Linear and non-zero-padded Conv: scale the input
    channels of the weight and add the layer's response to the constant ``shift``."""
    w = _f64(layer.weight)  # Linear (out, in), Conv (out, in / groups, *k)
    out = w.shape[0]
    g = getattr(layer, "groups", 1)
    grouped = w.reshape(g, out // g, w.shape[1], -1)
    per_input = (g, 1, w.shape[1], 1)
    b = _bias_f64(layer, out) + (grouped * shift.view(per_input)).sum((2, 3)).reshape(out)
    _assign(layer, (grouped * scale.view(per_input)).reshape(w.shape), b)


def out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _bias_f64(layer: nn.Module, n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.float64) if layer.bias is None else _f64(layer.bias)


def _assign(layer: nn.Module, weight: Tensor, bias: Tensor) -> None:
    like = layer.weight
    with torch.no_grad():
        like.copy_(weight.to(like.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(like.device, like.dtype), like.requires_grad)
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))
