"""The two memory layouts the kernel backends compute in, and how a tensor gets there.

* ``"cf"`` (channels first, torch's default contiguous layout): x seen as (N, C, S), each
  (n, c) pair owning a contiguous row of S = prod(spatial) values;
* ``"cl"`` (channels last: ``channels_last``, ``channels_last_3d`` and plain (N, C)): x seen
  as (M, C), M = N * S rows of C contiguous values.

A tensor dense in one of them is used as it is; any other is copied into the nearer one.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The memory format whose contiguity is the cl layout, by input rank.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last_order(x: Tensor) -> tuple[int, ...]:
    """The permutation that puts the channel dimension last."""
    return (0, *range(2, x.dim()), 1)


def layout_of(x: Tensor) -> str:
    """The layout x is in, or the nearer one if it is in neither (it will be copied)."""
    if x.dim() == 2:
        return "cl"
    if x.is_contiguous():
        return "cl" if x.numel() == x.shape[0] * x.shape[1] else "cf"
    if _channels_last_dense(x) or x.permute(channels_last_order(x)).is_contiguous():
        return "cl"
    return "cl" if x.stride(1) < min(x.stride()[2:]) else "cf"


def in_layout(t: Tensor, layout: str) -> Tensor:
    """t dense in ``layout`` (a detached copy only if it is not); per-channel vectors and
    2-D tensors are simply made contiguous."""
    if layout == "cf" or t.dim() <= 2:
        return t if t.is_contiguous() else t.detach().contiguous()
    order = channels_last_order(t)
    moved = t.permute(order)
    if moved.is_contiguous():
        return t
    inverse = [order.index(i) for i in range(t.dim())]
    return moved.detach().contiguous().permute(inverse)


def dense_in_layout(x: Tensor) -> tuple[str, Tensor]:
    """(layout of x, x dense in it): ``layout_of`` and ``in_layout`` in one, with the usual
    cases (contiguous, channels_last) decided by one C call each (this runs for every
    tensor of every kernel call)."""
    if x.is_contiguous() or _channels_last_dense(x):
        return layout_of(x), x
    layout = layout_of(x)
    return layout, in_layout(x, layout)


def _channels_last_dense(x: Tensor) -> bool:
    """Whether x is channels_last (4-D) or channels_last_3d (5-D) contiguous: one C call,
    where permuting and testing costs about 1 µs."""
    memory_format = _CHANNELS_LAST.get(x.dim())
    return memory_format is not None and x.is_contiguous(memory_format=memory_format)


def like(t: Tensor, x: Tensor, layout: str) -> Tensor:
    """t (of x's shape) dense in ``layout``, x being dense in it: t itself if it has x's
    strides."""
    return t if t.stride() == x.stride() else in_layout(t, layout)
