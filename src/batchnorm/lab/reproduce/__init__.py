"""``batchnorm reproduce``: papers' experiments on MNIST-1D, one module each.

* :mod:`~batchnorm.lab.reproduce.ioffe2015`: Ioffe & Szegedy (2015), section 4.1, Figure 1
* :mod:`~batchnorm.lab.reproduce.santurkar2018`: Santurkar et al. (2018), "How Does Batch
  Normalization Help Optimization?": noisy BN and the loss landscape
* :mod:`~batchnorm.lab.reproduce.renorm2017`: Ioffe (2017), Batch Renormalization: BN with
  micro-batches and non-i.i.d. mini-batches, and what fixes it
* :mod:`~batchnorm.lab.reproduce.common`: run options, report and seed statistics shared
  by the commands

The names of ``ioffe2015`` stay importable from here (``batchnorm.lab.reproduce.steps_to``).
"""

from batchnorm.lab.reproduce.common import RunOptions
from batchnorm.lab.reproduce.ioffe2015 import (
    BATCH_SIZE,
    DEPTH,
    EVAL_EVERY,
    FIGURE,
    HIDDEN,
    LR,
    PROBE,
    STEPS,
    THRESHOLD,
    WITH,
    WITHOUT,
    last_activation_path,
    median_drift,
    results,
    run_ioffe2015,
    steps_to,
    summary_table,
    train_pair,
)

__all__ = [
    "BATCH_SIZE",
    "DEPTH",
    "EVAL_EVERY",
    "FIGURE",
    "HIDDEN",
    "LR",
    "PROBE",
    "STEPS",
    "THRESHOLD",
    "WITH",
    "WITHOUT",
    "RunOptions",
    "last_activation_path",
    "median_drift",
    "results",
    "run_ioffe2015",
    "steps_to",
    "summary_table",
    "train_pair",
]
