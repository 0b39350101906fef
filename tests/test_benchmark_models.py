"""benchmarks/models.py's BN layers alone measure what a model's BN layers compute: every
ConvBN call of a step, at its shape, with its residual, and the three contenders agree."""

from __future__ import annotations

import torch
from torch import nn

from conftest import benchmark_module


def test_bn_calls_are_the_model_s_bn_layers_with_their_shapes_and_residuals():
    models = benchmark_module("models")
    torch.manual_seed(0)
    net = models.resnet18()
    shapes = {}
    hooks = [
        bn.register_forward_hook(lambda m, args, out: shapes.__setitem__(m, out.shape))
        for bn in net.modules()
        if isinstance(bn, nn.BatchNorm2d)
    ]
    calls = models.bn_calls(net, torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert len(calls) == len(shapes) == 20
    for name, shape, _ in calls:
        assert shape == shapes[net.get_submodule(name).bn]
    # a residual joins the second conv of each of the 8 basic blocks
    assert [name for name, _, residual in calls if residual] == [f"{i}.b" for i in range(2, 10)]


def test_bn_layers_alone_measure_all_contenders_on_the_same_function():
    models = benchmark_module("models")
    models.BATCH, models.SIZE = 2, 32  # a small model: the rows, not the speed, are tested
    rows = models._measure_bn_layers(["resnet18"], "test", reps=1, warmup=0)
    assert [(r["layout"], r["mode"]) for r in rows] == [
        (layout, mode) for layout in ("nchw", "channels_last") for mode in ("training", "eval")
    ]
    for r in rows:
        assert r["bn_calls"] == 20 and r["max_output_difference"] < 1e-5
        assert r["torch.nn cpu_ms"] > 0
    assert models.bn_layers_table({"bn_layers": rows}).count("| resnet18 |") == 4
