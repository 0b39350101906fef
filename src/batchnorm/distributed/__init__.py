"""Batch norm across processes and the few pieces a training script needs around it.

* :class:`SyncBatchNorm` (the layer, :mod:`batchnorm.nn.sync`; its protocol is described
  there), :func:`convert_sync_batchnorm`, :func:`revert_sync_batchnorm`,
  :func:`sync_message_bytes`;
* :mod:`~batchnorm.distributed.env`: :func:`init_from_env` (the process group torchrun
  describes), :func:`wrap_model` (DistributedDataParallel + SyncBatchNorm),
  :func:`gather_on_main`, :func:`local_slice`, :func:`shutdown`;
* :mod:`~batchnorm.distributed.launcher`: :func:`launch`, a local stand-in for torchrun
  (a module named apart from the function, which it would hide).
"""

from batchnorm.distributed.env import (
    DEFAULT_TIMEOUT_S,
    DistributedContext,
    gather_on_main,
    init_from_env,
    local_slice,
    shutdown,
    wrap_model,
)
from batchnorm.distributed.launcher import RankFailure, launch
from batchnorm.nn.sync import STATS_MESSAGE_DTYPE, SyncBatchNorm, sync_message_bytes
from batchnorm.tools.convert import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STATS_MESSAGE_DTYPE",
    "DistributedContext",
    "RankFailure",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "gather_on_main",
    "init_from_env",
    "launch",
    "local_slice",
    "revert_sync_batchnorm",
    "shutdown",
    "sync_message_bytes",
    "wrap_model",
]
