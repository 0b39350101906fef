"""Normalization variants and training regimes of the second round of reproductions.

* :class:`NoisyBatchNorm` (Santurkar et al., 2018, section 2.1): BN followed by injected
  "covariate shift", a per-channel shift and scale redrawn at every training step.
* :class:`PerDevice`: a layer applied to each device's share of a mini-batch separately, as
  data-parallel training without SyncBatchNorm does (Ioffe, 2017, section 4.2).
* :func:`few_class_order`: an epoch order whose mini-batches each hold few classes
  (Ioffe, 2017, section 4.3).
* :class:`FreezeAt`: a probe that freezes every BN layer (``batchnorm.freeze``) after a
  number of steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from batchnorm.lab.probes import Probe
from batchnorm.tools.convert import freeze


class NoisyBatchNorm(nn.Module):
    """``bn`` followed by time-varying, non-zero-mean, non-unit-variance noise.

    At every training forward each channel ``c`` draws a shift ``m_c ~ U(-mean, mean)``
    and a scale ``s_c`` log-uniform in ``[1/scale, scale]``, and the layer returns
    ``s * bn(x) + m``: the distribution each following layer sees moves at every step, by
    more than the drift BN removes (Santurkar et al., 2018, section 2.1). In eval mode the
    noise is off (its median: shift 0, scale 1). ``generator`` makes the noise reproducible
    without touching torch's global random state."""

    def __init__(
        self, bn: nn.Module, mean: float, scale: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not mean >= 0 or not scale >= 1:
            raise ValueError(
                f"NoisyBatchNorm: needs mean >= 0 and scale >= 1, got mean={mean}, scale={scale}."
            )
        self.bn, self.mean, self.scale, self.generator = bn, mean, scale, generator

    def forward(self, input: Tensor) -> Tensor:
        y = self.bn(input)
        if not self.training:
            return y
        channels = y.shape[1]
        draw = torch.rand(2, channels, generator=self.generator).to(y.device, y.dtype)
        shift = (2 * draw[0] - 1) * self.mean
        scale = torch.exp((2 * draw[1] - 1) * math.log(self.scale))
        view = (1, channels) + (1,) * (y.dim() - 2)
        return y * scale.view(view) + shift.view(view)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, scale={self.scale}"


class PerDevice(nn.Module):
    """``layer`` applied to each ``micro``-sample slice of the batch on its own, in training:
    what ``devices = batch / micro`` processes of data-parallel training compute when their
    BN layers are not synchronized. The running statistics (and step counter) are those of
    the first slice only, as DistributedDataParallel broadcasts rank 0's buffers. In eval
    mode (and for batches of at most ``micro``) the layer sees the whole batch."""

    def __init__(self, layer: nn.Module, micro: int) -> None:
        super().__init__()
        if micro < 1:
            raise ValueError(f"PerDevice: micro must be a positive int, got {micro}.")
        self.layer, self.micro = layer, micro

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.shape[0] <= self.micro:
            return self.layer(input)
        chunks = input.split(self.micro)
        outputs = [self.layer(chunks[0])]
        # The other "devices" update copies that are then dropped. The buffers are swapped,
        # not copied back in place: autograd may have saved them for the backward pass.
        rank0 = dict(self.layer._buffers)
        self.layer._buffers.update(
            {name: None if b is None else b.clone() for name, b in rank0.items()}
        )
        try:
            outputs += [self.layer(chunk) for chunk in chunks[1:]]
        finally:
            self.layer._buffers.update(rank0)
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"micro={self.micro}"


def few_class_order(labels: Tensor, batch_size: int, classes_per_batch: int):
    """An ``order`` for :func:`batchnorm.lab.fit.fit`: every mini-batch of ``batch_size``
    holds ``classes_per_batch`` blocks of ``batch_size // classes_per_batch`` samples, each
    block from one class (two blocks may share a class).

    Each epoch shuffles every class, cuts it into blocks, shuffles the blocks, and shuffles
    the samples inside each mini-batch (so a slice of a batch is not one class). Samples
    that do not fill a block come last and fall outside the epoch's full mini-batches."""
    if batch_size % classes_per_batch:
        raise ValueError(
            f"few_class_order: batch_size ({batch_size}) must be a multiple of "
            f"classes_per_batch ({classes_per_batch})."
        )
    block = batch_size // classes_per_batch
    labels = labels.cpu()

    def order(generator: torch.Generator) -> Tensor:
        blocks, rest = [], []
        for cls in labels.unique():
            members = torch.nonzero(labels == cls).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            full = len(members) - len(members) % block
            blocks += list(members[:full].split(block))
            rest.append(members[full:])
        picked = [blocks[i] for i in torch.randperm(len(blocks), generator=generator)]
        batches = torch.cat(picked).split(batch_size)
        mixed = [b[torch.randperm(len(b), generator=generator)] for b in batches]
        return torch.cat(mixed + rest)

    return order


class FreezeAt(Probe):
    """Replace every BN layer of the model by ``FrozenBatchNorm`` (``batchnorm.freeze``:
    running statistics and affine weights fixed) after training step ``step``: BN during
    warm-up, then the same normalization in training as in evaluation."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.model: nn.Module | None = None
        self.report: list[str] = []

    def attach(self, model: nn.Module) -> None:
        self.model = model

    def after_step(self, step: int) -> None:
        if step == self.step and self.model is not None:
            _, self.report = freeze(self.model)  # in place: the loop keeps its model

    def result(self) -> dict[str, object]:
        return {"frozen_after_step": self.step, "layers": self.report}
