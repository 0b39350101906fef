"""Batch norm across processes: SyncBatchNorm on torch.distributed. The pieces a training
script needs around it (process group from torchrun's environment, DDP wrapping, gathering
results on rank 0, a local launcher) are in :mod:`batchnorm.distributed`.

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

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from batchnorm import reference
from batchnorm.nn.base import _BatchNormBase, bind_options

#: dtype of the forward message: float64 keeps Σ(x − s)² − M·(mean − s)² accurate when the
#: shift is far from the mean (see the module docstring's error bound), for every input dtype.
STATS_MESSAGE_DTYPE = torch.float64


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
# The cross-process step of the core (batchnorm.ops.Reduction)


class ProcessGroupReduction:
    """The statistics and gradient sums of the global batch, by one all_reduce each; the
    core (batchnorm.ops) does the rest, with the same kernels as every layer."""

    def __init__(self, group: Any, shift: Tensor, where: str) -> None:
        self.group, self.shift, self.where = group, shift, where
        self.count = 0

    def statistics(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        stats = _global_stats(x, self.shift, self.group, self.where)
        if stats is None:  # every rank's batch is empty
            return None
        mean64, var64, self.count = stats
        if self.count == 1:
            world = dist.get_world_size(self.group)
            raise ValueError(
                f"{self.where}: expected more than 1 value per channel when training, got 1 "
                f"across the {world} ranks of the process group (this rank's input has shape "
                f"{tuple(x.shape)}). Hint: batch statistics need at least 2 values per "
                f"channel; use larger batches or call model.eval()."
            )
        dtype = reference.compute_dtype(x.dtype)
        return mean64.to(dtype), var64.to(dtype)

    def gradient_sums(self, sum_dpre: Tensor, sum_dpre_xhat: Tensor) -> tuple[Tensor, Tensor]:
        channels = sum_dpre.shape[0]
        sums = torch.cat([sum_dpre, sum_dpre_xhat.to(sum_dpre.dtype)])
        _all_reduce(sums, self.group, self.where, "gradient sums")
        return sums[:channels], sums[channels:]


# ---------------------------------------------------------------------------------------
# The module


def _sync_signature() -> inspect.Signature:
    """torch.nn.SyncBatchNorm's constructor: the eager layers' with ``process_group`` before
    ``device``."""
    params = list(inspect.signature(_BatchNormBase.__init__).parameters.values())
    at = [p.name for p in params].index("device")
    group = inspect.Parameter("process_group", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=None, annotation="Any")  # fmt: skip
    return inspect.Signature([*params[:at], group, *params[at:]], return_annotation="None")


_SYNC_INIT = _sync_signature()


class SyncBatchNorm(_BatchNormBase):
    """Batch norm whose training statistics are those of the whole batch across the
    processes of ``process_group`` (default: the whole world), on CPU (gloo) or CUDA (NCCL).

    The constructor, parameters, buffers and state_dict are those of
    ``torch.nn.SyncBatchNorm``; inputs are (N, C, *) of any rank >= 2. Local batches may
    differ in size and be empty. In eval mode, without an initialized process group, or with
    a group of one process, it is plain batch norm and makes no collective call.

    ``activation``/``negative_slope`` (instance attributes, set by
    :func:`batchnorm.convert_sync_batchnorm` from a fused layer) apply the activation in the
    same pass. ``original_class`` is what :func:`batchnorm.revert_sync_batchnorm` turns the
    layer back into.
    """

    _ranks = None  # any rank >= 2
    _script_trains = False  # a scripted copy runs in eval mode
    _layout = "(N, C, *)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = bind_options(_SYNC_INIT, (self, *args), kwargs)
        process_group = options.pop("process_group")
        super().__init__(**options)
        self.process_group = process_group
        self.original_class: type[nn.Module] | None = None
        self.last_input_rank: int | None = None  # revert's choice when original_class is None
        self._agreed_group: int | None = None  # id of the group that passed the agreement check

    __init__.__signature__ = _SYNC_INIT  # type: ignore[attr-defined]

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """torch.nn.SyncBatchNorm's idiom, ``SyncBatchNorm.convert_sync_batchnorm(model)``:
        :func:`batchnorm.convert_sync_batchnorm` (which keeps fused activations and can be
        undone by :func:`batchnorm.revert_sync_batchnorm`)."""
        # The model tools sit above the layers: imported here, when called, to keep
        # torch's classmethod on the class without an import cycle.
        from batchnorm.tools.convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)

    def _sync_group(self) -> tuple[Any, int]:
        """(group, its size); size 1 when there is nothing to synchronize with."""
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group, dist.get_world_size(group)

    def _forward(self, input: Tensor, residual: Tensor | None) -> Tensor:
        self._check_input_dim(input)
        self.last_input_rank = input.dim()
        group, world = self._sync_group()
        if not self.training or world <= 1:
            return super()._forward(input, residual)
        if self._agreed_group != id(group):
            _check_agreement(input, group, self.layer_name)
            self._agreed_group = id(group)
        shift = torch.zeros(self.num_features, dtype=STATS_MESSAGE_DTYPE, device=input.device)
        if self.track_running_stats and self.running_mean is not None:
            shift.copy_(self.running_mean)
        reduction = ProcessGroupReduction(group, shift, self.layer_name)
        return self._normalize(input, residual, self._momentum_factor(), reduction=reduction)
