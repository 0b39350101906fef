"""The lab's models: the article's example and the network of Ioffe & Szegedy (2015, 4.1).

A model "without BN" keeps an ``nn.Identity`` where the BN layer would be, so both variants
have the same layer paths (``"0"``, ``"1"``, ...): probes, plots and weight copies line up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from batchnorm.nn import flavour

#: Which batch-norm implementation a model uses: ours, torch.nn's, or none.
BN_CHOICES = ("batchnorm", "torch")
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


def batch_norm_1d(features: int, bn: str | None) -> nn.Module:
    """``batchnorm.BatchNorm1d`` (``bn="batchnorm"``), ``torch.nn.BatchNorm1d`` (``"torch"``)
    or ``nn.Identity`` (``None``)."""
    if bn is None:
        return nn.Identity()
    if bn in BN_CHOICES:  # families of batchnorm.nn.FLAVOURS
        return flavour(bn, 1)(features)
    raise ValueError(f"unknown batch-norm implementation {bn!r}; expected one of {BN_CHOICES}.")


def article_model(
    in_features: int, num_classes: int = 10, bn: str | None = "batchnorm", hidden: int = 128
) -> nn.Sequential:
    """The article's example: Dense(128, relu) -> BatchNormalization -> Dense(10, softmax).

    Layers: ``0`` Linear, ``1`` ReLU, ``2`` BatchNorm1d (or Identity), ``3`` Linear. The
    softmax is left to the loss (``cross_entropy`` takes logits)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        batch_norm_1d(hidden, bn),
        nn.Linear(hidden, num_classes),
    )


def ioffe_mlp(
    in_features: int,
    num_classes: int = 10,
    bn: str | None = "batchnorm",
    activation: str = "sigmoid",
    hidden: int = 100,
    depth: int = 3,
) -> nn.Sequential:
    """Ioffe & Szegedy (2015), section 4.1: ``depth`` fully connected hidden layers of
    ``hidden`` units, BN before each nonlinearity, a ``num_classes``-way output.

    Hidden layer ``i`` is the modules ``3i`` Linear, ``3i+1`` BN (or Identity), ``3i+2``
    activation; the output Linear comes last."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}.")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), batch_norm_1d(hidden, bn), ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def copy_shared_weights(source: nn.Module, target: nn.Module) -> Sequence[str]:
    """Copy into ``target`` every parameter and buffer it shares by name with ``source`` (the
    Linear layers of a model without BN into the same model with BN) and return the names
    ``target`` has on its own (its BN layers' entries, left at their initial values)."""
    result = target.load_state_dict(source.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"copy_shared_weights: the models differ beyond extra layers; the target has no "
            f"{result.unexpected_keys}."
        )
    return result.missing_keys


#: Channels of :func:`mnist1d_cnn`'s convolutions: two stages of two 3-wide convolutions
#: (VGG's shape at MNIST-1D's size: 40 samples, halved by a max-pool after each stage).
#: With the head below about 32k weights: a step on a batch of 32 takes ~2 ms on one core.
CNN_CHANNELS = (16, 16, 32, 32)
#: Width of the fully connected hidden layer of the head (VGG's classifier, scaled down).
CNN_HIDDEN = 64

Norm = Callable[[int], nn.Module]


def mnist1d_cnn(
    in_features: int,
    num_classes: int = 10,
    norm: Norm | None = None,
    channels: Sequence[int] = CNN_CHANNELS,
    hidden: int = CNN_HIDDEN,
) -> nn.Sequential:
    """A small VGG-like 1-D CNN: stages of two ``Conv1d(3) -> norm -> ReLU``, a max-pool after
    each pair, then a head ``Linear(hidden) -> norm -> ReLU -> Linear``. ``norm(channels)``
    makes each normalization layer (None: an ``nn.Identity``). The convolutions keep their
    bias with BN too (BN cancels it): every variant then has the same weights, copied from
    one initialization.

    Layers: ``0`` unflatten to one input channel; then per convolution ``conv``, ``norm``,
    ``ReLU`` (+ ``MaxPool1d`` after every second), then ``Flatten`` and ``Linear``. The norm
    layers sit at the same paths with or without BN, so weights copy across variants."""
    if not channels:
        raise ValueError("mnist1d_cnn: needs at least one convolution (channels is empty).")
    layers: list[nn.Module] = [nn.Unflatten(1, (1, in_features))]
    width, length = 1, in_features
    for index, out in enumerate(channels):
        layers += [
            nn.Conv1d(width, out, 3, padding=1),
            nn.Identity() if norm is None else norm(out),
            nn.ReLU(),
        ]
        if index % 2 == 1 or index == len(channels) - 1:
            layers.append(nn.MaxPool1d(2))
            length //= 2
        width = out
    layers += [
        nn.Flatten(),
        nn.Linear(width * length, hidden),
        nn.Identity() if norm is None else norm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)
