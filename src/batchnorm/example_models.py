"""Small reference networks with batch norm in the places real models put it.

They serve the fold tests, the fold benchmark and the CLI examples
(``batchnorm fold --model batchnorm.example_models:resnet18_like ...``). Every factory
builds ``torch.nn`` batch norm; ``batchnorm.convert(model)`` swaps in this package's.
"""

from __future__ import annotations

from torch import Tensor, nn

# MobileNet-v1 body: (output channels, stride) of the 13 depthwise-separable blocks.
_MOBILENET_V1_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


def article_mlp(in_features: int = 40, hidden: int = 128, classes: int = 10) -> nn.Sequential:
    """The article's model, Dense(128, relu) -> BatchNormalization -> Dense(10): the BN sits
    after the activation, so it can only fold into the following Linear."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.BatchNorm1d(hidden),
        nn.Linear(hidden, classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, and a 1x1 conv + BN on the shortcut
    when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return (out + shortcut).relu()


class ResNetLike(nn.Module):
    """ResNet-18 layout: 7x7 stem, max-pool, four stages of two basic blocks, linear head."""

    def __init__(self, width: int = 64, classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], width
        for stage in range(4):
            cout = width * 2**stage
            blocks += [BasicBlock(cin, cout, 1 if stage == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def resnet18_like(width: int = 64, classes: int = 1000, in_channels: int = 3) -> ResNetLike:
    """A ResNet-18-like network (basic blocks, strided 1x1 downsample branches)."""
    return ResNetLike(width, classes, in_channels)


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck block: 1x1 -> 3x3 (stride) -> 1x1 (4x wider) convs, BN after
    each, ReLU after the first two and after the residual sum. ``fused``: batchnorm's
    BatchNormAct2d computes BN + ReLU, and BN + residual + ReLU, in one pass each."""

    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int, fused: bool = False) -> None:
        super().__init__()
        cout = mid * self.expansion
        self.fused = fused
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = _bn(mid, fused)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = _bn(mid, fused)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = _bn(cout, fused)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.fused:
            out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
            return self.bn3(self.conv3(out), shortcut)
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out)).relu()
        return (self.bn3(self.conv3(out)) + shortcut).relu()


def _bn(channels: int, fused: bool) -> nn.Module:
    if not fused:
        return nn.BatchNorm2d(channels)
    from batchnorm.nn import BatchNormAct2d  # the fused layer exists in this package only

    return BatchNormAct2d(channels, activation="relu")


def resnet50_like(
    width: int = 64, classes: int = 1000, stages: tuple[int, ...] = (3, 4, 6, 3), fused=False
) -> nn.Sequential:
    """A ResNet-50-like network (bottleneck blocks; ResNet-50's BN shapes with the default
    width and stages). ``fused=True`` builds it with batchnorm.BatchNormAct2d (BN + ReLU and
    BN + residual + ReLU fused); otherwise with torch.nn.BatchNorm2d like every factory
    here."""
    layers: list[nn.Module] = _conv_bn_relu(3, width, 7, 2) + [nn.MaxPool2d(3, 2, 1)]
    cin = width
    for stage, blocks in enumerate(stages):
        mid = width * 2**stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(Bottleneck(cin, mid, stride, fused))
            cin = mid * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


def mobilenet_like(width_mult: float = 1.0, classes: int = 1000) -> nn.Sequential:
    """A MobileNet-v1-like network: 3x3 stem, 13 depthwise + pointwise blocks. The last
    block puts BN after the activation (dw -> ReLU -> BN -> 1x1 conv), and the classifier is
    a 1x1 conv after a BN: two BN layers that can only fold into the 1x1 conv after them."""
    c = [max(8, int(ch * width_mult)) for ch, _ in _MOBILENET_V1_BLOCKS]
    stem = max(8, int(32 * width_mult))
    layers: list[nn.Module] = _conv_bn_relu(3, stem, 3, 2)
    cin = stem
    for (_, stride), cout in zip(_MOBILENET_V1_BLOCKS[:-1], c[:-1], strict=True):
        layers += _conv_bn_relu(cin, cin, 3, stride, groups=cin)  # depthwise
        layers += _conv_bn_relu(cin, cout, 1, 1)  # pointwise
        cin = cout
    layers += [
        nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(cin),
        nn.Conv2d(cin, c[-1], 1, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(c[-1]),
        nn.Conv2d(c[-1], classes, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers)


def cnn1d(in_channels: int = 2, width: int = 16, classes: int = 10) -> nn.Sequential:
    """A 1-D CNN: an input BN before a reflect-padded conv, strided/dilated/grouped convs,
    and a BN after a Linear in the head."""
    return nn.Sequential(
        nn.BatchNorm1d(in_channels),
        nn.Conv1d(in_channels, width, 5, padding=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv1d(width, 2 * width, 3, stride=2, dilation=2, groups=2),
        nn.BatchNorm1d(2 * width),
        nn.ReLU(),
        nn.Conv1d(2 * width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm1d(2 * width, affine=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(2 * width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, classes),
    )


def conv_transpose_decoder(
    latent: int = 16, width: int = 16, out_channels: int = 3
) -> nn.Sequential:
    """A decoder: Linear to a 4x4 map, then strided ConvTranspose2d layers each followed
    by BN (grouped, without bias, affine=False among them)."""
    return nn.Sequential(
        nn.Linear(latent, width * 4 * 4),
        nn.Unflatten(1, (width, 4, 4)),
        nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1, groups=4),
        nn.BatchNorm2d(width, affine=False),
        nn.ReLU(),
        nn.ConvTranspose2d(width, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.Tanh(),
    )
