"""batchnorm: Batch Normalization for PyTorch — drop-in modules, fast kernels, model tools."""

from batchnorm import distributed, functional, nn, reference
from batchnorm.nn import *  # noqa: F403  (the layers: batchnorm.nn.__all__)
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
    *nn.__all__,
    "AuditReport",
    "FoldReport",
    "SkippedLayerWarning",
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
