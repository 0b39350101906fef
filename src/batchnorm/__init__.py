"""batchnorm: Batch Normalization for PyTorch — drop-in modules, fast kernels, model tools."""

from batchnorm import functional, reference
from batchnorm.folding import FoldReport, fold
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.recalibration import recalibrate
from batchnorm.transforms import convert

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FoldReport",
    "convert",
    "fold",
    "functional",
    "recalibrate",
    "reference",
]
