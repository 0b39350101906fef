"""Numerical hazards: NaN/Inf/negative ``running_var`` (or 0 where the input varies),
``eps`` lost in float16/bfloat16, dead channels (``|weight| ≈ 0``) and channels whose input
never varies."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from batchnorm.tools.audit.context import _channels, _Context
from batchnorm.tools.audit.measure import _f64
from batchnorm.tools.audit.thresholds import CONSTANT_SHARE_WARNING, DEAD_WEIGHT, MIN_EPS, SAFE_EPS


def check_numerics(ctx: _Context) -> None:
    for name, m in ctx.layers.items():
        _check_running_values(ctx, name, m)
        _check_eps(ctx, name, m)
        _check_dead(ctx, name, m)
        _check_constant(ctx, name, m)


def _check_running_values(ctx: _Context, name: str, m: nn.Module) -> None:
    rm, rv = _f64(getattr(m, "running_mean", None)), _f64(getattr(m, "running_var", None))
    constant = ctx.constant.get(name)
    if rm is not None and rv is not None:
        nonfinite = (~rm.isfinite() | ~rv.isfinite()).nonzero().flatten().tolist()
        negative = (rv < 0).nonzero().flatten().tolist()
        zero = rv == 0
        if constant is not None:
            zero = zero & ~constant  # 0 is right for a channel whose input is constant
        zero_idx = zero.nonzero().flatten().tolist()
        bad = sorted(set(nonfinite) | set(negative) | set(zero_idx))
        if bad:
            parts = []
            if nonfinite:
                parts.append(f"NaN/Inf in channel(s) {_channels(nonfinite)}")
            if negative:
                parts.append(f"running_var < 0 in channel(s) {_channels(negative)}")
            if zero_idx:
                parts.append(
                    f"running_var = 0 in channel(s) {_channels(zero_idx)} whose input "
                    f"varies (they are divided by sqrt(eps) = {math.sqrt(m.eps):.3g})"
                )
            ctx.add(
                "error",
                "invalid-running-statistics",
                name,
                "; ".join(parts) + ": eval outputs of these channels are NaN, Inf or blown up",
                f"batchnorm.recalibrate({ctx.root}, loader)",
                {"nonfinite": nonfinite, "negative": negative, "zero": zero_idx},
            )


def _check_eps(ctx: _Context, name: str, m: nn.Module) -> None:
    expr, rv = ctx.expr(name), getattr(m, "running_var", None)
    dtype = None
    for t in (getattr(m, "running_var", None), getattr(m, "weight", None)):
        if isinstance(t, Tensor):
            dtype = t.dtype
            break
    if dtype is None:
        dtype = ctx.stats[name].dtype
    if dtype in MIN_EPS and m.eps < MIN_EPS[dtype]:
        bits = torch.finfo(dtype)
        lost = None
        if rv is not None:
            low = m.running_var.detach().cpu()
            lost = int(((low + torch.tensor(m.eps, dtype=dtype)) == low).sum())
        subnormal = m.eps < bits.tiny
        kind = str(dtype).removeprefix("torch.")
        where = (
            f"; running_var + eps == running_var in {kind} for {lost} of {low.numel()} channels"
            if lost is not None
            else ""
        )
        ctx.add(
            "warning",
            "eps-too-small",
            name,
            f"eps={m.eps:g} in a {kind} layer is below half "
            f"a unit in the last place of 1 ({MIN_EPS[dtype]:.2g})"
            + (f" and below its smallest normal number ({bits.tiny:.2g})" if subnormal else "")
            + f": it is rounded away in var + eps unless the variance is tiny{where}, "
            f"so it no longer bounds 1/sqrt(var + eps)",
            f"{expr}.eps = {SAFE_EPS[dtype]:g}",
            {"eps": m.eps, "dtype": str(dtype), "channels_eps_lost": lost},
        )


def _check_dead(ctx: _Context, name: str, m: nn.Module) -> None:
    expr = ctx.expr(name)
    weight = getattr(m, "weight", None)
    if isinstance(weight, Tensor) and weight.numel():
        w = _f64(weight).abs()
        median = float(w.median())
        dead = (w <= DEAD_WEIGHT * median) if median > 0 else (w == 0)
        dead_idx = dead.nonzero().flatten().tolist()
        if dead_idx:
            every = len(dead_idx) == w.numel()
            fix = (
                f"with torch.no_grad(): {expr}.weight.fill_(1.0)  # re-initialize, then fine-tune"
                if every
                else f"with torch.no_grad(): w = {expr}.weight; w[w.abs() <= {DEAD_WEIGHT:g}"
                f" * w.abs().median()] = {median:.3g}  # revive, then fine-tune; or prune them"
            )
            ctx.add(
                "error" if every else "warning",
                "dead-channels",
                name,
                f"{len(dead_idx)} of {w.numel()} channels have |weight| <= "
                f"{DEAD_WEIGHT:g} x the median |weight| ({median:.3g}): max "
                f"{float(w[dead].max()):.3g}; they output their bias, a constant, "
                f"whatever the input (channels {_channels(dead_idx)})",
                fix,
                {"dead": dead_idx, "median_abs_weight": median},
            )


def _check_constant(ctx: _Context, name: str, m: nn.Module) -> None:
    constant = ctx.constant.get(name)
    if constant is not None and constant.any():
        idx = constant.nonzero().flatten().tolist()
        share = len(idx) / constant.numel()
        var = ctx.by_name[name].var or []
        ctx.add(
            "warning" if share > CONSTANT_SHARE_WARNING else "info",
            "constant-input",
            name,
            f"{len(idx)} of {constant.numel()} channels receive an (almost) constant "
            f"input: variance <= eps ({m.eps:g}), max {max(var[i] for i in idx):.3g}; "
            f"they carry no information (dead ReLU units or zero weights before the "
            f"layer?) and any later change is scaled up by up to "
            f"1/sqrt(eps) = {1 / math.sqrt(m.eps):.0f} (channels {_channels(idx)})",
            f"keep = {ctx.expr(name)}.running_var > {ctx.expr(name)}.eps  # after "
            f"recalibrate: prune the others here and in the layer before",
            {"channels": idx, "share": share},
        )
