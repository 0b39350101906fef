"""Batch norm across processes: SyncBatchNorm on torch.distributed, and the few pieces a
training script needs around it (process group from torchrun's environment, DDP wrapping,
gathering results on rank 0, a local launcher).

Protocol of one SyncBatchNorm layer in one training step, for C channels:

* forward: ONE all_reduce (sum) of ``2C + 3`` float64 values per rank,
  ``[count, Σ(x − s), Σ(x − s)², b, b²]`` (b: the bit width of the dtype, see
  ``_global_stats``). From it every rank gets the global
  ``mean = s + Σ(x − s)/M`` and biased ``var = Σ(x − s)²/M − (mean − s)²``. The message
  has the same size whatever the world size W (torch.nn.SyncBatchNorm all-gathers
  ``W·(2C + 1)`` values instead).
* backward: ONE all_reduce (sum) of ``2C`` values in the statistics' dtype,
  ``[Σdpre, Σdpre·x̂]``, then ``dx = weight·invstd·(dpre − Σdpre/M − x̂·Σdpre·x̂/M)`` with the
  global M (:func:`batchnorm.reference.input_grad`, the formula of single-process BN).
* the first training step of a layer also all_reduces 4 integers (max of
  ``[C, −C, bits, −bits]``) so that layers whose ``num_features`` or dtype differ across
  ranks raise an error on every rank instead of mixing channels or hanging.

The shift s and the error bound. ``Σ(x − s)²/M − (mean − s)²`` cancels when the mean is far
from s, so (1) each rank computes its local mean m and variance v stably, m in float64 (see
``_local_stats``), and forms its shifted sums from them, ``Σ(x − s) = n·(m − s)`` and
``Σ(x − s)² = n·(v + (m − s)²)``; (2) the message is float64; (3) s is the layer's running
mean, identical on every rank (DDP broadcasts buffers from rank 0 before each forward, and
every rank updates them with the same global statistics; zero when the layer tracks no
running statistics). Rounding then changes the variance by at most about
``(W + 4)·2⁻⁵³·(var + (mean − s)²)``, on top of the local statistics' own rounding (the same
as in single-process BN). For float32 inputs with mean 1e4 and std 1 and s = 0 (the first
step) that is 1.1e-8·(W + 4) relative, about float32's resolution (1.2e-7) or below for up
to 8 ranks; once the running mean has caught up (momentum 0.1: a few dozen steps) the term
in ``(mean − s)²`` vanishes. Empty ranks send zeros and uneven batches are weighted by their
counts, so results equal single-process BN on the concatenated batch up to rounding.

Failures: a rank that dies makes the others' all_reduce fail (gloo: at once when the
connection drops, else after the process group's ``timeout``); the error is re-raised with
the layer's name and a hint. With NCCL, collectives are asynchronous and timeouts are
handled by NCCL's watchdog, which aborts the process group.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from batchnorm import reference
from batchnorm.functional import check_inputs
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase
from batchnorm.ops import select_backend
from batchnorm.transforms import _swap

#: dtype of the forward message: float64 keeps Σ(x − s)² − M·(mean − s)² accurate when the
#: shift is far from the mean (see the module docstring's error bound), for every input dtype.
STATS_MESSAGE_DTYPE = torch.float64

#: Process-group timeout of :func:`init_from_env`: a rank that stops answering makes the
#: others raise after this long (a dead process is noticed at once by gloo). Long enough for
#: a slow first step (data loading, compilation), far below torch's default of 30 minutes.
DEFAULT_TIMEOUT_S = 300.0


def sync_message_bytes(num_features: int, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes each rank contributes to the collectives of one SyncBatchNorm layer per training
    step, for inputs of ``dtype``: ``forward`` (statistics) and ``backward`` (gradient sums).

    Neither depends on the world size. The one-off agreement check of the first step
    (4 int64 values) is not counted."""
    stats_dtype = reference.compute_dtype(dtype)
    forward = (2 * num_features + 3) * torch.finfo(STATS_MESSAGE_DTYPE).bits // 8
    backward = 2 * num_features * torch.finfo(stats_dtype).bits // 8
    return {"forward": forward, "backward": backward}


# ---------------------------------------------------------------------------------------
# Collectives


def _all_reduce(tensor: Tensor, group: Any, where: str, what: str, op: Any = None) -> None:
    """all_reduce in place; a failure (dead or stuck peer, timeout) names the layer."""
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    except Exception as err:  # gloo raises RuntimeError/DistBackendError subclasses
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise RuntimeError(
            f"{where}: the all_reduce of {what} failed on rank {rank} of {world}. Hint: "
            f"another rank has probably crashed, timed out, or skipped this layer (every rank "
            f"must run the same layers in the same order in training mode, and backpropagate "
            f"through them); look at the other ranks' logs. Original error: {err}"
        ) from err


def _check_agreement(x: Tensor, group: Any, where: str) -> None:
    """Raise on every rank unless all ranks have the same channel count and statistics
    dtype. One all_reduce(max) of [C, −C, bits, −bits]: max(−v) = −min(v)."""
    channels = x.shape[1]
    bits = torch.finfo(reference.compute_dtype(x.dtype)).bits
    mine = torch.tensor([channels, -channels, bits, -bits], dtype=torch.int64, device=x.device)
    _all_reduce(mine, group, where, "the channel count check", op=dist.ReduceOp.MAX)
    most_c, minus_fewest_c, most_bits, minus_fewest_bits = mine.tolist()
    fewest_c, fewest_bits = -minus_fewest_c, -minus_fewest_bits
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if most_c != fewest_c:
        raise ValueError(
            f"{where}: num_features differ across the {world} ranks of the process group: "
            f"this rank (rank {rank}) has {channels}, the ranks have between {fewest_c} and "
            f"{most_c}. "
            f"Hint: every rank must build the same model; look for rank-dependent settings "
            f"in the code that creates the layers."
        )
    if most_bits != fewest_bits:
        raise ValueError(
            f"{where}: the ranks normalize in different dtypes (statistics of {fewest_bits} "
            f"and {most_bits} bits; this rank (rank {rank}) has input dtype {x.dtype}). "
            f"Hint: cast the model and its inputs to the same dtype on every rank."
        )


def _local_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's per-channel mean and biased variance, in float64.

    The mean must be more accurate than the input dtype: a float32 mean is off by up to
    eps32·|mean|, and that error enters the spread between the ranks' means to first order
    (single-process BN only sees its square). So the mean is summed in float64, and the
    variance is taken around it: the deviations d = x − round(mean) are small, their sums
    (in float64) give the variance and the correction to the rounded mean without
    cancellation. Plain sums are also faster on CPU than var_mean's Welford updates."""
    dtype = reference.compute_dtype(x.dtype)
    dims = reference.reduce_dims(x)
    count = x.numel() // x.shape[1]
    pivot = (x.sum(dims, dtype=STATS_MESSAGE_DTYPE) / count).to(dtype)
    deviation = x.to(dtype) - reference.per_channel(pivot, x)
    correction = deviation.sum(dims, dtype=STATS_MESSAGE_DTYPE) / count
    var = deviation.square().sum(dims, dtype=STATS_MESSAGE_DTYPE) / count - correction.square()
    return pivot.to(STATS_MESSAGE_DTYPE) + correction, var.clamp_(min=0)


def _global_stats(
    x: Tensor, shift: Tensor, group: Any, where: str
) -> tuple[Tensor, Tensor, int] | None:
    """The global batch's (mean, biased var) in float64 and its count per channel, from one
    all_reduce of [count, Σ(x − s), Σ(x − s)², b, b²]; None when every rank's batch is empty.

    b is the bit width of this rank's statistics dtype: the ranks agree on it if and only if
    W·Σb² = (Σb)² (Cauchy-Schwarz), checked on every step at the cost of two values, since
    the dtype, unlike the channel count, can change between steps and a backward message of
    mixed dtypes would abort the process group."""
    channels = x.shape[1]
    count = x.numel() // channels
    message = torch.zeros(2 * channels + 3, dtype=STATS_MESSAGE_DTYPE, device=x.device)
    bits = torch.finfo(reference.compute_dtype(x.dtype)).bits
    message[-2:] = torch.tensor([bits, bits * bits], dtype=STATS_MESSAGE_DTYPE)
    if count:
        mean, var = _local_stats(x)
        offset = mean - shift
        message[0] = count
        message[1 : channels + 1] = count * offset
        message[channels + 1 : 2 * channels + 1] = count * (var + offset * offset)
    _all_reduce(message, group, where, "batch statistics")
    bit_sum, bit_square_sum = message[-2:].tolist()  # exact: small integers
    world = dist.get_world_size(group)
    if world * bit_square_sum != bit_sum * bit_sum:
        raise ValueError(
            f"{where}: the ranks normalize in different dtypes in this step (this rank, rank "
            f"{dist.get_rank(group)} of {world}, has input dtype {x.dtype}). Hint: cast the "
            f"model and its inputs to the same dtype on every rank."
        )
    total = int(message[0].item())  # exact: float64 holds integers up to 2**53
    if total == 0:
        return None
    offset = message[1 : channels + 1] / total
    var = (message[channels + 1 : 2 * channels + 1] / total - offset * offset).clamp_(min=0)
    return shift + offset, var, total


# ---------------------------------------------------------------------------------------
# Autograd


def _normalize(x, weight, bias, residual, mean, invstd, activation, negative_slope) -> Tensor:
    if x.numel() == 0:  # an empty rank: nothing to normalize (backends need not take it)
        return torch.empty_like(x)
    return select_backend(x).forward_eval(
        x, weight, bias, residual, mean, invstd, activation, negative_slope
    )


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize with given global statistics; backward makes the gradient exact for the
    global batch with one all_reduce of [Σdpre, Σdpre·x̂]. mean and invstd come from
    ``x.detach()``: their dependence on x is accounted for here, in closed form."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean, invstd, count, activation, slope, group,
                where):  # fmt: skip
        ctx.save_for_backward(x, weight, bias, residual, mean, invstd)
        ctx.config = (count, activation, slope, group, where)
        return _normalize(x, weight, bias, residual, mean, invstd, activation, slope)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, residual, mean, invstd = ctx.saved_tensors
        count, activation, slope, group, where = ctx.config
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        channels, dtype = x.shape[1], invstd.dtype
        if x.numel():
            # Eval-mode backward of the backend: dpre and the local Σdpre·x̂ (= dweight) and
            # Σdpre (= dbias) with the global statistics; its eval-mode dx is not used.
            _, sum_dpre_xhat, sum_dpre, dpre = select_backend(x).backward(
                dy.to(x.dtype), x, weight, bias, residual, mean, invstd, False, activation,
                slope, need_x or need_r,
            )  # fmt: skip
        else:
            sum_dpre_xhat = sum_dpre = mean.new_zeros(channels)
            dpre = torch.zeros_like(x)
        dx = None
        # needs_input_grad[0] is a property of the model, the same on every rank, so either
        # all ranks make this all_reduce or none does.
        if need_x:
            sums = torch.cat([sum_dpre.to(dtype), sum_dpre_xhat.to(dtype)])
            _all_reduce(sums, group, where, "gradient sums")
            if x.numel():
                xhat = reference.normalize(x, mean, invstd)
                dx = reference.input_grad(
                    dpre.to(dtype), xhat, invstd, weight, sums[:channels], sums[channels:], count
                ).to(x.dtype)
            else:
                dx = torch.zeros_like(x)
        # dweight and dbias stay local: DistributedDataParallel reduces parameter gradients.
        dw = sum_dpre_xhat.to(weight.dtype) if need_w else None
        db = sum_dpre.to(bias.dtype) if need_b else None
        dr = dpre.to(residual.dtype) if need_r else None
        return (dx, dw, db, dr) + (None,) * 7


# ---------------------------------------------------------------------------------------
# The module


class SyncBatchNorm(_BatchNormBase):
    """Batch norm whose training statistics are those of the whole batch across the
    processes of ``process_group`` (default: the whole world), on CPU (gloo) or CUDA (NCCL).

    The constructor, parameters, buffers and state_dict are those of
    ``torch.nn.SyncBatchNorm``; inputs are (N, C, *) of any rank >= 2. Local batches may
    differ in size and be empty. In eval mode, without an initialized process group, or with
    a group of one process, it is plain batch norm and makes no collective call.

    ``activation``/``negative_slope`` (instance attributes, set by
    :func:`convert_sync_batchnorm` from a fused layer) apply the activation in the same pass.
    ``original_class`` is what :func:`revert_sync_batchnorm` turns the layer back into.
    """

    _ranks = None  # any rank >= 2
    _layout = "(N, C, *)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        self.process_group = process_group
        self.original_class: type[nn.Module] | None = None
        self.last_input_rank: int | None = None  # revert's choice when original_class is None
        self._agreed_group: int | None = None  # id of the group that passed the agreement check

    def _sync_group(self) -> tuple[Any, int]:
        """(group, its size); size 1 when there is nothing to synchronize with."""
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group, dist.get_world_size(group)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        self.last_input_rank = input.dim()
        group, world = self._sync_group()
        if not self.training or world <= 1:
            return super().forward(input, residual)
        where = self.layer_name
        track = self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        check_inputs(input, running_mean, running_var, self.weight, self.bias, residual, True,
                     where, check_count=False)  # fmt: skip
        activation = "identity" if self.activation is None else self.activation
        if activation not in reference.ACTIVATIONS:
            raise ValueError(
                f"{where}: unknown activation {activation!r}; expected one of "
                f"{[a for a in reference.ACTIVATIONS if a != 'identity'] + [None]}."
            )
        if self._agreed_group != id(group):
            _check_agreement(input, group, where)
            self._agreed_group = id(group)
        stats_dtype = reference.compute_dtype(input.dtype)
        shift = torch.zeros(self.num_features, dtype=STATS_MESSAGE_DTYPE, device=input.device)
        if running_mean is not None:
            shift.copy_(running_mean)
        stats = _global_stats(input.detach(), shift, group, where)
        if stats is None:  # every rank's batch is empty: empty output, statistics unchanged
            self._momentum_factor()
            return torch.empty_like(input)
        mean64, var64, count = stats
        if count == 1:
            raise ValueError(
                f"{where}: expected more than 1 value per channel when training, got 1 across "
                f"the {world} ranks of the process group (this rank's input has shape "
                f"{tuple(input.shape)}). Hint: batch statistics need at least 2 values per "
                f"channel; use larger batches or call model.eval()."
            )
        mean, var = mean64.to(stats_dtype), var64.to(stats_dtype)
        invstd = reference.invstd_of(var, self.eps)
        tensors = (input, self.weight, self.bias, residual)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            y = _SyncBatchNormFunction.apply(
                input, self.weight, self.bias, residual, mean, invstd, count, activation,
                float(self.negative_slope), group, where,
            )  # fmt: skip
        else:
            y = _normalize(input, self.weight, self.bias, residual, mean, invstd, activation,
                           float(self.negative_slope))  # fmt: skip
        momentum = self._momentum_factor()
        if running_mean is not None and running_var is not None:
            reference.update_running_stats(
                running_mean, running_var, mean, var, count, momentum, self.unbiased_running_var
            )
        return y


# ---------------------------------------------------------------------------------------
# Conversion

_TORCH_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PLAIN_BY_RANK = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}


def _convertible(module: nn.Module) -> bool:
    """torch.nn's batch norms (exact types) and ours whose computation is the plain one
    (BatchNorm1d/2d/3d and fused-activation layers). Variants that override forward (ghost,
    renorm, frozen, ...) keep their own behaviour and are left alone, as are subclasses of
    torch's classes, whose forward may do more than batch norm."""
    if isinstance(module, SyncBatchNorm):
        return False
    if type(module) in _TORCH_BATCH_NORMS:
        return True
    return isinstance(module, _BatchNormBase) and type(module).forward is _BatchNormBase.forward


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace the batch-norm layers of ``module`` by :class:`SyncBatchNorm`, in place, and
    return it (a module that is itself a batch-norm layer is returned converted).

    Converts torch.nn's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` and this package's plain
    and fused-activation layers (the activation stays fused); weights, buffers, options,
    ``requires_grad``, training mode, device and dtype are kept, and each new layer remembers
    its original class for :func:`revert_sync_batchnorm`."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_sync_batchnorm: expected an nn.Module, got {type(module).__name__}."
        )
    if _convertible(module):
        sync = _swap(module, SyncBatchNorm)
        sync.process_group = process_group
        sync.activation = getattr(module, "activation", None)
        sync.negative_slope = getattr(module, "negative_slope", 0.01)
        sync.original_class = type(module)
        if hasattr(module, "qconfig"):
            sync.qconfig = module.qconfig
        return sync
    for name, child in list(module.named_children()):
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every :class:`SyncBatchNorm` in ``module`` back into a single-process layer, in
    place, and return it.

    A layer made by :func:`convert_sync_batchnorm` gets its original class back. One built
    directly becomes this package's ``BatchNorm1d/2d/3d``, chosen by the rank of the last
    input it saw (2-D/3-D: 1d, 4-D: 2d, 5-D: 3d), with its fused activation kept; a layer
    that has never run, or saw another rank, raises ValueError."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"revert_sync_batchnorm: expected an nn.Module, got {type(module).__name__}."
        )
    if isinstance(module, SyncBatchNorm):
        return _revert(module)
    for name, child in list(module.named_children()):
        setattr(module, name, revert_sync_batchnorm(child))
    return module


def _revert(sync: SyncBatchNorm) -> nn.Module:
    rank = sync.last_input_rank
    target = sync.original_class or (None if rank is None else _PLAIN_BY_RANK.get(rank))
    if target is None:
        seen = "has not run yet" if rank is None else f"last saw a {rank}-D input"
        raise ValueError(
            f"revert_sync_batchnorm: {sync.layer_name} was not made by convert_sync_batchnorm "
            f"and {seen}, so the BatchNormNd to revert to is unknown. Hint: run one forward "
            f"pass first, or set layer.original_class (e.g. batchnorm.BatchNorm2d)."
        )
    plain = _swap(sync, target)
    if isinstance(plain, nn.SyncBatchNorm):
        plain.process_group = sync.process_group
    if isinstance(plain, _BatchNormBase):
        for name in ("activation", "negative_slope"):
            if getattr(plain, name) != getattr(sync, name):
                setattr(plain, name, getattr(sync, name))
    elif sync.activation is not None:
        raise ValueError(
            f"revert_sync_batchnorm: {sync.layer_name} fuses activation "
            f"{sync.activation!r}, which {target.__name__} cannot apply. Hint: set "
            f"layer.original_class to one of batchnorm's classes."
        )
    if hasattr(sync, "qconfig"):
        plain.qconfig = sync.qconfig
    return plain


# ---------------------------------------------------------------------------------------
# Training across processes: torchrun environment, DDP, results on rank 0, a local launcher


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


@dataclass(frozen=True)
class RankFailure:
    """What :func:`launch` returns, with ``strict=False``, for a rank that gave no result."""

    rank: int
    exitcode: int | None
    error: str


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    strict: bool = True,
    threads: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` fresh processes on this machine, as torchrun
    would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT are set; ``fn``
    calls :func:`init_from_env`), and return their results in rank order.

    ``fn`` and its results must be picklable (a module-level function); tensors in the
    results are copied, so they outlive the process that made them. Each process uses
    ``threads`` intra-op threads (default: the CPU count shared out). After ``timeout_s``
    every process still running is killed and TimeoutError is raised, so a hang can never
    outlive the call. A rank that raises or dies makes ``launch`` raise RuntimeError, or,
    with ``strict=False``, gives a :class:`RankFailure` in its place."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"launch: world_size must be a positive int, got {world_size!r}.")
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes, pipes = [], []
    for rank in range(world_size):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_launched,
            args=(fn, tuple(args), rank, world_size, port, threads, sender),
            daemon=True,
        )
        process.start()
        sender.close()  # the child holds the only writer: EOF when it dies
        processes.append(process)
        pipes.append(receiver)
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            pending = [r for r in range(world_size) if r not in results]
            if left <= 0:
                raise TimeoutError(
                    f"launch: ranks {pending} gave no result within {timeout_s:.0f} s; all "
                    f"processes were killed. Hint: a rank is stuck in a collective, or the "
                    f"work needs a larger timeout_s."
                )
            wait([pipes[r] for r in pending], timeout=left)
            for rank in pending:
                if pipes[rank].poll():
                    try:
                        # Our own child's message (see _launched): as trusted as recv().
                        status, payload = pickle.loads(pipes[rank].recv_bytes())
                    except EOFError:  # died without a word
                        status, payload = "died", "the process exited without a result"
                    except Exception:  # e.g. the result's class cannot be imported here
                        status = "error"
                        payload = f"its result could not be unpickled:\n{traceback.format_exc()}"
                    if status == "ok":
                        results[rank] = payload
                    else:
                        processes[rank].join(5)
                        results[rank] = RankFailure(rank, processes[rank].exitcode, payload)
    finally:
        for process in processes:  # let them leave the group, then make sure they are gone
            process.join(max(0.0, min(5.0, deadline - time.monotonic())))
            if process.is_alive():
                process.kill()
                process.join()
    ordered = [results[r] for r in range(world_size)]
    failures = [r for r in ordered if isinstance(r, RankFailure)]
    if strict and failures:
        details = "\n".join(f"--- rank {f.rank} (exit code {f.exitcode}):\n{f.error}"
                            for f in failures)  # fmt: skip
        raise RuntimeError(f"launch: {len(failures)} of {world_size} ranks failed.\n{details}")
    return ordered


def _launched(fn, args, rank, world_size, port, threads, pipe) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(threads)
    try:
        message: tuple[str, Any] = ("ok", fn(*args))
    except BaseException:  # report everything, KeyboardInterrupt included
        message = ("error", traceback.format_exc())
    # Plain pickle, not pipe.send: multiprocessing's pickler, which torch extends, sends a
    # tensor as a handle to this process's shared memory, gone once this process exits
    # (the parent then fails to open it). Plain pickle copies the tensors' data.
    try:
        data = pickle.dumps(message)
    except Exception:
        failure = f"the result could not be pickled:\n{traceback.format_exc()}"
        data = pickle.dumps(("error", failure))
    pipe.send_bytes(data)
    pipe.close()
    try:
        shutdown()
    except Exception:  # a broken group (a peer died) may not leave cleanly; the result is out
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
