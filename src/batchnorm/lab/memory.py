"""How much memory autograd keeps for backward: what the in-place layers save."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def saved_tensor_bytes(step: Callable[[], Tensor]) -> int:
    """Bytes of distinct storages that autograd saves while ``step()`` builds its graph.

    Tensors saved by several ops (a layer's output that the next layer also saves) count
    once, as they do in memory. Parameters count too (identical across the compared
    models, they dilute rather than inflate a difference).
    """
    storages: dict[tuple[int, torch.device], int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(storages.values())
