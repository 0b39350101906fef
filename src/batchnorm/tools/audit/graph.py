"""What surrounds each batch-norm layer in the data flow: the layer feeding it and the
activation after it (through a residual addition too), from fold's fx tracer, or from the
order inside nn.Sequential when the model cannot be traced."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from batchnorm.tools.affine import LAYERS, is_batchnorm_like
from batchnorm.tools.fold import _sequential_chains, _Tracer

#: Activations BatchNormAct fuses: module types, functions and tensor methods.
_ACT_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.ELU: "elu"}
_ACT_FUNCTIONS = {
    torch.relu: "relu",
    torch.relu_: "relu",
    nn.functional.relu: "relu",
    nn.functional.leaky_relu: "leaky_relu",
    nn.functional.silu: "silu",
    nn.functional.elu: "elu",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class _Neighbours:
    """What feeds a BN (a layer whose output only it reads) and the activation after it."""

    before: str | None = None
    activation: str | None = None  # relu, leaky_relu, silu, elu
    activation_at: str | None = None  # the module or code that applies it
    activation_module: str | None = None  # its module name, when it is one
    negative_slope: float = 0.01  # of a leaky_relu
    residual: bool = False  # an addition between BN and activation


def _neighbours(model: nn.Module) -> tuple[dict[str, _Neighbours], str]:
    """Each BN's neighbours from the fx-traced data flow (fold's tracer), or from the
    order inside nn.Sequential when tracing fails; and which of the two was used."""
    modules = dict(model.named_modules())
    result: dict[str, _Neighbours] = {}
    try:
        graph = _Tracer().trace(model)
    except Exception:  # any tracing failure: fx raises many kinds
        for chain in _sequential_chains(model):
            for i, (name, m) in enumerate(chain):
                if not is_batchnorm_like(m):
                    continue
                n = result.setdefault(name, _Neighbours())
                if i > 0 and isinstance(chain[i - 1][1], LAYERS):
                    n.before = chain[i - 1][0]
                if i + 1 < len(chain):
                    after_name, after = chain[i + 1]
                    kind = _module_activation(after)
                    if kind:
                        n.activation, n.activation_at = kind, f"module {after_name}"
                        n.activation_module = after_name
                        n.negative_slope = getattr(after, "negative_slope", 0.01)
        return result, "sequential"
    fused_adds: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm_like(modules[node.target]):
            continue
        n = result.setdefault(str(node.target), _Neighbours())
        source = node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], LAYERS)
            and len(source.users) == 1
        ):
            n.before = str(source.target)
        user = next(iter(node.users)) if len(node.users) == 1 else None
        residual = False
        if (
            user is not None
            and user.op in ("call_function", "call_method")
            and (user.target in _ADDS or user.target in ("add", "add_", "__add__"))
            and len(user.users) == 1
        ):
            if user in fused_adds:  # one BN of a sum takes the other term as its residual
                continue
            fused_adds.add(user)
            user, residual = next(iter(user.users)), True
        kind = _node_activation(user, modules) if user is not None else None
        if kind:
            n.activation, n.residual = kind, residual
            n.activation_at = f"module {user.target}" if user.op == "call_module" else _code(user)
            n.activation_module = str(user.target) if user.op == "call_module" else None
            n.negative_slope = _negative_slope(user, modules)
    return result, "fx"


def _negative_slope(node: fx.Node, modules: dict[str, nn.Module]) -> float:
    if node.op == "call_module":
        return float(getattr(modules[node.target], "negative_slope", 0.01))
    if node.target is nn.functional.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return float(slope) if isinstance(slope, (int, float)) else 0.01
    return 0.01


def _module_activation(m: nn.Module) -> str | None:
    kind = _ACT_MODULES.get(type(m))
    if kind == "elu" and getattr(m, "alpha", 1.0) != 1.0:
        return None  # the fused elu has alpha 1
    return kind


def _node_activation(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _module_activation(modules[node.target])
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACT_METHODS.get(node.target)
    return None


def _code(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}() in forward"
    return f"{getattr(node.target, '__name__', node.target)}() in forward"
