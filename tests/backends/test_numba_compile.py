"""torch.compile(fullgraph=True) over the Numba kernels (custom ops), against eager mode."""

import torch
from torch import nn

import batchnorm
from batchnorm import ops
from conftest import assert_close


def _train_steps(model, x, steps=2):
    outputs, grads = [], []
    for _ in range(steps):
        y = model(x)
        y.square().mean().backward()
        outputs.append(y.detach())
    for p in model.parameters():
        grads.append(p.grad.clone())
        p.grad = None
    return outputs, grads


def _compare(build, x):
    """The compiled model matches the same model run eagerly: outputs, gradients, buffers,
    then eval-mode outputs."""
    torch.manual_seed(0)
    eager = build()
    compiled_model = build()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    assert ops.select_backend(x).name == "numba"
    y_eager, g_eager = _train_steps(eager, x)
    y_compiled, g_compiled = _train_steps(compiled, x)
    for a, b in zip(y_compiled + g_compiled, y_eager + g_eager, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32, sums reordered by the compiler
    for a, b in zip(compiled_model.buffers(), eager.buffers(), strict=True):
        assert_close(a.float(), b.float())
    eager.eval()
    compiled.eval()
    assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


def test_compiled_article_mlp_matches_eager():
    """The article's model: Linear -> ReLU -> BatchNorm1d -> Linear."""

    def build():
        return nn.Sequential(
            nn.Linear(40, 128), nn.ReLU(), batchnorm.BatchNorm1d(128), nn.Linear(128, 10)
        )

    _compare(build, torch.randn(100, 40))


class _ResidualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = batchnorm.BatchNormAct2d(8, activation="relu")
        self.skip = nn.Conv2d(3, 8, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 4), batchnorm.BatchNorm1d(4))

    def forward(self, x):
        return self.head(self.bn(self.conv(x), self.skip(x)))  # relu(BN(conv x) + skip x)


def test_compiled_conv_net_with_fused_bn_relu_and_residual_matches_eager():
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    _compare(_ResidualBlock, x)
