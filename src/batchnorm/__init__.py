"""batchnorm: Batch Normalization for PyTorch — drop-in modules, fast kernels, model tools."""

from batchnorm import distributed, functional, reference
from batchnorm.distributed import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from batchnorm.folding import FoldReport, fold
from batchnorm.interop import from_keras
from batchnorm.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)
from batchnorm.recalibration import recalibrate
from batchnorm.transforms import convert, freeze, unfreeze
from batchnorm.variants import (
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
    paper_dmax,
    paper_rmax,
)

__version__ = "0.1.0"

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
    "SyncBatchNorm",
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
