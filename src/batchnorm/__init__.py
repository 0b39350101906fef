"""batchnorm: Batch Normalization for PyTorch — drop-in modules, fast kernels, model tools."""

from batchnorm import distributed, functional, reference
from batchnorm.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    InPlaceBatchNormAct1d,
    InPlaceBatchNormAct2d,
    InPlaceBatchNormAct3d,
    SyncBatchNorm,
)
from batchnorm.nn.lazy import (
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    LazyBatchNormAct1d,
    LazyBatchNormAct2d,
    LazyBatchNormAct3d,
)
from batchnorm.nn.renorm import paper_dmax, paper_rmax
from batchnorm.tools.audit import AuditReport, audit
from batchnorm.tools.convert import (
    SkippedLayerWarning,
    convert,
    convert_sync_batchnorm,
    freeze,
    revert_sync_batchnorm,
    unfreeze,
)
from batchnorm.tools.fold import FoldReport, fold
from batchnorm.tools.keras import from_keras
from batchnorm.tools.recalibrate import recalibrate

__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FoldReport",
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
    "SkippedLayerWarning",
    "SyncBatchNorm",
    "audit",
    "convert",
    "convert_sync_batchnorm",
    "distributed",
    "fold",
    "freeze",
    "from_keras",
    "functional",
    "paper_dmax",
    "paper_rmax",
    "recalibrate",
    "reference",
    "revert_sync_batchnorm",
    "unfreeze",
]
