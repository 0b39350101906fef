"""The layers in graph tools: torch.fx tracing (symbolic_trace, feature extraction, fx's
Conv+BN fuser), TorchScript, and the tools that match exact torch.nn classes (quantization's
fuse_modules), with their one-line way out, ``batchnorm.convert(model, to="torch")``."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import fx, nn

import batchnorm
from batchnorm import example_models
from conftest import random_input

# TorchScript still works in torch 2.13, which says it is deprecated.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")

X = random_input((3, 3, 16, 16), torch.float64, seed=1)


def converted_resnet() -> nn.Module:
    torch.manual_seed(0)
    return batchnorm.convert(example_models.resnet18_like(width=8, classes=5)).double()


def _bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, batchnorm.BatchNorm2d)]


def _agree(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    """Same outputs, gradients-free, in a training step (same running statistics after it)
    and in eval mode."""
    a.train(), b.train()
    torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    for (key, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12, msg=key)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- torch.fx


def test_symbolic_trace_of_a_converted_resnet_calls_each_layer():
    model = converted_resnet()
    graph_module = fx.symbolic_trace(copy.deepcopy(model))
    called = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert [name for name in called if name in _bn_names(model)] == _bn_names(model)
    assert all(isinstance(graph_module.get_submodule(n), batchnorm.BatchNorm2d)
               for n in _bn_names(model))  # fmt: skip
    _agree(graph_module, model, X)


LAYERS = {
    "BatchNorm1d": lambda: batchnorm.BatchNorm1d(3),
    "BatchNormAct2d": lambda: batchnorm.BatchNormAct2d(3, activation="silu"),
    "BatchRenorm2d": lambda: batchnorm.BatchRenorm2d(3),
    "GhostBatchNorm2d": lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2),
    "FrozenBatchNorm2d": lambda: batchnorm.FrozenBatchNorm2d(3),
    "InPlaceBatchNormAct2d": lambda: batchnorm.InPlaceBatchNormAct2d(3),
    "SyncBatchNorm": lambda: batchnorm.SyncBatchNorm(3),
}


@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_is_one_node_as_torch_nn_batch_norm_is(name):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), LAYERS[name]()).double()
    x = X if name != "BatchNorm1d" else X[:, :, 0, 0]
    if name == "BatchNorm1d":
        model[0] = nn.Identity()
    graph_module = fx.symbolic_trace(copy.deepcopy(model))
    ops = [(n.op, n.target) for n in graph_module.graph.nodes]
    assert ops == [("placeholder", "input"), ("call_module", "0"), ("call_module", "1"),
                   ("output", "output")]  # fmt: skip
    _agree(graph_module, model, x)


class ResidualBlock(nn.Module):
    """A fused block: the residual and the activation go into the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = batchnorm.BatchNormAct2d(3, activation="relu")

    def forward(self, x):
        return self.bn(self.conv(x), residual=x)


def test_a_residual_passed_to_the_layer_is_an_argument_of_its_node():
    model = ResidualBlock().double()
    graph_module = fx.symbolic_trace(copy.deepcopy(model))
    node = next(n for n in graph_module.graph.nodes if n.target == "bn")
    assert [str(a) for a in node.args] == ["conv", "x"]
    _agree(graph_module, model, X)


def test_tracing_a_layer_alone_says_how_to_trace_it():
    with pytest.raises(fx.proxy.TraceError, match=r"trace a model that contains it"):
        fx.symbolic_trace(batchnorm.BatchNorm2d(3))


class NodePathTracer(fx.Tracer):
    """torchvision's create_feature_extractor in short: a tracer that names every node by
    the qualified name of the module that made it, and leaves torch.nn modules as leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.current = ""
        self.node_to_qualname: dict[fx.Node, str] = {}

    def call_module(self, m, forward, args, kwargs):
        previous, self.current = self.current, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.current = previous

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        name = self.current if kind == "call_module" else f"{self.current}.{proxy.node}"
        self.node_to_qualname[proxy.node] = name.lstrip(".")
        return proxy


def create_feature_extractor(model: nn.Module, return_nodes: list[str]) -> fx.GraphModule:
    tracer = NodePathTracer()
    graph = tracer.trace(model)
    by_name = {tracer.node_to_qualname.get(n): n for n in graph.nodes}
    for node in list(graph.nodes):
        if node.op == "output":
            graph.erase_node(node)
    graph.output({name: by_name[name] for name in return_nodes})
    extractor = fx.GraphModule(model, graph)
    extractor.graph.eliminate_dead_code()
    extractor.recompile()
    return extractor


def test_feature_extraction_returns_the_outputs_of_our_layers():
    model = converted_resnet().eval()
    names = ["stem.1", "blocks.2.bn2", "blocks.2.downsample.1", "blocks.7.bn1"]
    extractor = create_feature_extractor(model, names)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in names]  # fmt: skip
    model(X)
    for h in hooks:
        h.remove()
    features = extractor(X)
    assert list(features) == names
    for name in names:
        torch.testing.assert_close(features[name], seen[name], rtol=0, atol=0)


def test_fx_fuse_skips_our_layers_and_convert_to_torch_is_the_way_out():
    """torch.fx.experimental.optimization.fuse matches exact torch.nn classes: it traces our
    model but fuses nothing; converted to torch.nn first, it fuses every Conv+BN."""
    model = converted_resnet().eval()
    expected = model(X)
    fused = fx_optimization.fuse(model)
    assert len(_bn_names(fused)) == len(_bn_names(model)) == 20
    torch.testing.assert_close(fused(X), expected)

    fused = fx_optimization.fuse(batchnorm.convert(copy.deepcopy(model), to="torch"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    torch.testing.assert_close(fused(X), expected, rtol=1e-10, atol=1e-10)
    folded, report = batchnorm.fold(model, X)  # this package's fuser takes our layers as they are
    assert len(report.folded) == 20
    torch.testing.assert_close(folded(X), expected, rtol=1e-10, atol=1e-10)


def test_quantization_fuse_modules_needs_torch_classes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU()).double()
    model = _trained_eval(model)
    expected = model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization
        from torch.ao.quantization import fuse_modules

        with pytest.raises(AssertionError, match="did not find fuser method"):
            fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
        fused = fuse_modules(batchnorm.convert(model, to="torch"), [["0", "1", "2"]])
    assert type(fused[1]) is nn.Identity and type(fused[2]) is nn.Identity
    torch.testing.assert_close(fused(X), expected, rtol=1e-10, atol=1e-10)


def _trained_eval(model: nn.Module) -> nn.Module:
    model.train()
    model(random_input((4, 3, 16, 16), torch.float64, seed=5))
    return model.eval()


# --------------------------------------------------------------------------- TorchScript


SCRIPTED = {
    "BatchNorm2d": lambda: batchnorm.BatchNorm2d(3),
    "BatchNorm1d momentum=None": lambda: batchnorm.BatchNorm1d(3, momentum=None),
    "BatchNorm3d biased running var": lambda: batchnorm.BatchNorm3d(3, unbiased_running_var=False),
    "BatchNorm2d no running stats": lambda: batchnorm.BatchNorm2d(3, track_running_stats=False),
    "BatchNorm2d bias=False": lambda: batchnorm.BatchNorm2d(3, bias=False),
    "BatchNormAct2d leaky_relu": lambda: batchnorm.BatchNormAct2d(
        3, activation="leaky_relu", negative_slope=0.2
    ),
    "BatchNormAct2d elu": lambda: batchnorm.BatchNormAct2d(3, activation="elu"),
    "InPlaceBatchNormAct2d": lambda: batchnorm.InPlaceBatchNormAct2d(3),
    "FrozenBatchNorm2d silu": lambda: batchnorm.FrozenBatchNorm2d(3, activation="silu"),
}
SHAPES = {"1d": (6, 3), "2d": (4, 3, 5, 5), "3d": (2, 3, 2, 3, 2)}


def _shape(layer: nn.Module) -> tuple[int, ...]:
    name = type(layer).__name__
    return SHAPES[next(k for k in SHAPES if k in name)]


@pytest.mark.parametrize("name", SCRIPTED)
def test_scripted_layer_trains_and_evaluates_as_the_eager_one(name):
    layer = SCRIPTED[name]().double()
    scripted = torch.jit.script(copy.deepcopy(layer))
    x = random_input(_shape(layer), torch.float64, seed=2)
    residual = random_input(_shape(layer), torch.float64, seed=3)
    takes_residual = not name.startswith("InPlace")  # it keeps only its output for backward
    for train in (True, True, False):
        layer.train(train), scripted.train(train)
        torch.testing.assert_close(scripted(x), layer(x), rtol=1e-10, atol=1e-10)
        if takes_residual:
            torch.testing.assert_close(scripted(x, residual), layer(x, residual), rtol=1e-10,
                                       atol=1e-10)  # fmt: skip
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(scripted.state_dict()[key], value, msg=key)
    with pytest.raises(torch.jit.Error, match="expected an input with"):
        scripted(x[:, :, 0] if x.dim() > 3 else x.unsqueeze(-1).unsqueeze(-1))


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2),
        lambda: batchnorm.BatchRenorm2d(3),
        lambda: batchnorm.SyncBatchNorm(3),
    ],
    ids=["ghost", "renorm", "sync"],
)
def test_variants_script_their_eval_mode(make):
    layer = make().double()
    layer(random_input((4, 3, 5, 5), torch.float64))  # running statistics of its own kind
    layer.eval()
    scripted = torch.jit.script(copy.deepcopy(layer))
    x = random_input((4, 3, 5, 5), torch.float64, seed=1)
    torch.testing.assert_close(scripted(x), layer(x), rtol=1e-10, atol=1e-10)
    scripted.train()
    with pytest.raises(torch.jit.Error, match="trains only in eager mode"):
        scripted(x)


def test_scripted_converted_model_saves_loads_and_matches():
    model = converted_resnet()
    model.stem[1] = batchnorm.BatchNormAct2d(8, activation="relu").double()  # fused stem
    model.stem[2] = nn.Identity()
    _trained_eval(model).train()
    scripted = torch.jit.script(copy.deepcopy(model))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    _agree(loaded, model, X)
    # the layers are unchanged in eager mode: still this package's, with layer_name
    assert type(model.stem[1]) is batchnorm.BatchNormAct2d
    assert model.stem[1].layer_name == "BatchNormAct2d(8)"
