"""batchnorm: Batch Normalization for PyTorch — drop-in modules, fast kernels, model tools."""

from batchnorm import functional, reference
from batchnorm.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)
from batchnorm.transforms import convert

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "convert",
    "functional",
    "reference",
]
