"""The two memory layouts the kernel backends compute in, and how a tensor gets there.

* ``"cf"`` (channels first, torch's default contiguous layout): x seen as (N, C, S), each
  (n, c) pair owning a contiguous row of S = prod(spatial) values;
* ``"cl"`` (channels last: ``channels_last``, ``channels_last_3d`` and plain (N, C)): x seen
  as (M, C), M = N * S rows of C contiguous values.

A tensor dense in one of them is used as it is; any other is copied into the nearer one.
"""

from __future__ import annotations

from torch import Tensor


def channels_last_order(x: Tensor) -> tuple[int, ...]:
    """The permutation that puts the channel dimension last."""
    return (0, *range(2, x.dim()), 1)


def layout_of(x: Tensor) -> str:
    """The layout x is in, or the nearer one if it is in neither (it will be copied)."""
    if x.dim() == 2:
        return "cl"
    if x.is_contiguous():
        return "cl" if x.numel() == x.shape[0] * x.shape[1] else "cf"
    if x.permute(channels_last_order(x)).is_contiguous():
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
