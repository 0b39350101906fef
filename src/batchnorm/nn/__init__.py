"""The layers, and the one table of their flavours.

* :mod:`~batchnorm.nn.base`: the shell every trainable layer shares (``_BatchNormBase``),
  the 1d/2d/3d input ranks, the constructor checks;
* :mod:`~batchnorm.nn.batchnorm`: ``BatchNorm1d/2d/3d`` and ``BatchNormAct1d/2d/3d``;
* :mod:`~batchnorm.nn.renorm`, :mod:`~batchnorm.nn.ghost`, :mod:`~batchnorm.nn.frozen`,
  :mod:`~batchnorm.nn.inplace`: Batch Renormalization, Ghost BN, frozen BN, InPlace-ABN;
* :mod:`~batchnorm.nn.sync`: ``SyncBatchNorm``.

:data:`FLAVOURS` maps a family and the N of ``BatchNormNd`` to the class; the model tools
(:mod:`batchnorm.tools`) swap layers through it.
"""

from __future__ import annotations

import torch

from batchnorm.nn.base import DIMS_OF_INPUT_RANK
from batchnorm.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)
from batchnorm.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from batchnorm.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from batchnorm.nn.inplace import (
    InPlaceBatchNormAct1d,
    InPlaceBatchNormAct2d,
    InPlaceBatchNormAct3d,
)
from batchnorm.nn.lazy import (
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    LazyBatchNormAct1d,
    LazyBatchNormAct2d,
    LazyBatchNormAct3d,
)
from batchnorm.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from batchnorm.nn.sync import SyncBatchNorm

#: The layers, re-exported by ``batchnorm`` itself.
__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "InPlaceBatchNormAct1d",
    "InPlaceBatchNormAct2d",
    "InPlaceBatchNormAct3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LazyBatchNormAct1d",
    "LazyBatchNormAct2d",
    "LazyBatchNormAct3d",
    "SyncBatchNorm",
]

#: family -> N of ``BatchNormNd`` (1, 2, 3) -> layer class. ``"torch"`` is torch.nn's plain
#: batch norm; ``"sync"`` takes inputs of any rank and is listed under None.
FLAVOURS: dict[str, dict[int | None, type[torch.nn.Module]]] = {
    "torch": {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d},
    "batchnorm": {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d},
    "act": {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d},
    "renorm": {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d},
    "ghost": {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d},
    "frozen": {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d},
    "inplace": {1: InPlaceBatchNormAct1d, 2: InPlaceBatchNormAct2d, 3: InPlaceBatchNormAct3d},
    "sync": {None: SyncBatchNorm},
}
_FLAVOUR_OF = {cls: (family, dims) for family, by_dims in FLAVOURS.items()
               for dims, cls in by_dims.items()}  # fmt: skip


def flavour(family: str, dims: int | None) -> type[torch.nn.Module]:
    """The class of ``family`` for the inputs of ``BatchNorm{dims}d`` (any for "sync")."""
    by_dims = FLAVOURS[family]
    return by_dims[dims] if dims in by_dims else by_dims[None]


def flavour_of(layer: torch.nn.Module | type) -> tuple[str, int | None] | None:
    """(family, N) of a layer whose class is in :data:`FLAVOURS` (exactly, not a subclass:
    a subclass may compute more than its family does); None otherwise."""
    return _FLAVOUR_OF.get(layer if isinstance(layer, type) else type(layer))


def dims_of(layer: torch.nn.Module) -> int | None:
    """The N of a layer that is a ``BatchNormNd`` of some family (subclasses included: the
    input rank is theirs too); None for a rank-agnostic or unknown layer."""
    for by_dims in FLAVOURS.values():
        for dims, cls in by_dims.items():
            if dims is not None and isinstance(layer, cls):
                return dims
    return None


def dims_of_input(rank: int) -> int | None:
    """The N of the ``BatchNormNd`` that takes inputs of ``rank`` dimensions (2-5)."""
    return DIMS_OF_INPUT_RANK.get(rank)
