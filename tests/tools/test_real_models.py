"""The model tools on the batch-norm layers of real model libraries: timm's BatchNormAct2d
and FrozenBatchNormAct2d, torchvision's FrozenBatchNorm2d, and batch-norm classes nobody
knows. A tool must keep what a layer computes or leave the layer alone with a reason: it
never changes a model's function silently.

timm (1.0.31) cannot be installed next to torch 2.13 (it needs torchvision, whose wheels pin
another torch), so the classes below reproduce timm's and torchvision's: the same names,
modules, constructors, attributes and forward code (timm/layers/norm_act.py,
torchvision/ops/misc.py). The library recognises them by name, module and attributes and
never imports either library.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import SkippedLayerWarning, SyncBatchNorm
from conftest import random_input

# --------------------------------------------------------------------------- the replicas


def _create_act(act_layer, act_kwargs=None, inplace=False, apply_act=True):
    if not apply_act:
        return nn.Identity()
    act_kwargs = dict(act_kwargs or {})
    try:
        return act_layer(**act_kwargs, inplace=inplace)
    except TypeError:  # timm's create_act_layer: layers without an inplace argument
        return act_layer(**act_kwargs)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d (timm 1.0.31)."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        apply_act=True,
        act_layer=nn.ReLU,
        act_kwargs=None,
        inplace=True,
        drop_layer=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, device=device, dtype=dtype,
        )  # fmt: skip
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


def _load_without_batch_count(self, state_dict, prefix, *args):
    """The frozen layers' state_dict loading: a BN's num_batches_tracked is dropped."""
    state_dict.pop(prefix + "num_batches_tracked", None)
    nn.Module._load_from_state_dict(self, state_dict, prefix, *args)


def _frozen_affine(m, x):
    """What timm's and torchvision's frozen BN compute: x * scale + bias, per channel, from
    the buffers."""
    scale = m.weight * (m.running_var + m.eps).rsqrt()
    bias = m.bias - m.running_mean * scale
    return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class FrozenBatchNormAct2d(nn.Module):
    """timm.layers.norm_act.FrozenBatchNormAct2d (timm 1.0.31)."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        apply_act=True,
        act_layer=nn.ReLU,
        act_kwargs=None,
        inplace=True,
        drop_layer=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **dd))
        self.register_buffer("bias", torch.zeros(num_features, **dd))
        self.register_buffer("running_mean", torch.zeros(num_features, **dd))
        self.register_buffer("running_var", torch.ones(num_features, **dd))
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, act_kwargs, inplace, apply_act)

    _load_from_state_dict = _load_without_batch_count

    def forward(self, x):
        return self.act(self.drop(_frozen_affine(self, x)))


class TorchvisionFrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d (torchvision >= 0.13)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    _load_from_state_dict = _load_without_batch_count

    def forward(self, x):
        return _frozen_affine(self, x)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


for _cls in (BatchNormAct2d, FrozenBatchNormAct2d):
    _cls.__module__ = "timm.layers.norm_act"
TorchvisionFrozenBatchNorm2d.__name__ = "FrozenBatchNorm2d"
TorchvisionFrozenBatchNorm2d.__qualname__ = "FrozenBatchNorm2d"
TorchvisionFrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


class DetrFrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """The copies in DETR-style repositories: another module, eps hard-coded."""

    def forward(self, x):
        return super().forward(x)


DetrFrozenBatchNorm2d.__name__ = DetrFrozenBatchNorm2d.__qualname__ = "FrozenBatchNorm2d"
DetrFrozenBatchNorm2d.__module__ = "models.backbone"


class WeightStandardizedBN(nn.BatchNorm2d):
    """A subclass with its own forward: what it computes is not batch norm."""

    def forward(self, x):
        return super().forward(x) * 2 + 1


# --------------------------------------------------------------------------- models


def _trained(model: nn.Module, shape=(6, 3, 6, 6), steps: int = 2) -> nn.Module:
    """Move the running statistics and the affine parameters away from their defaults."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and not isinstance(m, (nn.Conv2d, nn.Linear)):
                    t.copy_(torch.randn_like(t) * 0.5 + (1.0 if name == "weight" else 0.0))
            if hasattr(m, "running_var") and isinstance(m.running_var, torch.Tensor):
                if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                    m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    model.train()
    for step in range(steps):
        model(random_input(shape, torch.float64, seed=10 + step))
    return model


def efficientnet_like() -> nn.Module:
    """Stem and two blocks in timm's EfficientNet style: every BN a BatchNormAct2d (SiLU,
    ReLU, LeakyReLU, none), a torchvision frozen BN, and torch.nn BN."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8, act_layer=nn.SiLU),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        BatchNormAct2d(8, act_layer=nn.ReLU, momentum=None),
        nn.Conv2d(8, 6, 1, bias=False),
        BatchNormAct2d(6, apply_act=False),
        nn.Conv2d(6, 6, 1, bias=False),
        BatchNormAct2d(6, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}),
        nn.Conv2d(6, 4, 1),
        TorchvisionFrozenBatchNorm2d(4),
        nn.BatchNorm2d(4),
    ).double()


def mobilenetv3_like() -> nn.Module:
    """Layers the tools cannot replace: a Hardswish activation, a drop layer, an unknown
    subclass, another library's frozen BN."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        BatchNormAct2d(4, act_layer=nn.Hardswish),
        BatchNormAct2d(4, drop_layer=lambda: nn.Dropout(0.5)),
        WeightStandardizedBN(4),
        DetrFrozenBatchNorm2d(4),
        nn.BatchNorm2d(4),
    ).double()


def _outputs_agree(a: nn.Module, b: nn.Module, x: torch.Tensor, train: bool = True) -> None:
    """Same outputs in eval mode and, for ``train``, in a training step (and the same
    running statistics after it)."""
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    if train:
        a.train(), b.train()
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
        for (key, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12, msg=key)


X = random_input((5, 3, 6, 6), torch.float64, seed=1)

# --------------------------------------------------------------------------- timm


def test_convert_maps_timm_batch_norm_act_to_ours_and_back():
    model = _trained(efficientnet_like())
    original = copy.deepcopy(model)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is known: no SkippedLayerWarning
        ours = batchnorm.convert(model)
    kinds = [type(ours[i]) for i in (1, 3, 5, 7, 9, 10)]
    assert kinds == [batchnorm.BatchNormAct2d] * 4 + [
        batchnorm.FrozenBatchNorm2d,
        batchnorm.BatchNorm2d,
    ]
    assert [(ours[i].activation, ours[i].negative_slope) for i in (1, 3, 5, 7)] == [
        ("silu", 0.01), ("relu", 0.01), (None, 0.01), ("leaky_relu", 0.2),
    ]  # fmt: skip
    assert ours[3].momentum is None and ours[1].original_class is BatchNormAct2d
    # The state_dict is timm's, key for key and value for value: checkpoints load both ways.
    assert {k: v for k, v in ours.state_dict().items()}.keys() == keys.keys()
    for key, value in keys.items():
        assert torch.equal(ours.state_dict()[key], value), key
    fresh = efficientnet_like()
    fresh.load_state_dict(ours.state_dict())
    _outputs_agree(ours, original, X)  # a training step each: both stay in step

    back = batchnorm.convert(ours, to="torch")
    assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]
    assert type(back[1].act) is nn.SiLU and back[7].act.negative_slope == 0.2
    assert type(back[5].act) is nn.Identity and type(back[5].drop) is nn.Identity
    _outputs_agree(back, original, X)


def test_convert_keeps_what_it_cannot_map_and_says_why():
    model = _trained(mobilenetv3_like(), shape=(6, 3, 6, 6))
    original = copy.deepcopy(model)
    with pytest.warns(SkippedLayerWarning) as caught:
        ours = batchnorm.convert(model)
    message = str(caught[0].message)
    assert "convert(to='batchnorm') left 4 batch-norm layer(s)" in message
    assert "1: kept BatchNormAct2d, its activation Hardswish() is not one batchnorm" in message
    assert "2: kept BatchNormAct2d, its drop layer is a Dropout" in message
    assert "3: kept WeightStandardizedBN, " in message and "has its own forward" in message
    assert "4: kept FrozenBatchNorm2d, models.backbone.FrozenBatchNorm2d is a frozen" in message
    assert [type(m) for m in ours.children()][1:5] == [type(m) for m in original.children()][1:5]
    assert type(ours[5]) is batchnorm.BatchNorm2d
    torch.manual_seed(0)  # the dropout
    expected = original(X)
    torch.manual_seed(0)
    torch.testing.assert_close(ours(X), expected)


def test_freeze_keeps_timm_activation_or_keeps_the_layer():
    """The bug: freeze turned timm's BatchNormAct2d into a FrozenBatchNorm2d without its
    activation, and reported it frozen."""
    model = _trained(efficientnet_like())
    expected = copy.deepcopy(model).eval()
    frozen, report = batchnorm.freeze(model)
    assert "1: BatchNormAct2d -> FrozenBatchNorm2d" in report
    assert [frozen[i].activation for i in (1, 3, 5, 7)] == ["silu", "relu", None, "leaky_relu"]
    assert type(frozen[9]) is TorchvisionFrozenBatchNorm2d  # frozen already: left as it is
    frozen.train()  # frozen layers compute eval mode's function in train mode too
    torch.testing.assert_close(frozen(X), expected(X), rtol=1e-12, atol=1e-12)
    assert batchnorm.convert(copy.deepcopy(expected), to="frozen")[1].activation == "silu"

    unknown = _trained(mobilenetv3_like())
    expected = copy.deepcopy(unknown).eval()
    frozen, report = batchnorm.freeze(unknown)
    kept = [line for line in report if ": kept " in line]
    assert [line.split(":")[0] for line in kept] == ["1", "2", "3"]
    assert "4" not in "".join(line.split(":")[0] for line in report)  # not a _BatchNorm
    assert type(frozen[5]) is batchnorm.FrozenBatchNorm2d
    frozen.eval()
    torch.testing.assert_close(frozen(X), expected(X), rtol=1e-12, atol=1e-12)
    with pytest.warns(SkippedLayerWarning, match="1: kept BatchNormAct2d"):
        batchnorm.convert(copy.deepcopy(unknown), to="frozen")


def test_unfreeze_torchvision_and_timm_frozen_layers():
    model = _trained(
        nn.Sequential(
            nn.Conv2d(3, 4, 1),
            TorchvisionFrozenBatchNorm2d(4, eps=1e-3),
            FrozenBatchNormAct2d(4, act_layer=nn.SiLU),
            FrozenBatchNormAct2d(4, act_layer=nn.GELU),
            DetrFrozenBatchNorm2d(4),
        ).double()
    )
    expected = copy.deepcopy(model).eval()
    thawed, report = batchnorm.unfreeze(model)
    assert report[:2] == ["1: FrozenBatchNorm2d -> BatchNorm2d",
                          "2: FrozenBatchNormAct2d -> BatchNormAct2d"]  # fmt: skip
    assert report[2].startswith("3: kept FrozenBatchNormAct2d, its activation GELU(")
    assert report[3].startswith("4: kept FrozenBatchNorm2d, models.backbone.FrozenBatchNorm2d")
    assert thawed[1].eps == 1e-3 and thawed[2].activation == "silu"
    assert thawed[1].weight.requires_grad and int(thawed[1].num_batches_tracked) == 0
    thawed.eval()
    torch.testing.assert_close(thawed(X), expected(X), rtol=1e-12, atol=1e-12)


def test_torchvision_frozen_batch_norm_round_trip_and_state_dicts():
    tv = _trained(nn.Sequential(TorchvisionFrozenBatchNorm2d(3, eps=1e-4).double()))
    expected = copy.deepcopy(tv)
    ours = batchnorm.convert(tv)
    assert type(ours[0]) is batchnorm.FrozenBatchNorm2d and ours[0].eps == 1e-4
    assert ours.state_dict().keys() == expected.state_dict().keys()
    torch.testing.assert_close(ours(X), expected(X), rtol=1e-12, atol=1e-12)
    # state_dicts load both ways, a trained BN's too (num_batches_tracked is dropped)
    fresh_tv = nn.Sequential(TorchvisionFrozenBatchNorm2d(3, eps=1e-4).double())
    fresh_tv.load_state_dict(ours.state_dict())
    bn = _trained(nn.Sequential(nn.BatchNorm2d(3).double()))
    fresh_tv.load_state_dict(bn.state_dict())
    ours.load_state_dict(bn.state_dict())
    back = batchnorm.convert(ours, to="torch")
    assert type(back[0]) is TorchvisionFrozenBatchNorm2d and back[0].eps == 1e-4
    torch.testing.assert_close(back(X), fresh_tv(X), rtol=1e-12, atol=1e-12)


def test_timm_frozen_batch_norm_act_round_trip():
    timm_frozen = _trained(nn.Sequential(FrozenBatchNormAct2d(3, act_layer=nn.SiLU).double()))
    expected = copy.deepcopy(timm_frozen)
    ours = batchnorm.convert(timm_frozen)
    assert type(ours[0]) is batchnorm.FrozenBatchNorm2d and ours[0].activation == "silu"
    assert ours.state_dict().keys() == expected.state_dict().keys()
    torch.testing.assert_close(ours(X), expected(X), rtol=1e-12, atol=1e-12)
    back = batchnorm.convert(ours, to="torch")
    assert type(back[0]) is FrozenBatchNormAct2d and type(back[0].act) is nn.SiLU
    torch.testing.assert_close(back(X), expected(X), rtol=1e-12, atol=1e-12)


def test_convert_sync_batchnorm_keeps_timm_activation_and_reverts_to_timm():
    model = _trained(efficientnet_like())
    expected = copy.deepcopy(model)
    synced = batchnorm.convert_sync_batchnorm(model)
    assert all(type(synced[i]) is SyncBatchNorm for i in (1, 3, 5, 7, 10))
    assert type(synced[9]) is TorchvisionFrozenBatchNorm2d  # nothing to synchronize
    assert synced[1].activation == "silu" and synced[1].original_class is BatchNormAct2d
    _outputs_agree(synced, expected, X)  # one process: plain batch norm
    back = batchnorm.revert_sync_batchnorm(synced)
    assert [type(m) for m in back.modules()] == [type(m) for m in expected.modules()]
    _outputs_agree(back, expected, X)

    with pytest.warns(SkippedLayerWarning) as caught:
        synced = batchnorm.convert_sync_batchnorm(_trained(mobilenetv3_like()))
    assert "left 3 batch-norm layer(s)" in str(caught[0].message)
    assert type(synced[5]) is SyncBatchNorm


def test_the_warning_groups_layers_kept_for_the_same_reason():
    model = nn.Sequential(*(BatchNormAct2d(2, act_layer=nn.Hardswish) for _ in range(7)))
    with pytest.warns(SkippedLayerWarning) as caught:
        batchnorm.convert(model)
    lines = str(caught[0].message).splitlines()
    assert lines[0] == "convert(to='batchnorm') left 7 batch-norm layer(s) as they are:"
    assert lines[1].startswith("  0, 1, 2, 3, 4 and 2 more: kept BatchNormAct2d, its activation")
    assert len(lines) == 2


# --------------------------------------------------------------------------- the audit


@pytest.mark.parametrize(
    "tool",
    [
        lambda m: batchnorm.convert(m),
        lambda m: batchnorm.convert(m, to="frozen"),
        lambda m: batchnorm.freeze(m)[0],
        lambda m: batchnorm.convert_sync_batchnorm(m),
    ],
    ids=["convert", "convert-frozen", "freeze", "convert_sync_batchnorm"],
)
def test_no_tool_replaces_a_subclass_it_does_not_know(tool):
    class Plain(nn.BatchNorm2d):  # no forward of its own, but unknown: kept all the same
        pass

    class Ours(batchnorm.BatchNorm2d):
        def _forward(self, input, residual):
            return super()._forward(input, residual) + 1

    model = nn.Sequential(WeightStandardizedBN(3), Plain(3), Ours(3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedLayerWarning)
        out = tool(model)
    assert [type(m) for m in out] == [WeightStandardizedBN, Plain, Ours]


def test_report_names_an_uninitialized_lazy_layer():
    _, report = batchnorm.freeze(nn.Sequential(nn.LazyBatchNorm2d()))
    assert report == [
        "0: kept LazyBatchNorm2d, it is an uninitialized lazy module; run one batch through the "
        "model first"
    ]


def test_convert_to_torch_keeps_layers_torch_lacks():
    model = nn.Sequential(
        batchnorm.BatchNormAct2d(3, activation="relu"),
        batchnorm.BatchNormAct2d(3, activation=None),
        batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2),
        batchnorm.FrozenBatchNorm2d(3),
        batchnorm.SyncBatchNorm(3),
    )
    with pytest.warns(SkippedLayerWarning) as caught:
        out = batchnorm.convert(model, to="torch")
    message = str(caught[0].message)
    assert "0: kept BatchNormAct2d, torch.nn has no batch norm fused with an activation (relu)" in (
        message
    )
    assert "2: kept GhostBatchNorm2d, torch.nn has no ghost batch norm" in message
    assert "3: kept FrozenBatchNorm2d, torch.nn has no frozen batch norm" in message
    assert [type(m) for m in out] == [
        batchnorm.BatchNormAct2d, nn.BatchNorm2d, batchnorm.GhostBatchNorm2d,
        batchnorm.FrozenBatchNorm2d, nn.SyncBatchNorm,
    ]  # fmt: skip


def test_torch_sync_batch_norm_converts_both_ways():
    torch_sync = nn.SyncBatchNorm(3, momentum=0.2, process_group="pg")
    ours = batchnorm.convert(nn.Sequential(torch_sync))
    assert type(ours[0]) is SyncBatchNorm and ours[0].process_group == "pg"
    assert ours[0].momentum == 0.2
    back = batchnorm.convert(ours, to="torch")
    assert type(back[0]) is nn.SyncBatchNorm and back[0].process_group == "pg"
