"""Audit the batch norm of a trained model on data: what is wrong, how we know, and the line
of code that fixes it.

:func:`audit` runs the model over the data and measures, for every batch-norm layer
(``torch.nn``'s, this package's, SyncBatchNorm, frozen ones):

* **stale running statistics**: the running mean/variance against the exact statistics
  of the data at the layer (as :func:`batchnorm.recalibrate` computes them), and, with
  labels, the metric the model gets with its running statistics and with recalibrated
  ones (on a deep copy);
* **noisy batch statistics**: how far each batch's mean and variance wander from the
  population's, as a number of effective values per channel;
* **mode traps**: BN in training mode inside an eval model, frozen weights whose
  statistics still update, ``track_running_stats=False`` in eval, momentum 0/None/1,
  statistics never updated;
* **wasted parameters and speed**: biases cancelled by the BN after them, the layers
  :func:`batchnorm.fold` removes with the eval speed-up measured, BN + activation pairs
  that ``BatchNormAct`` fuses;
* **numerical hazards**: NaN/Inf/non-positive ``running_var``, ``eps`` lost in float16,
  dead channels (``|weight| ≈ 0``), channels whose input never varies;
* **DDP without SyncBatchNorm** where the per-process batch gives noisy statistics.

The model is left exactly as it was — parameters, buffers and training modes, also when
the data or the model raises midway: the one pass that needs BN layers in training mode
runs on the model itself between a snapshot and its restoration; everything else runs on
copies. The result is an :class:`AuditReport` (printable, ``to_json``, ``to_html``).

The package: ``thresholds`` (the named constants, each with its reason, all
exported here), ``findings`` (the report's data classes) and ``output`` (how the report is
shown), ``measure`` (the batches, the one pass over the model, the metric), ``context`` (what
the checks share), ``graph`` (each BN's neighbours in the data flow), and the checks by
category: ``stats`` (stale, noisy), ``modes`` (mode traps, DDP), ``structure`` (waste, fold,
fuse) and ``numerics`` (hazards).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from batchnorm.tools.affine import is_batchnorm_like
from batchnorm.tools.audit.context import _Context
from batchnorm.tools.audit.findings import AuditReport, Finding, LayerAudit
from batchnorm.tools.audit.measure import _batches, _f64, _restore, _stats_pass, _tensors
from batchnorm.tools.audit.modes import check_ddp, check_modes
from batchnorm.tools.audit.numerics import check_numerics
from batchnorm.tools.audit.stats import check_noise, check_stale, measure_recalibration
from batchnorm.tools.audit.structure import check_wasted, measure_fold
from batchnorm.tools.audit.thresholds import (
    CONSTANT_SHARE_WARNING,
    DEAD_WEIGHT,
    DEFAULT_BATCH_SIZE,
    DEFAULT_NUM_BATCHES,
    GAIN_ERROR,
    GAIN_WARNING,
    GHOST_BATCH_SIZE,
    MIN_EPS,
    MIN_NOISE_BATCHES,
    NOISY_VALUES_ERROR,
    NOISY_VALUES_WARNING,
    SAFE_EPS,
    SEVERITIES,
    STALE_GAP_ERROR,
    STALE_GAP_WARNING,
    STALE_LOG_VAR_ERROR,
    STALE_LOG_VAR_WARNING,
    TIMING_MIN_SECONDS,
    TIMING_REPEATS,
    WORST_CHANNELS,
)

__all__ = [
    "AuditReport",
    "Finding",
    "LayerAudit",
    "audit",
    "SEVERITIES",
    "STALE_GAP_WARNING",
    "STALE_GAP_ERROR",
    "STALE_LOG_VAR_WARNING",
    "STALE_LOG_VAR_ERROR",
    "GAIN_WARNING",
    "GAIN_ERROR",
    "NOISY_VALUES_WARNING",
    "NOISY_VALUES_ERROR",
    "MIN_NOISE_BATCHES",
    "GHOST_BATCH_SIZE",
    "DEAD_WEIGHT",
    "CONSTANT_SHARE_WARNING",
    "MIN_EPS",
    "SAFE_EPS",
    "WORST_CHANNELS",
    "TIMING_REPEATS",
    "TIMING_MIN_SECONDS",
    "DEFAULT_NUM_BATCHES",
    "DEFAULT_BATCH_SIZE",
]


def audit(
    model: nn.Module,
    data: Any,
    *,
    labels: Tensor | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_batches: int | None = DEFAULT_NUM_BATCHES,
    timing: bool = True,
) -> AuditReport:
    """Audit the batch-norm layers of ``model`` on ``data`` and return an
    :class:`AuditReport`; ``model`` is left exactly as it was (parameters, buffers and
    training modes, also when an exception is raised).

    ``data`` is a tensor of inputs, cut into batches of ``batch_size`` samples (with
    ``labels``, one per sample), or an iterable of batches (a DataLoader): each an input
    tensor, a tuple of the model's positional inputs, or an ``(inputs, labels)`` pair.
    At most ``num_batches`` batches are used (None: all). The noise of batch statistics is
    measured on these batches: give the batch size the model trains with (per process).

    With labels the model is evaluated in eval mode with its running statistics and with
    recalibrated ones (:func:`batchnorm.recalibrate` on a deep copy): the accuracy (integer
    labels, one score per class in dim 1 of the output) or, with ``loss_fn(output,
    labels)``, its mean. ``timing=False`` skips timing the folded model.

    Under ``torch.distributed`` with several processes every rank must call it, as
    :func:`batchnorm.recalibrate`; the statistics are those of this rank's data.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit: expected an nn.Module, got {type(model).__name__}.")
    for name, value in (("batch_size", batch_size), ("num_batches", num_batches)):
        if value is None and name == "num_batches":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"audit: {name} must be a positive int, got {value!r}.")
    wrapped = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
    inner = model.module if wrapped else model
    root = "model.module" if wrapped else "model"
    layers = {name: m for name, m in inner.named_modules() if is_batchnorm_like(m)}
    batches = _batches(data, labels, batch_size, num_batches)
    tensor = next(iter(inner.parameters()), None)
    if tensor is None:
        tensor = next(iter(inner.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    world = _world_size()
    settings = {
        "model": type(model).__name__,
        "batch_norm_layers": len(layers),
        "batches": len(batches),
        "samples": sum(b.size for b in batches),
        "batch_sizes": sorted({b.size for b in batches}),
        "labels": any(b.labels is not None for b in batches),
        "world_size": world,
        "wrapped": type(model).__name__ if wrapped else None,
        "torch": torch.__version__,
    }
    if not layers:
        finding = Finding(
            "info",
            "no-batch-norm",
            None,
            "the model has no batch-norm layer; nothing to audit",
            "",
            {},
        )
        return AuditReport([finding], [], None, None, settings)

    # 1. The state as found, then the one pass that changes it, then everything back.
    model_modes = [(m, m.training) for m in model.modules()]
    found_training = {name: m.training for name, m in layers.items()}
    saved = {k: v.detach().clone() for k, v in _tensors(model)}
    before = {name: _f64(m.running_mean) for name, m in layers.items()}
    try:
        stats, moved = _stats_pass(inner, layers, batches, device)
    finally:
        _restore(model, saved, model_modes)

    ctx = _Context(inner, root, layers, stats, found_training, model.training, world, batches)
    ctx.build_layer_audits()
    check_modes(ctx, moved, before)
    check_numerics(ctx)
    check_noise(ctx)
    # 2. Everything else on a copy (fx tracing too: it runs the model's Python code).
    try:
        work = copy.deepcopy(inner)
    except Exception as error:  # a model that cannot be copied: skip, and say so
        ctx.add(
            "info",
            "skipped",
            None,
            f"the model cannot be deep-copied ({type(error).__name__}: {error}), so the "
            f"metric with recalibrated statistics and the fold timing were not measured",
            "",
            {},
        )
        work = None
    check_wasted(ctx, work if work is not None else inner)
    if work is not None:
        measure_fold(ctx, work, device, timing)
        measure_recalibration(ctx, work, device, loss_fn)
    check_stale(ctx)
    check_ddp(ctx, wrapped)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    findings = sorted(ctx.findings, key=lambda f: order[f.severity])  # stable: check order
    return AuditReport(findings, ctx.audits, ctx.metric, ctx.timing, settings)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
