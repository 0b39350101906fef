"""PreciseBN: replace the running averages of batch-norm layers with exact population
statistics of the data.

A running average with momentum 0.1 mostly remembers the last ~10 batches, taken while the
weights were still moving; after training (or after SWA, pruning, folding) the statistics a
model normalizes with at inference can be far from those of the data. :func:`recalibrate`
runs the data through the model with only the BN layers in training mode and sets each
``running_mean``/``running_var`` to the mean and unbiased variance of *all* values that
reached the layer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm._progress import Progress
from batchnorm.reference import batch_stats


@contextlib.contextmanager
def recording_inputs(
    model: nn.Module, sinks: dict[nn.Module, Callable[[Tensor], object]]
) -> Iterator[None]:
    """The model as recalibration runs it: every batch-norm layer of ``sinks`` that has
    running statistics in training mode (batch statistics, as in training), everything
    else in eval mode (dropout off); each layer's input goes to its sink. On exit the hooks
    are removed and every module's mode is restored (its running statistics are not: the
    caller restores or replaces them)."""
    modes = [(m, m.training) for m in model.modules()]
    handles = [
        layer.register_forward_pre_hook(lambda _m, inputs, sink=sink: sink(inputs[0]))
        for layer, sink in sinks.items()
    ]
    try:
        model.eval()
        for layer in sinks:
            if isinstance(layer, _BatchNorm) and layer.running_mean is not None:
                layer.train()
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.train(training)


@dataclass
class _Moments:
    """Count, mean and sum of squared deviations (M2) per channel, in float64."""

    count: int
    mean: Tensor
    m2: Tensor

    @staticmethod
    def empty(like: Tensor) -> _Moments:
        device = torch.device("cpu") if like.device.type == "mps" else like.device  # no f64
        zeros = torch.zeros(like.numel(), dtype=torch.float64, device=device)
        return _Moments(0, zeros, zeros.clone())

    def add(self, x: Tensor) -> None:
        """Merge the values of one batch (Chan et al.'s pairwise update: no E[x²]-E[x]²
        cancellation, whatever the mean)."""
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        mean, var = batch_stats(x.detach().to(self.mean.device, torch.float64))
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.count = total


def recalibrate(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Set the running statistics of every batch-norm layer of ``model`` to the exact
    statistics of the values it receives over ``data``; return ``model``.

    ``data`` yields model inputs: a tensor, or a list/tuple whose first element is the
    input (``(inputs, targets)`` as a DataLoader gives them); tensors are moved to the
    model's device. ``num_batches`` stops early (None: the whole iterable). Progress goes
    to stderr (a live bar on a terminal, a line per tenth of the batches elsewhere) unless
    ``progress`` is False.

    Only ``_BatchNorm`` layers that track running statistics (torch.nn's, this package's,
    SyncBatchNorm) run in training mode, so they normalize with batch statistics as during
    training; dropout and every other module stay in eval mode, nothing needs gradients.
    Each layer's ``running_mean`` becomes the mean of all its input values, weighted by
    batch size, and ``running_var`` their unbiased variance, as torch stores it, whatever
    the momentum. Statistics are accumulated in float64 and merged stably; under
    ``torch.distributed`` they are merged across all ranks (every rank must call this).
    Training modes, ``momentum`` and ``num_batches_tracked`` are left as they were. A layer
    that sees no data keeps its statistics, with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate: expected an nn.Module, got {type(model).__name__}.")
    if num_batches is not None and (
        not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1
    ):
        raise ValueError(
            f"recalibrate: num_batches must be a positive int or None (all batches), got "
            f"{num_batches!r}."
        )
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    }
    if not layers:
        warnings.warn(
            "recalibrate: the model has no batch-norm layer with running statistics; nothing "
            "to do.",
            stacklevel=2,
        )
        return model
    saved = {name: _snapshot(m) for name, m in layers.items()}
    moments = {name: _Moments.empty(m.running_mean) for name, m in layers.items()}
    try:
        with recording_inputs(model, {m: moments[name].add for name, m in layers.items()}):
            device = next(iter(layers.values())).running_mean.device
            with torch.no_grad():
                _run(model, data, num_batches, device, progress)
        _merge_across_ranks(list(moments.values()))
    except BaseException:
        for name, m in layers.items():  # leave the model as it was
            _restore(m, saved[name])
        raise
    empty = []
    for name, m in layers.items():
        s = moments[name]
        _restore(m, saved[name])  # undoes the momentum updates of the passes
        if s.count == 0:
            empty.append(name)
            continue
        # unbiased, as torch stores it; a single value has no spread to estimate
        var = s.m2 / (s.count - 1) if s.count > 1 else torch.zeros_like(s.m2)
        with torch.no_grad():
            m.running_mean.copy_(s.mean)
            m.running_var.copy_(var)
    if empty:
        warnings.warn(
            f"recalibrate: {len(empty)} batch-norm layer(s) received no data and keep their "
            f"statistics: {', '.join(empty)}.",
            stacklevel=2,
        )
    return model


def _snapshot(m: nn.Module) -> tuple[Tensor, Tensor, Tensor | None]:
    nbt = m.num_batches_tracked
    return m.running_mean.clone(), m.running_var.clone(), None if nbt is None else nbt.clone()


def _restore(m: nn.Module, saved: tuple[Tensor, Tensor, Tensor | None]) -> None:
    with torch.no_grad():
        m.running_mean.copy_(saved[0])
        m.running_var.copy_(saved[1])
        if saved[2] is not None:
            m.num_batches_tracked.copy_(saved[2])


def _run(
    model: nn.Module, data: Iterable, num_batches: int | None, device: torch.device, progress: bool
) -> None:
    try:
        total: int | None = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    show = progress and (not _distributed() or dist.get_rank() == 0)
    done = 0
    with Progress("recalibrate", total, "batches", enabled=show) as bar:
        for batch in data:
            if num_batches is not None and done >= num_batches:
                break
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            if isinstance(inputs, Tensor):
                inputs = inputs.to(device)
            model(inputs)
            done += 1
            bar.update(done)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _merge_across_ranks(moments: list[_Moments]) -> None:
    """Sum counts and sums over ranks, then the deviations about the global mean:
    M2 = sum_r [M2_r + n_r (mean_r - mean)^2]. Two all-reduces of float64 vectors."""
    if not _distributed():
        return
    nccl = dist.get_backend() == "nccl"  # nccl reduces CUDA tensors only, gloo CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    counts = torch.tensor([float(s.count) for s in moments], dtype=torch.float64, device=device)
    sums = torch.cat([s.mean.to(device) * s.count for s in moments])
    first = torch.cat([counts, sums])
    dist.all_reduce(first)
    total, sums = first[: len(moments)], first[len(moments) :]
    means, deviations, start = [], [], 0
    for s, n in zip(moments, total.tolist(), strict=True):
        c = s.mean.numel()
        mean = sums[start : start + c] / max(n, 1.0)
        means.append(mean)
        deviations.append(s.m2.to(device) + s.count * (s.mean.to(device) - mean).square())
        start += c
    second = torch.cat(deviations)
    dist.all_reduce(second)
    start = 0
    for s, n, mean in zip(moments, total.tolist(), means, strict=True):
        c = s.mean.numel()
        s.count = int(n)
        s.mean = mean.to(s.mean.device)
        s.m2 = second[start : start + c].to(s.m2.device)
        start += c
