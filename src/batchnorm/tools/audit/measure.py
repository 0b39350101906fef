"""The audit's measurements on the model itself: its batches, the one pass that records each
batch-norm layer's input statistics with the layers in training mode (between a snapshot of
the model and its restoration, so the model is left as it was), and the metric in the
model's current modes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.reference import batch_stats
from batchnorm.tools.recalibrate import recording_inputs

# ------------------------------------------------------------------------- data


@dataclass
class _Batch:
    inputs: Any  # a tensor, or a tuple of the model's positional arguments
    labels: Tensor | None

    @property
    def size(self) -> int:
        first = self.inputs if isinstance(self.inputs, Tensor) else self.inputs[0]
        return int(first.shape[0]) if first.dim() else 1


def _batches(
    data: Any, labels: Tensor | None, batch_size: int, num_batches: int | None
) -> list[_Batch]:
    """The audit's batches: a tensor cut into ``batch_size`` rows (with ``labels`` cut the
    same way), or up to ``num_batches`` items of an iterable yielding inputs or
    ``(inputs, labels, ...)``."""
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise ValueError(
                f"audit: data must be a batch of samples (N, ...) with at least 2 dimensions, "
                f"got shape {tuple(data.shape)}."
            )
        if labels is not None and (not isinstance(labels, Tensor) or len(labels) != len(data)):
            raise ValueError(
                f"audit: labels must be a tensor with one label per sample of data "
                f"({len(data)}), got {type(labels).__name__} of length "
                f"{len(labels) if hasattr(labels, '__len__') else '?'}."
            )
        starts = list(range(0, len(data), batch_size))
        if len(starts) > 1 and len(data) - starts[-1] < 2:
            starts.pop()  # a last batch of 1 sample has no batch statistics: merge it
        ends = starts[1:] + [len(data)]
        if num_batches is not None:
            starts, ends = starts[:num_batches], ends[:num_batches]
        return [
            _Batch(data[a:b], None if labels is None else labels[a:b])
            for a, b in zip(starts, ends, strict=True)
        ]
    if labels is not None:
        raise ValueError(
            "audit: labels= goes with a tensor of inputs; an iterable of batches carries its "
            "labels itself, as (inputs, labels) pairs."
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            f"audit: data must be a tensor of inputs or an iterable of batches (a DataLoader, a "
            f"list of tensors or of (inputs, labels) pairs), got {type(data).__name__}."
        )
    out = []
    for item in data:
        if num_batches is not None and len(out) >= num_batches:
            break
        if isinstance(item, (list, tuple)):
            if not item:
                raise ValueError("audit: data yielded an empty batch.")
            y = item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
            out.append(_Batch(item[0], y))
        else:
            out.append(_Batch(item, None))
    if not out:
        raise ValueError("audit: data yielded no batch.")
    return out


def _to(value: Any, device: torch.device) -> Any:
    """A fresh copy on ``device`` (in-place layers such as InPlace-ABN may overwrite their
    input, which must not reach the audit's batches)."""
    if isinstance(value, Tensor):
        return value.to(device).clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _call(model: nn.Module, batch: _Batch, device: torch.device) -> Any:
    inputs = _to(batch.inputs, device)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


# ------------------------------------------------------------------------- statistics


class _LayerStats:
    """Population moments (count, mean, M2 in float64, merged with Chan et al.'s update) and
    the mean and biased variance of every batch (every virtual batch for Ghost BN)."""

    def __init__(self, virtual_batch: int | None) -> None:
        self.virtual_batch = virtual_batch
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.batch_means: list[Tensor] = []
        self.batch_vars: list[Tensor] = []
        self.values: list[int] = []
        self.samples: list[int] = []
        self.dtype: torch.dtype | None = None
        self.rank: int | None = None

    def add(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] == 0:
            return
        x = x.detach()
        self.dtype, self.rank = x.dtype, x.dim()
        device = torch.device("cpu") if x.device.type == "mps" else x.device  # no float64
        x64 = x.to(device, torch.float64)
        n = x64.numel() // x64.shape[1]
        if n == 0:
            return
        mean, var = batch_stats(x64)
        if self.mean is None:
            self.mean, self.m2 = torch.zeros_like(mean), torch.zeros_like(var)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.count = total
        pieces = [x64] if self.virtual_batch is None else list(x64.split(self.virtual_batch))
        for piece in pieces:
            if piece.shape[0] == 0:
                continue
            m, v = batch_stats(piece)
            self.batch_means.append(m.cpu())
            self.batch_vars.append(v.cpu())
            self.values.append(piece.numel() // piece.shape[1])
            self.samples.append(piece.shape[0])

    def population(self) -> tuple[Tensor, Tensor] | None:
        """Mean and unbiased variance (as torch stores running_var), float64 on the CPU."""
        if self.mean is None or self.count == 0:
            return None
        var = self.m2 / (self.count - 1) if self.count > 1 else torch.zeros_like(self.m2)
        return self.mean.cpu(), var.cpu()


def _stats_pass(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[_Batch],
    device: torch.device,
) -> tuple[dict[str, _LayerStats], dict[str, Tensor]]:
    """Run the batches with the BN layers that have running statistics in training mode and
    everything else in eval mode (as recalibrate does), recording each BN's input; return
    the statistics and the running means each layer's own updates reached (to measure a
    frozen layer's drift). The caller restores the model."""
    stats = {
        name: _LayerStats(getattr(m, "virtual_batch_size", None) if _is_ghost(m) else None)
        for name, m in layers.items()
    }
    with recording_inputs(model, {m: stats[name].add for name, m in layers.items()}):
        with torch.no_grad():
            for batch in batches:
                _call(model, batch, device)
    moved = {
        name: m.running_mean.detach().to("cpu", torch.float64).clone()
        for name, m in layers.items()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    }
    return stats, moved


def _is_ghost(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and isinstance(getattr(m, "virtual_batch_size", None), int)


def _is_renorm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and hasattr(m, "clip_bounds")


def _is_sync(m: nn.Module) -> bool:
    return isinstance(m, nn.SyncBatchNorm) or type(m).__name__ == "SyncBatchNorm"


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64)


# ------------------------------------------------------------------------- metric


def _metric(
    model: nn.Module, batches: list[_Batch], device: torch.device, loss_fn: Callable | None
) -> tuple[str, float] | None:
    """Accuracy (integer labels, outputs with one score per class in dim 1) or the mean of
    ``loss_fn`` over the labelled batches, in the model's current modes; None without
    labels or when accuracy does not apply."""
    labelled = [b for b in batches if b.labels is not None]
    if not labelled:
        return None
    total, weight = 0.0, 0
    with torch.no_grad():
        for batch in labelled:
            out = _call(model, batch, device)
            out = out[0] if isinstance(out, (tuple, list)) else out
            y = batch.labels.to(out.device)
            if loss_fn is not None:
                value = float(loss_fn(out, y))
            elif y.dtype.is_floating_point or y.is_complex() or out.dim() != y.dim() + 1:
                return None
            else:
                value = float((out.argmax(1) == y).double().mean())
            total += value * len(y)
            weight += len(y)
    return ("loss" if loss_fn is not None else "accuracy"), total / max(weight, 1)


# ------------------------------------------------------------------------- snapshot


def _tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _restore(model: nn.Module, saved: dict[str, Tensor], modes: list) -> None:
    with torch.no_grad():
        for key, t in _tensors(model):
            if key in saved and t is not None:
                t.copy_(saved[key])
    for m, training in modes:
        m.train(training)
