"""Batch Normalization, the math in plain torch ops.

This file is the single statement of what every backend computes. It is the oracle of the
test-suite (run in float64) and the fallback backend wherever no fast kernel exists
(float16/bfloat16, CUDA, other devices).

Notation, for an input ``x`` of shape (N, C, *) and one channel c:

    M        = N * prod(*)                      values per channel
    mean     = sum(x) / M
    var      = sum((x - mean)^2) / M            biased: this is what normalizes
    invstd   = 1 / sqrt(var + eps)
    xhat     = (x - mean) * invstd
    pre      = weight * xhat + bias (+ residual)
    y        = act(pre)                         act in ACTIVATIONS

Running statistics follow PyTorch's convention:

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (unbiased)

(``unbiased=False`` stores ``var`` itself, the Keras/Flax convention.)

``momentum`` here is the factor actually applied; the modules turn ``momentum=None`` into a
cumulative average (factor 1 / num_batches_tracked) before calling down.

Backward in training mode (gradients flow through mean and var), with dpre = dL/dpre:

    dbias   = sum(dpre)
    dweight = sum(dpre * xhat)
    dx      = weight * invstd * (dpre - dbias / M - xhat * dweight / M)

In eval mode mean and invstd are constants, so dx = weight * invstd * dpre. SyncBatchNorm
uses the same dx formula with the sums and M of the global batch (see ``input_grad``).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Activations that can follow the normalization in the same call. "elu" has alpha 1.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "elu")
#: The ones that can be undone, which lets a layer keep only its output for backward.
INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")


def reduce_dims(x: Tensor) -> list[int]:
    """The dimensions statistics are taken over: all but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def per_channel(v: Tensor, x: Tensor) -> Tensor:
    """View a (C,) vector so that it broadcasts over x of shape (N, C, *)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics of half-precision inputs are accumulated in float32, as in PyTorch."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def channel_sum(t: Tensor, dims: list[int], divisor: int = 1) -> Tensor:
    """t summed over ``dims`` and divided by ``divisor``; float32 is summed and divided in
    float64 (a float32 sum over many values loses digits in proportion to their count, and
    a sum rounded before its division put the mean of a constant channel an ulp off its
    value), half precision in float32."""
    total = t.sum(dims, dtype=torch.float64 if t.dtype == torch.float32 else compute_dtype(t.dtype))
    if divisor != 1:
        total = total / divisor
    return total.to(compute_dtype(t.dtype))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, in two passes (no E[x²] − E[x]²): the mean,
    then the mean square of the deviations. An infinite value gives an infinite mean (and
    a NaN variance), as torch's sums do."""
    dims = reduce_dims(x)
    count = max(x.numel() // max(x.shape[1], 1), 1)
    values = x.to(compute_dtype(x.dtype))
    mean = channel_sum(values, dims, count)
    var = channel_sum((values - per_channel(mean, x)).square(), dims, count)
    return mean, var


def invstd_of(var: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(var + eps)


def activate(pre: Tensor, activation: str, negative_slope: float) -> Tensor:
    if activation == "identity":
        return pre
    if activation == "relu":
        return torch.relu(pre)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(pre, negative_slope)
    if activation == "silu":
        return torch.nn.functional.silu(pre)
    if activation == "elu":
        return torch.nn.functional.elu(pre)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def activation_grad(dy: Tensor, pre: Tensor, activation: str, negative_slope: float) -> Tensor:
    """dL/dpre from dL/dy, evaluated at the pre-activation ``pre``."""
    if activation == "identity":
        return dy
    # At a NaN pre-activation, torch's tests decide: relu and elu pass dy (theirs is
    # pre <= 0), leaky_relu scales it (pre > 0); relu's gradient below 0 is exactly 0.
    if activation == "relu":
        return torch.where(pre <= 0, torch.zeros_like(dy), dy)
    if activation == "leaky_relu":
        return torch.where(pre > 0, dy, dy * negative_slope)
    if activation == "silu":
        s = torch.sigmoid(pre)
        return dy * s * (1 + pre * (1 - s))
    if activation == "elu":
        return torch.where(pre <= 0, dy * torch.exp(pre), dy)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def invert_activation(y: Tensor, activation: str, negative_slope: float) -> Tensor:
    """The pre-activation that produced ``y`` (for activations in INVERTIBLE_ACTIVATIONS).

    elu saturates at -1: where y + 1 underflows to 0 the inverse is clamped to the
    smallest normal number, so x is only approximately recovered there — harmless, because
    the gradient elu'(pre) = y + 1 that multiplies it is 0 as well.
    """
    if activation == "identity":
        return y
    if activation == "leaky_relu":
        return torch.where(y > 0, y, y / negative_slope)
    if activation == "elu":
        tiny = torch.finfo(y.dtype).tiny
        return torch.where(y > 0, y, torch.log(torch.clamp(y + 1, min=tiny)))
    raise ValueError(
        f"activation {activation!r} cannot be inverted; expected one of {INVERTIBLE_ACTIVATIONS}"
    )


def pre_activation(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
) -> Tensor:
    """weight * (x - mean) * invstd + bias (+ residual), in the compute dtype."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    pre = (x.to(invstd.dtype) - per_channel(mean, x)) * per_channel(scale, x)
    if bias is not None:
        pre = pre + per_channel(bias.to(invstd.dtype), x)
    if residual is not None:
        pre = pre + residual.to(invstd.dtype)
    return pre


def forward(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str = "identity",
    negative_slope: float = 0.01,
) -> Tensor:
    """Normalize with the given statistics, apply the affine map and the activation."""
    pre = pre_activation(x, mean, invstd, weight, bias, residual)
    return activate(pre, activation, negative_slope).to(x.dtype)


#: A channel whose |weight| is below this fraction of max(|bias|, 1) cannot be divided by
#: safely when recovering x̂ = (pre - bias) / weight: the rounding error of the output,
#: eps * (|weight * x̂| + |bias|), becomes an error of eps * (|x̂| + |bias| / |weight|) in x̂,
#: i.e. at most ~100 eps here. Such channels keep their input for backward.
WEAK_WEIGHT_RATIO = 1e-2


def weak_channels(
    weight: Tensor | None, bias: Tensor | None, channels: int, device: torch.device
) -> Tensor:
    """Indices of the channels whose input cannot be recovered from the output."""
    if weight is None:
        return torch.empty(0, dtype=torch.long, device=device)
    floor = torch.ones_like(weight) if bias is None else bias.abs().clamp(min=1)
    return torch.nonzero(weight.abs() < WEAK_WEIGHT_RATIO * floor).flatten()


def recover_input(
    y: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    activation: str,
    negative_slope: float,
) -> Tensor:
    """Invert y = act(weight * (x - mean) * invstd + bias) for x (weak channels excepted)."""
    pre = invert_activation(y.to(invstd.dtype), activation, negative_slope)
    if bias is not None:
        pre = pre - per_channel(bias.to(invstd.dtype), y)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # weak: overwritten
    return (pre / per_channel(safe_scale, y) + per_channel(mean, y)).to(y.dtype)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
    unbiased: bool = True,
) -> None:
    """In-place exponential moving average; stores the unbiased variance (PyTorch's rule)
    unless ``unbiased=False`` (Keras/Flax store the biased one)."""
    if count == 0:  # an empty batch leaves the statistics alone, as torch.nn does
        return
    if unbiased and count > 1:
        var = var * (count / (count - 1))
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    training: bool = True,
    activation: str = "identity",
    negative_slope: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias, dpre) written out by hand; dpre is dL/dresidual."""
    dtype = invstd.dtype
    dims = reduce_dims(x)
    if activation == "identity":
        dpre = dy.to(dtype)
    else:
        pre = pre_activation(x, mean, invstd, weight, bias, residual)
        dpre = activation_grad(dy.to(dtype), pre, activation, negative_slope)
    xhat = normalize(x, mean, invstd)
    dbias = channel_sum(dpre, dims)
    dweight = channel_sum(dpre * xhat, dims)
    if training:
        dx = input_grad(dpre, xhat, invstd, weight, dbias, dweight, x.numel() // x.shape[1])
    else:
        scale = invstd if weight is None else invstd * weight.to(dtype)
        dx = dpre * per_channel(scale, x)
    return dx.to(x.dtype), dweight, dbias, dpre.to(x.dtype)


def differentiable_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    training: bool,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`backward` for a gradient that will be differentiated again (create_graph=True,
    torch.func): in training with the statistics recomputed from x (with ``eps``), so that
    they are differentiated too; the saved ``mean`` and ``invstd`` are constants, kept in
    eval, where they are the running statistics'."""
    if training:
        mean, var = batch_stats(x)
        invstd = invstd_of(var, eps)
    return backward(dy, x, mean, invstd, weight, bias, residual, training, activation,
                    negative_slope)  # fmt: skip


def forward_tangent(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    dx: Tensor | None,
    dweight: Tensor | None,
    dbias: Tensor | None,
    dresidual: Tensor | None,
    training: bool,
    activation: str = "identity",
    negative_slope: float = 0.01,
) -> Tensor:
    """The tangent of y (forward-mode derivative) for tangents of x, weight, bias and
    residual (None: zero). In training mean and invstd depend on x:

        dxhat = invstd * (dx - mean(dx) - xhat * mean(dx * xhat))      (eval: invstd * dx)
        dpre  = weight * dxhat + dweight * xhat + dbias + dresidual
        dy    = act'(pre) * dpre
    """
    dtype = invstd.dtype
    xhat = normalize(x, mean, invstd)
    dxhat = torch.zeros_like(xhat)
    if dx is not None:
        dx = dx.to(dtype)
        if training:
            dims = reduce_dims(x)
            dx = dx - dx.mean(dims, keepdim=True) - xhat * (dx * xhat).mean(dims, keepdim=True)
        dxhat = dxhat + dx * per_channel(invstd, x)
    dpre = dxhat if weight is None else dxhat * per_channel(weight.to(dtype), x)
    if dweight is not None:
        dpre = dpre + xhat * per_channel(dweight.to(dtype), x)
    if dbias is not None:
        dpre = dpre + per_channel(dbias.to(dtype), x)
    if dresidual is not None:
        dpre = dpre + dresidual.to(dtype)
    if activation != "identity":
        pre = pre_activation(x, mean, invstd, weight, bias, residual)
        dpre = activation_grad(dpre, pre, activation, negative_slope)
    return dpre.to(x.dtype)


def normalize(x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """xhat = (x - mean) * invstd, in the dtype of the statistics."""
    return (x.to(invstd.dtype) - per_channel(mean, x)) * per_channel(invstd, x)


def input_grad(
    dpre: Tensor,
    xhat: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dpre: Tensor,
    sum_dpre_xhat: Tensor,
    count: int,
) -> Tensor:
    """dL/dx in training mode from dL/dpre and the per-channel sums Σdpre and Σdpre·xhat over
    the ``count`` values that gave mean and invstd.

    Single-process batch norm passes its own batch's sums; SyncBatchNorm passes the sums and
    count of the global batch (all ranks), so both use this one formula."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    centered = (
        dpre - per_channel(sum_dpre / count, xhat) - xhat * per_channel(sum_dpre_xhat / count, xhat)
    )
    return centered * per_channel(scale, xhat)
