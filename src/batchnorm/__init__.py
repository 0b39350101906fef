"""batchnorm: Batch Normalization for PyTorch — drop-in modules, fast kernels, model tools."""

from batchnorm import distributed, functional, reference
from batchnorm.distributed import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.transforms import convert

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "convert",
    "convert_sync_batchnorm",
    "distributed",
    "functional",
    "reference",
    "revert_sync_batchnorm",
]
