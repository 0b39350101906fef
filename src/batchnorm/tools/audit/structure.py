"""Wasted parameters and speed: biases that the batch norm after them cancels, the layers
:func:`batchnorm.fold` removes (with the eval speed-up measured) and the BN + activation
pairs that ``BatchNormAct`` fuses."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn import flavour_of
from batchnorm.tools.audit.context import _channels, _Context
from batchnorm.tools.audit.graph import _Neighbours, _neighbours
from batchnorm.tools.audit.measure import _Batch, _f64, _to
from batchnorm.tools.audit.thresholds import TIMING_MIN_SECONDS, TIMING_REPEATS
from batchnorm.tools.fold import fold

# ------------------------------------------------------------------------- 4. waste and speed


def check_wasted(ctx: _Context, model: nn.Module) -> None:
    """Biases before BN and BN + activation pairs, from the data flow of ``model`` (a
    copy of the audited one, whose module names it shares)."""
    neighbours, method = _neighbours(model)
    for name, n in neighbours.items():
        m = ctx.layers[name]
        before = None if n.before is None else ctx.model.get_submodule(n.before)
        if (
            before is not None
            and isinstance(m, _BatchNorm)
            and getattr(before, "bias", None) is not None
            and (not isinstance(before, nn.Linear) or ctx.stats[name].rank == 2)
        ):
            bias = _f64(before.bias)
            layer_expr, bn_expr = ctx.expr(n.before), ctx.expr(name)
            definition = _definition_without_bias(before)
            if m.running_mean is not None:
                fix = (
                    f"with torch.no_grad(): {bn_expr}.running_mean -= {layer_expr}.bias; "
                    f"{layer_expr}.bias = None  # same outputs; in the definition: "
                    f"{definition}"
                )
            else:
                fix = f"{layer_expr}.bias = None  # in the definition: {definition}"
            ctx.add(
                "info",
                "bias-before-batch-norm",
                name,
                f"{n.before} ({type(before).__name__}) has a bias of {bias.numel()} "
                f"parameters (max |bias| {float(bias.abs().max()):.3g}) that this BN "
                f"cancels: it subtracts the batch mean, bias included, and adds its own "
                f"shift",
                fix,
                {"layer": n.before, "parameters": bias.numel(), "graph": method},
            )
        kind = flavour_of(m)
        fused = getattr(m, "activation", None) not in (None, "identity")
        if n.activation and kind is not None and not fused:
            family, dims = kind
            if family in ("torch", "batchnorm", "frozen") and dims is not None:
                _fusable(ctx, name, m, n, family, dims)


def _fusable(
    ctx: _Context, name: str, m: nn.Module, n: _Neighbours, family: str, dims: int
) -> None:
    frozen = family == "frozen"
    cls = f"batchnorm.{'FrozenBatchNorm' if frozen else 'BatchNormAct'}{dims}d"
    options = f', activation="{n.activation}"'
    if n.activation == "leaky_relu":
        options += f", negative_slope={n.negative_slope!r}"
    if m.eps != 1e-5:
        options += f", eps={m.eps!r}"
    if family != "frozen":
        if m.momentum != 0.1:
            options += f", momentum={m.momentum!r}"
        if not m.affine:
            options += ", affine=False"
        elif m.bias is None:
            options += ", bias=False"
    expr = ctx.expr(name)
    after = (
        f"{ctx.expr(n.activation_module)} = nn.Identity()"
        if n.activation_module and not n.residual
        else f"# and drop {n.activation_at}"
        + (" (pass the shortcut as the BN's residual argument)" if n.residual else "")
    )
    what = "the addition and " if n.residual else ""
    ctx.add(
        "info",
        "fusable-activation",
        name,
        f"{type(m).__name__} is followed by {what}{n.activation} ({n.activation_at}): "
        f"{cls.removeprefix('batchnorm.')} computes both in one pass over the data"
        + (", residual included" if n.residual else ""),
        f"new = {cls}({m.num_features}{options}).train({expr}.training); "
        f"new.load_state_dict({expr}.state_dict()); "
        f"{expr} = new; {after}",
        {"activation": n.activation, "residual": n.residual},
    )


def measure_fold(ctx: _Context, work: nn.Module, device: torch.device, timing: bool) -> None:
    example = _to(ctx.batches[0].inputs, device)
    work.eval()
    try:
        folded, report = fold(work, example_inputs=example)
    except Exception as error:  # fold found the model unfoldable: say so, go on
        ctx.add(
            "info",
            "foldable",
            None,
            f"batchnorm.fold failed on this model ({type(error).__name__}: {error})",
            "",
            {},
        )
        return
    if not report.folded:
        return
    names = [f.name for f in report.folded]
    evidence: dict[str, Any] = {
        "folded": names,
        "skipped": {s.name: s.reason for s in report.skipped},
        "method": report.method,
    }
    measured = ""
    if timing:
        ctx.timing = _time_pair(work, folded, ctx.batches[0], device)
        t = ctx.timing
        evidence.update(t)
        measured = (
            f"; measured: {t['model_ms']:.3g} ms -> {t['folded_ms']:.3g} ms per batch of "
            f"{ctx.batches[0].size} in eval mode ({t['speedup']:.2f}x, best of "
            f"{t['repeats']} runs of {t['calls']} calls)"
        )
    total = len(report.folded) + len(report.skipped)
    ctx.add(
        "info",
        "foldable",
        None,
        f"batchnorm.fold removes {len(names)} of {total} batch-norm layers for inference "
        f"({_channels(names, 6)}){measured}",
        f"folded, report = batchnorm.fold({ctx.root}, example_inputs=x)",
        evidence,
    )


def _definition_without_bias(layer: nn.Module) -> str:
    text = layer.extra_repr()
    if "bias=True" in text:
        text = text.replace("bias=True", "bias=False")
    else:
        text += ", bias=False"
    return f"nn.{type(layer).__name__}({text})"


def _time_pair(
    model: nn.Module, folded: nn.Module, batch: _Batch, device: torch.device
) -> dict[str, Any]:
    """Milliseconds per call of ``model`` and ``folded`` on one batch, in eval mode: the best
    of TIMING_REPEATS runs of ``calls`` calls each, the two timed in alternation."""
    x = _to(batch.inputs, device)
    args = x if isinstance(x, tuple) else (x,)
    model.eval()
    folded.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(m: nn.Module, calls: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            m(*args)
        sync()
        return time.perf_counter() - start

    with torch.no_grad():
        run(model, 1)
        run(folded, 1)
        once = max(min(run(model, 1) for _ in range(3)), 1e-7)
        calls = max(1, min(1000, math.ceil(TIMING_MIN_SECONDS / once)))
        times: dict[str, list[float]] = {"model": [], "folded": []}
        for _ in range(TIMING_REPEATS):
            times["model"].append(run(model, calls) / calls)
            times["folded"].append(run(folded, calls) / calls)
    # The fastest run: the machine's other work only ever adds time (as timeit advises).
    t_model, t_folded = min(times["model"]), min(times["folded"])
    return {
        "model_ms": t_model * 1e3,
        "folded_ms": t_folded * 1e3,
        "speedup": t_model / max(t_folded, 1e-12),
        "repeats": TIMING_REPEATS,
        "calls": calls,
        "batch_size": batch.size,
        "device": str(device),
    }
