"""Fold eval-mode batch norm into the neighbouring Linear, Conv or ConvTranspose layer.

In eval mode a batch-norm layer is a fixed per-channel affine map ``y = scale * x + shift``,

    scale = weight / sqrt(running_var + eps),    shift = bias - running_mean * scale,

so it can be absorbed by the layer next to it:

* **after** a layer ``L`` (``BN(L(x))``): scale ``L``'s output channels and bias.
  Exact for Linear, Conv1d/2d/3d (any stride, dilation, padding, groups) and
  ConvTranspose1d/2d/3d.
* **before** a layer ``L`` (``L(BN(x))``): scale ``L``'s input channels and add
  ``L``'s response to the constant ``shift`` to its bias. Exact for Linear and for a Conv
  whose windows never see padding (zero padding) or see copies of the input
  (``padding_mode`` reflect/replicate/circular). Not for zero-padded convs (the padded
  border would see 0 instead of ``shift``) nor ConvTranspose (border outputs receive fewer
  taps), so those are skipped.

:func:`fold` finds the pairs with ``torch.fx`` symbolic tracing, which sees the real data
flow of arbitrary model code; when tracing fails it falls back to neighbours inside
``nn.Sequential`` containers. The report names every batch-norm layer left in place and why.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from batchnorm.tools.affine import (
    CONV,
    CONV_TRANSPOSE,
    LAYERS,
    bn_affine,
    fold_into_next,
    fold_into_previous,
    fused_activation,
    in_channels,
    is_batchnorm_like,
    num_channels,
    out_channels,
)

# The activations a fused BN+activation module may carry, as modules fold can leave behind.
_ACTIVATION_MODULES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "relu": lambda bn: nn.ReLU(),
    "leaky_relu": lambda bn: nn.LeakyReLU(getattr(bn, "negative_slope", 0.01)),
    "silu": lambda bn: nn.SiLU(),
}


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class FoldedBN:
    """A batch-norm layer absorbed by ``into``, which ran ``position`` ("before"/"after") it.
    ``kept`` names the activation left in its place by a fused BN+activation module."""

    name: str
    into: str
    position: str
    kept: str | None = None


@dataclass(frozen=True)
class SkippedBN:
    """A batch-norm layer left in the model, with the reason."""

    name: str
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold` did. ``method`` is "fx" (traced data flow) or "sequential" (the
    fallback; ``trace_error`` then says why tracing failed)."""

    method: str
    trace_error: str | None = None
    folded: list[FoldedBN] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)

    def __str__(self) -> str:
        total = len(self.folded) + len(self.skipped)
        lines = [f"fold: {len(self.folded)} of {total} batch-norm layers folded ({self.method})"]
        if self.trace_error:
            lines.append(
                f"  fx tracing failed ({self.trace_error}); only neighbours inside nn.Sequential "
                f"were considered, assuming nothing else reads their intermediate outputs"
            )
        for f in self.folded:
            kept = f" (kept its {f.kept})" if f.kept else ""
            where = "following" if f.position == "before" else "preceding"
            lines.append(f"  folded  {f.name} into the {where} {f.into}{kept}")
        lines += [f"  skipped {s.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the decision


@dataclass
class _Neighbour:
    """The layer on one side of a BN call, or why there is none usable."""

    name: str | None
    why_not: str = ""


@dataclass
class _Facts:
    """Model-wide facts both analyses share."""

    model: nn.Module
    calls: Counter  # module name -> number of call sites / eager calls
    ranks: dict[str, int]  # BN name -> input rank, when example_inputs were given
    shared_params: set[int]  # ids of parameters owned by more than one module
    referenced: set[str]  # modules whose tensors the forward reads directly (fx get_attr)


def _decide(facts: _Facts, name: str, before: _Neighbour, after: _Neighbour) -> FoldedBN | str:
    """Fold the BN ``name`` into ``before`` (the layer feeding it) or ``after`` (the layer it
    feeds) if exactly equivalent, changing the model; else return why not."""
    bn = facts.model.get_submodule(name)
    affine = bn_affine(bn)
    if isinstance(affine, str):
        return affine
    if facts.calls[name] > 1 or name in facts.referenced or _owns_shared(facts, bn):
        return "the module is shared (called more than once or its tensors used elsewhere)"
    activation = fused_activation(bn)
    if activation is not None and activation not in _ACTIVATION_MODULES:
        return f"fused activation {activation!r} that fold does not know"
    reasons = []
    why = _check_layer(facts, name, before, "after")
    if not why:
        fold_into_previous(facts.model.get_submodule(before.name), *affine)
        kept = _ACTIVATION_MODULES[activation](bn) if activation else nn.Identity()
        _replace(facts.model, name, kept)
        return FoldedBN(name, before.name, "after", activation)
    reasons.append(f"before it: {why}")
    why = (
        f"its fused {activation} runs between it and the next layer"
        if activation
        else _check_layer(facts, name, after, "before")
    )
    if not why:
        fold_into_next(facts.model.get_submodule(after.name), *affine)
        _replace(facts.model, name, nn.Identity())
        return FoldedBN(name, after.name, "before")
    reasons.append(f"after it: {why}")
    return "; ".join(reasons)


def _check_layer(facts: _Facts, bn_name: str, side: _Neighbour, position: str) -> str:
    """Why the BN cannot fold into the layer ``side`` that it sits ``position`` (after or
    before); empty when it can."""
    if side.name is None:
        return side.why_not
    layer = facts.model.get_submodule(side.name)
    kind = type(layer).__name__
    if type(layer) not in LAYERS:
        return f"{side.name} is a {kind}, not a Linear/Conv/ConvTranspose layer"
    if facts.calls[side.name] > 1 or side.name in facts.referenced or _owns_shared(facts, layer):
        return f"{side.name} is shared (called more than once or its tensors used elsewhere)"
    bn = facts.model.get_submodule(bn_name)
    channels = out_channels(layer) if position == "after" else in_channels(layer)
    if channels != num_channels(bn):
        return f"{side.name} has {channels} channels on that side, the BN {num_channels(bn)}"
    rank = facts.ranks.get(bn_name)
    if isinstance(layer, nn.Linear):
        if rank is None:
            return (
                f"{side.name} is a Linear: without example_inputs fold cannot tell whether the "
                f"BN input is (N, C) (foldable) or (N, C, L); pass example_inputs"
            )
        if rank != 2:
            return (
                f"the BN normalizes dim 1 of a {rank}-D tensor but {side.name} (Linear) mixes "
                f"its last dim"
            )
    elif rank is not None and rank != layer.weight.dim():
        return f"{side.name} runs on unbatched input (BN input is {rank}-D)"
    if position == "before":
        if isinstance(layer, CONV_TRANSPOSE):
            return (
                f"{side.name} is a {kind}: its border outputs receive fewer taps, so the BN "
                f"shift does not become a constant bias"
            )
        if isinstance(layer, CONV) and layer.padding_mode == "zeros":
            if any(layer._reversed_padding_repeated_twice):
                return (
                    f"{side.name} pads with zeros (padding={layer.padding}): the padded border "
                    f"would see 0 instead of the BN shift"
                )
    return ""


def _owns_shared(facts: _Facts, module: nn.Module) -> bool:
    return any(id(p) in facts.shared_params for p in module.parameters())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new.train(False))  # the folded copy is eval


# --------------------------------------------------------------------------- analyses


class _Tracer(fx.Tracer):
    """Keeps batch-norm layers (ours are not in torch.nn's namespace) and subclasses of the
    foldable layers leaves, so the report can name them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            is_batchnorm_like(m)
            or isinstance(m, LAYERS)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _fold_fx(facts: _Facts, graph: fx.Graph, report: FoldReport) -> None:
    modules = dict(facts.model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module"]
    facts.calls.update(n.target for n in calls)
    for n in graph.nodes:
        if n.op == "get_attr":
            facts.referenced.update(_prefixes(n.target))
    seen = set()
    for node in [n for n in calls if is_batchnorm_like(modules[n.target])]:
        if node.target in seen:
            continue  # a shared BN: reported once
        seen.add(node.target)
        if len(node.args) != 1 or node.kwargs:
            report.skipped.append(SkippedBN(node.target, "called with extra arguments"))
            continue
        source = node.args[0]
        result = _decide(facts, node.target, _before_fx(source), _after_fx(node))
        if isinstance(result, str):
            report.skipped.append(SkippedBN(node.target, result))
            continue
        report.folded.append(result)
        if result.kept is None:  # the BN is gone from the data flow: link its neighbours
            node.replace_all_uses_with(source)
            graph.erase_node(node)
    called = set(facts.calls)
    for name, m in facts.model.named_modules():
        if is_batchnorm_like(m) and name not in called and name not in seen:
            report.skipped.append(SkippedBN(name, "the traced forward never calls it"))


def _prefixes(target: str) -> Iterator[str]:
    parts = target.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts) + 1))


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)} ({node.op})"


def _before_fx(source: object) -> _Neighbour:
    if not isinstance(source, fx.Node) or source.op != "call_module":
        what = _describe(source) if isinstance(source, fx.Node) else repr(source)
        return _Neighbour(None, f"its input comes from {what}, not from a layer")
    if len(source.users) > 1:
        others = ", ".join(_describe(u) for u in source.users)
        return _Neighbour(None, f"the output of {source.target} is also used by: {others}")
    if len(source.args) != 1 or source.kwargs:
        return _Neighbour(None, f"{source.target} is called with extra arguments")
    return _Neighbour(str(source.target))


def _after_fx(node: fx.Node) -> _Neighbour:
    users = list(node.users)
    if len(users) != 1:
        used_by = ", ".join(_describe(u) for u in users) or "nothing"
        return _Neighbour(None, f"its output goes to {len(users)} places ({used_by})")
    user = users[0]
    if user.op != "call_module":
        return _Neighbour(None, f"its output goes to {_describe(user)}, not to a layer")
    if user.args != (node,) or user.kwargs:
        return _Neighbour(None, f"{user.target} is called with extra arguments")
    return _Neighbour(str(user.target))


def _fold_sequential(facts: _Facts, report: FoldReport) -> None:
    for name, _ in facts.model.named_modules(remove_duplicate=False):
        facts.calls[name] = max(facts.calls[name], 1)
    by_id = Counter(id(m) for _, m in facts.model.named_modules(remove_duplicate=False))
    for name, m in facts.model.named_modules():
        if by_id[id(m)] > 1:
            facts.calls[name] = max(facts.calls[name], by_id[id(m)])
    placed = set()
    for chain in _sequential_chains(facts.model):
        i = 0
        while i < len(chain):
            name, module = chain[i]
            if not is_batchnorm_like(module):
                i += 1
                continue
            placed.add(name)
            before = _neighbour_seq(chain, i - 1, "it is the first layer of its nn.Sequential")
            after = _neighbour_seq(chain, i + 1, "it is the last layer of its nn.Sequential")
            result = _decide(facts, name, before, after)
            if isinstance(result, str):
                report.skipped.append(SkippedBN(name, result))
            else:
                report.folded.append(result)
                if result.kept is None:
                    del chain[i]
                    continue
            i += 1
    for name, m in facts.model.named_modules():
        if is_batchnorm_like(m) and name not in placed:
            report.skipped.append(
                SkippedBN(name, "not inside an nn.Sequential, so its neighbours are unknown")
            )


def _neighbour_seq(chain: list[tuple[str, nn.Module]], j: int, none_why: str) -> _Neighbour:
    if not 0 <= j < len(chain):
        return _Neighbour(None, none_why)
    return _Neighbour(chain[j][0])


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _sequential_chains(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """The leaves of each outermost plain nn.Sequential in call order (nested plain
    Sequentials flattened: their children run back to back)."""
    chains: list[list[tuple[str, nn.Module]]] = []

    def flatten(prefix: str, seq: nn.Sequential, out: list[tuple[str, nn.Module]]) -> None:
        for child_name, child in seq.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if _is_plain_sequential(child):
                flatten(name, child, out)
            else:
                out.append((name, child))
                visit(name, child)

    def visit(prefix: str, module: nn.Module) -> None:
        if _is_plain_sequential(module):
            chain: list[tuple[str, nn.Module]] = []
            flatten(prefix, module, chain)
            chains.append(chain)
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    return chains


# --------------------------------------------------------------------------- entry point


def fold(
    model: nn.Module, example_inputs: Tensor | tuple | list | None = None
) -> tuple[nn.Module, FoldReport]:
    """Return ``(folded, report)``: an eval-mode copy of ``model`` in which every batch-norm
    layer that can be folded exactly into a neighbouring Linear/Conv/ConvTranspose is
    replaced by ``nn.Identity`` (its scale and shift now live in that layer's weight and
    bias), and a :class:`FoldReport` naming each BN layer folded or left in place and why.

    ``model`` is not modified. The folded model has the same class and structure, so it
    keeps its methods; its state_dict lacks the folded BN entries and may gain biases.

    ``example_inputs`` (a tensor or a tuple of positional arguments) are run once through
    a copy of the model to learn the rank of each BN input. Without them, BN next to a
    Linear is skipped (fold cannot tell an (N, C) input from an (N, C, L) one) and convs
    are assumed to run on batched inputs.

    A fused BN+activation module (``activation`` attribute not None) folds into a layer
    before it and leaves its activation as a module; it cannot fold into a layer after it.
    Data flow comes from ``torch.fx`` symbolic tracing; if tracing fails, fold falls back
    to neighbours inside ``nn.Sequential`` and the report says so.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: expected an nn.Module, got {type(model).__name__}.")
    args = _as_args(example_inputs)
    folded = copy.deepcopy(model).eval()
    owners = Counter(id(p) for _, p in folded.named_parameters(remove_duplicate=False))
    facts = _Facts(folded, Counter(), {}, {pid for pid, n in owners.items() if n > 1}, set())
    if args is not None:
        _observe(folded, args, facts)
    try:
        graph = _Tracer().trace(folded)
    except Exception as error:  # any tracing failure: fx raises many kinds
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        report = FoldReport("sequential", f"{type(error).__name__}: {message}"[:300])
        _fold_sequential(facts, report)
    else:
        report = FoldReport("fx")
        _fold_fx(facts, graph, report)
    return folded, report


def _as_args(example_inputs: object) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"fold: example_inputs must be a tensor or a tuple of the model's positional "
        f"arguments, got {type(example_inputs).__name__}."
    )


def _observe(model: nn.Module, args: tuple, facts: _Facts) -> None:
    """Run ``args`` through ``model`` once, recording each BN's input rank and how often
    every candidate module is called (a module called twice is shared)."""
    handles = []
    for name, m in model.named_modules():
        if is_batchnorm_like(m) or type(m) in LAYERS:

            def hook(module: nn.Module, inputs: tuple, name: str = name) -> None:
                facts.calls[name] += 1
                if inputs and isinstance(inputs[0], Tensor):
                    facts.ranks[name] = inputs[0].dim()

            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*args)
    except Exception as error:
        raise ValueError(
            f"fold: the model failed on example_inputs of shapes "
            f"{[tuple(a.shape) for a in args if isinstance(a, Tensor)]}: {error}. Hint: pass "
            f"inputs the model accepts, or example_inputs=None."
        ) from error
    finally:
        for h in handles:
            h.remove()
    # the fx pass counts call sites itself; keep the eager counts only where they show sharing
    for name in list(facts.calls):
        if facts.calls[name] <= 1:
            del facts.calls[name]
