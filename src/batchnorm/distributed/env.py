"""A training script's side of torch.distributed: join the process group torchrun describes,
wrap the model in DistributedDataParallel (with SyncBatchNorm), gather results on rank 0,
share out work, leave."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from batchnorm.tools.convert import convert_sync_batchnorm

#: Process-group timeout of :func:`init_from_env`: a rank that stops answering makes the
#: others raise after this long (a dead process is noticed at once by gloo). Long enough for
#: a slow first step (data loading, compilation), far below torch's default of 30 minutes.
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_from_env(
    backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistributedContext:
    """Join the process group described by torchrun's environment variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and return this process's context.

    ``backend`` defaults to NCCL when CUDA is available (one GPU per local rank) and gloo
    otherwise. A process group that is already initialized is reused."""
    missing = [name for name in _ENV_VARS if name not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"init_from_env: environment variables {missing} are not set. Hint: start the "
            f"script with torchrun, e.g. `torchrun --nproc_per_node=2 -m batchnorm demo "
            f"--distributed`, or with batchnorm.distributed.launch."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend is None:
            use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
            backend = "nccl" if use_nccl else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    backend = dist.get_backend()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def wrap_model(
    model: nn.Module, context: DistributedContext, *, sync_batchnorm: bool = True
) -> nn.parallel.DistributedDataParallel:
    """Convert the model's batch norms to SyncBatchNorm (unless ``sync_batchnorm=False``),
    move it to the context's device and wrap it in DistributedDataParallel, which makes
    every rank start from rank 0's weights and averages gradients."""
    if sync_batchnorm:
        model = convert_sync_batchnorm(model)
    model = model.to(context.device)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def gather_on_main(obj: Any, context: DistributedContext) -> list[Any] | None:
    """Every rank's (picklable) ``obj``, in rank order, on rank 0; None on other ranks."""
    gathered: list[Any] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def local_slice(total: int, context: DistributedContext) -> slice:
    """This rank's contiguous share of ``total`` items; the first ``total % world_size``
    ranks get one more, so shares differ by at most one and cover everything in order."""
    base, extra = divmod(total, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return slice(start, start + base + (context.rank < extra))


def shutdown() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
