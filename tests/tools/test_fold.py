"""batchnorm.fold: folded models equal the unfolded eval model; every skip says why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import example_models
from batchnorm.tools.fold import bn_affine, is_batchnorm_like
from conftest import assert_close, random_input

DTYPES = [torch.float32, torch.float64]


class FrozenBatchNorm2d(nn.Module):
    """A torchvision-style frozen BN: buffers only, an ``eps`` attribute, any rank >= 2."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, init in [("weight", torch.ones), ("bias", torch.zeros)]:
            self.register_buffer(name, init(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        view = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.view(view) + (self.bias - self.running_mean * scale).view(view)


class BatchNormReLU2d(nn.BatchNorm2d):
    """A fused BN + activation, marked the way this package's modules are."""

    activation = "relu"

    def forward(self, x):
        return torch.relu(super().forward(x))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so fold falls back."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("NaN input")
        return self.net(x)


def randomize(model: nn.Module, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Realistic, distinct BN statistics and affine parameters; eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if not is_batchnorm_like(m) or m.running_mean is None:
                continue
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def check_equivalent(model, x, dtype, **fold_kwargs):
    """Fold, check the copy equals the original, and the original is untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = batchnorm.fold(model, **fold_kwargs)
    with torch.no_grad():
        assert_close(folded(x), model(x), dtype)
    assert folded is not model and not any(m.training for m in folded.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    return folded, report


def remaining_bn(model):
    return [n for n, m in model.named_modules() if is_batchnorm_like(m)]


# --------------------------------------------------------------------------- whole models

MODELS = {
    # factory, input shape, BN layers the Sequential fallback folds (None: all of them)
    "article_mlp": (example_models.article_mlp, (16, 40), None),
    "resnet18_like": (lambda: example_models.resnet18_like(8, 10), (2, 3, 32, 32), 4),
    "mobilenet_like": (lambda: example_models.mobilenet_like(0.125, 10), (2, 3, 32, 32), None),
    "cnn1d": (example_models.cnn1d, (4, 2, 40), None),
    "conv_transpose_decoder": (example_models.conv_transpose_decoder, (4, 16), None),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["fx", "sequential"])
def test_models_fold_exactly(name, dtype, method):
    factory, shape, fallback_folds = MODELS[name]
    model = randomize(factory(), dtype)
    total = len(remaining_bn(model))
    if method == "sequential":
        model = Untraceable(model)
    x = random_input(shape, dtype)
    folded, report = check_equivalent(model, x, dtype, example_inputs=x)
    assert report.method == method
    expected = total if method == "fx" or fallback_folds is None else fallback_folds
    assert len(report.folded) == expected, str(report)
    assert len(remaining_bn(folded)) == total - expected
    assert len(report.skipped) == total - expected
    if method == "sequential":
        assert "symbolically traced variables cannot be used as inputs to control flow" in str(
            report
        )


def test_our_modules_fold_like_torchs():
    model = batchnorm.convert(randomize(example_models.resnet18_like(8, 10)))
    assert isinstance(model.blocks[0].bn1, batchnorm.BatchNorm2d)
    folded, report = check_equivalent(model, random_input((2, 3, 32, 32)), torch.float32)
    assert len(report.folded) == 20 and remaining_bn(folded) == []


# --------------------------------------------------------------------------- per pattern


def make_bn(kind: str, n: int, rank: int) -> nn.Module:
    torch_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    ours = getattr(batchnorm, torch_cls.__name__)
    return {
        "torch": lambda: torch_cls(n),
        "ours": lambda: ours(n),
        "affine=False": lambda: torch_cls(n, affine=False),
        "bias=False": lambda: ours(n, bias=False),
        "frozen": lambda: FrozenBatchNorm2d(n),
    }[kind]()


# (layer, input shape) with the BN after the layer
AFTER = {
    "linear": (lambda: nn.Linear(6, 4), (5, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (3, 4, 11)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=2, bias=False, groups=2), (2, 4, 7, 6)),
    "conv2d_dw": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 2, stride=2, padding=1), (2, 4, 4, 5, 4)),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), (3, 4, 7)),
    "convT2d": (
        lambda: nn.ConvTranspose2d(4, 6, 3, 2, padding=1, output_padding=1, bias=False),
        (2, 4, 5, 4),
    ),
    "convT3d": (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), (2, 4, 3, 3, 2)),
}
# (layer, input shape) with the BN before the layer
BEFORE = {
    "linear": (lambda: nn.Linear(6, 4), (5, 6)),
    "linear_no_bias": (lambda: nn.Linear(6, 4, bias=False), (5, 6)),
    "conv1d_dw": (lambda: nn.Conv1d(6, 6, 3, groups=6), (3, 6, 9)),
    "conv2d_strided_grouped": (lambda: nn.Conv2d(6, 4, 3, stride=2, groups=2), (2, 6, 7, 8)),
    "conv2d_1x1_same": (lambda: nn.Conv2d(6, 4, 1, padding="same", bias=False), (2, 6, 5, 5)),
    "conv2d_reflect": (lambda: nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"), (2, 6, 5, 5)),
    "conv2d_circular": (
        lambda: nn.Conv2d(6, 4, 3, padding=2, padding_mode="circular"),
        (2, 6, 6, 5),
    ),
    "conv3d_valid": (lambda: nn.Conv3d(6, 4, 2, padding="valid"), (2, 6, 3, 4, 3)),
}
BN_KINDS = ["torch", "ours", "affine=False", "bias=False", "frozen"]


def pattern(layer_factory, shape, kind, bn_first):
    layer = layer_factory()
    n = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if not bn_first:
        n = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = make_bn(kind, n, len(shape))
    return nn.Sequential(bn, layer) if bn_first else nn.Sequential(layer, bn)


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("layer", list(AFTER))
def test_bn_after_layer(layer, kind):
    for dtype in DTYPES:
        model = randomize(pattern(*AFTER[layer], kind, bn_first=False), dtype)
        x = random_input(AFTER[layer][1], dtype)
        folded, report = check_equivalent(model, x, dtype, example_inputs=x)
        assert [(f.name, f.into, f.position) for f in report.folded] == [("1", "0", "after")]
        assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("layer", list(BEFORE))
def test_bn_before_layer(layer, kind):
    for dtype in DTYPES:
        model = randomize(pattern(*BEFORE[layer], kind, bn_first=True), dtype)
        x = random_input(BEFORE[layer][1], dtype)
        folded, report = check_equivalent(model, x, dtype, example_inputs=x)
        assert [(f.name, f.into, f.position) for f in report.folded] == [("0", "1", "before")]
        assert isinstance(folded[0], nn.Identity)


def test_bn_affine_matches_eval_bn():
    bn = randomize(nn.BatchNorm2d(5), torch.float64)
    scale, shift = bn_affine(bn)
    x = random_input((3, 5, 2, 2), torch.float64)
    assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x))
    assert "not a batch-norm layer" in bn_affine(nn.ReLU())


def test_chains_of_bn_fold_into_one_layer():
    model = randomize(
        nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.BatchNorm2d(6))
    )
    x = random_input((2, 4, 5, 5))
    folded, report = check_equivalent(model, x, torch.float32)
    assert [f.into for f in report.folded] == ["1", "1", "1"]


def test_fused_activation_is_kept_when_folding_into_previous_layer():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormReLU2d(4), nn.Conv2d(4, 2, 1)))
    x = random_input((2, 3, 6, 6))
    folded, report = check_equivalent(model, x, torch.float32)
    assert report.folded[0].kept == "relu" and isinstance(folded[1], nn.ReLU)

    model = randomize(nn.Sequential(nn.ReLU(), BatchNormReLU2d(4), nn.Conv2d(4, 2, 1)))
    folded, report = check_equivalent(model, random_input((2, 4, 6, 6)), torch.float32)
    assert report.folded == []
    assert "its fused relu runs between it and the next layer" in report.skipped[0].reason


# --------------------------------------------------------------------------- skip reasons


class ConvUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.out = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return self.out(self.bn(y)) + y  # y has a second user


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), batchnorm.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x), x)  # BN + residual in one call


class StdConv2d(nn.Conv2d):
    """A Conv2d subclass with its own forward (weight standardisation)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style: the activation is a child module, not an ``activation`` attribute."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class NeverCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.spare = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(x)


class NotSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


SKIPS = {
    # model, input shape, fold keyword arguments, expected words of the reason
    "other users": (ConvUsedTwice, (2, 3, 8, 8), {}, "the output of conv is also used by: bn, "),
    "no running stats": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
        (2, 3, 4, 4),
        {},
        "track_running_stats=False",
    ),
    "padded conv after": (
        lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)),
        (2, 3, 5, 5),
        {},
        "0 is a ReLU, not a Linear/Conv/ConvTranspose layer; after it: 2 pads with zeros",
    ),
    "conv transpose after": (
        lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3)),
        (2, 3, 5, 5),
        {},
        "its border outputs receive fewer taps",
    ),
    "linear without example": (
        lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)),
        (4, 3),
        {"example_inputs": None},
        "without example_inputs fold cannot tell whether the BN input is (N, C)",
    ),
    "linear on 3-D input": (
        lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)),
        (4, 3, 3),
        {},
        "normalizes dim 1 of a 3-D tensor but 1 (Linear) mixes its last dim",
    ),
    "unbatched conv": (
        lambda: nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)),
        (3, 4),  # one unbatched (C, L) sample: the BN would normalize over L, not channels
        {},
        "0 runs on unbatched input (BN input is 2-D)",
    ),
    "shared BN": (SharedBN, (2, 3, 4, 4), {}, "the module is shared"),
    "shared conv": (
        lambda: nn.Sequential(*(lambda c: [c, nn.BatchNorm2d(3), c])(nn.Conv2d(3, 3, 1))),
        (2, 3, 4, 4),
        {},
        "0 is shared",
    ),
    "residual argument": (Residual, (2, 4, 3, 3), {}, "called with extra arguments"),
    "conv subclass": (
        lambda: nn.Sequential(StdConv2d(3, 4, 1), nn.BatchNorm2d(4)),
        (2, 3, 4, 4),
        {},
        "is a StdConv2d, not a Linear/Conv/ConvTranspose layer",
    ),
    "activation child": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4)),
        (2, 3, 4, 4),
        {},
        "it has submodules (act)",
    ),
    "never called": (NeverCalled, (2, 3, 4, 4), {}, "the traced forward never calls it"),
    "fallback, no sequential": (
        lambda: Untraceable(NotSequential()),
        (2, 3, 4, 4),
        {},
        "not inside an nn.Sequential",
    ),
}


@pytest.mark.parametrize("case", list(SKIPS))
def test_skip_reasons(case):
    factory, shape, kwargs, words = SKIPS[case]
    model = randomize(factory())
    x = random_input(shape)
    kwargs = {"example_inputs": x, **kwargs}
    folded, report = check_equivalent(model, x, torch.float32, **kwargs)
    assert report.folded == [] and len(report.skipped) >= 1
    assert words in report.skipped[0].reason, str(report)
    assert words in str(report)
    assert remaining_bn(folded) == remaining_bn(model)


def test_bad_arguments():
    with pytest.raises(TypeError, match="expected an nn.Module, got str"):
        batchnorm.fold("model")
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple"):
        batchnorm.fold(nn.BatchNorm1d(3), example_inputs={"x": 1})
    with pytest.raises(ValueError, match=r"failed on example_inputs of shapes \[\(2, 5\)\]"):
        batchnorm.fold(nn.Sequential(nn.Linear(3, 2)), example_inputs=torch.ones(2, 5))
