"""Mode traps (BN in training mode inside an eval model, frozen weights whose statistics
still update, ``track_running_stats=False`` in eval, momentum 0/None/1 or outside [0, 1],
statistics never updated) and DDP without SyncBatchNorm."""

from __future__ import annotations

import math
import statistics

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn import flavour_of
from batchnorm.tools.audit.context import _channels, _class_expr, _Context, _rms
from batchnorm.tools.audit.findings import LayerAudit
from batchnorm.tools.audit.measure import _f64, _is_sync

# ------------------------------------------------------------------------- 3. mode traps


def check_modes(ctx: _Context, moved: dict[str, Tensor], before: dict[str, Tensor | None]) -> None:
    if ctx.model_training:
        ctx.add(
            "info",
            "model-in-training-mode",
            None,
            "the model was in training mode; the audit evaluates it in eval mode, as it "
            "runs at inference",
            f"{ctx.root}.eval()",
            {},
        )
    else:
        for name, training in ctx.found_training.items():
            m = ctx.layers[name]
            if not training or not isinstance(m, _BatchNorm):
                continue  # a frozen layer computes the same in either mode
            ctx.add(
                "error",
                "mixed-modes",
                name,
                f"{type(m).__name__} is in training mode inside a model in eval mode: it "
                f"normalizes every inference batch with its own statistics and updates its "
                f"running statistics at each call",
                f"{ctx.root}.eval()",
                {"training": True, "model_training": False},
            )
    trainable_elsewhere = any(p.requires_grad for p in ctx.model.parameters())
    for name, m in ctx.layers.items():
        if not isinstance(m, _BatchNorm):
            continue
        a = ctx.by_name[name]
        params = [p for p in (m.weight, m.bias) if p is not None]
        if (
            m.track_running_stats
            and params
            and not any(p.requires_grad for p in params)
            and trainable_elsewhere
            and name in moved
            and before[name] is not None
        ):
            var = _f64(m.running_var)
            drift = _rms((moved[name] - before[name]) / (var + m.eps).sqrt())
            ctx.add(
                "warning",
                "frozen-but-updating",
                name,
                f"its weight and bias are frozen (requires_grad=False) while the rest of "
                f"the model trains, but in training mode it still normalizes with batch "
                f"statistics and updates its running statistics: one training-mode pass "
                f"over the {len(ctx.batches)} batches moved running_mean by {drift:.3g} "
                f"std (rms over channels)",
                f"{ctx.root}, _ = batchnorm.freeze({ctx.root})",
                {"running_mean_drift_rms": drift, "batches": len(ctx.batches)},
            )
        if not m.track_running_stats or m.running_mean is None:
            noise = a.noise_mean
            measured = (
                f"; measured: the batch mean wanders by {noise:.3g} std between batches of "
                f"{a.values_per_batch} values"
                if noise is not None
                else ""
            )
            ctx.add(
                "warning",
                "batch-statistics-in-eval",
                name,
                f"track_running_stats=False: in eval mode too it normalizes each batch with "
                f"that batch's statistics, so an output depends on the other samples of its "
                f"batch (and a batch of one sample cannot be normalized){measured}",
                _tracking_fix(ctx, name, m),
                {"noise_mean": noise, "values_per_batch": a.values_per_batch},
            )
            continue
        _check_momentum(ctx, name, m, a)


def _tracking_fix(ctx: _Context, name: str, m: nn.Module) -> str:
    expr = ctx.expr(name)
    kind = flavour_of(m)
    if kind is None or kind[0] not in ("torch", "batchnorm"):
        return (
            f"# rebuild {expr} with track_running_stats=True, then "
            f"batchnorm.recalibrate({ctx.root}, loader)"
        )
    options = "" if m.affine else ", affine=False"
    options += "" if m.eps == 1e-5 else f", eps={m.eps!r}"
    return (
        f"new = {_class_expr(type(m))}({m.num_features}{options}).train({expr}.training); "
        f"new.load_state_dict({expr}.state_dict(), strict=False); {expr} = new; "
        f"batchnorm.recalibrate({ctx.root}, loader)"
    )


def _check_momentum(ctx: _Context, name: str, m: _BatchNorm, a: LayerAudit) -> None:
    expr, momentum = ctx.expr(name), m.momentum
    nbt = getattr(m, "num_batches_tracked", None)
    tracked = None if nbt is None else int(nbt)
    at_init = bool(
        (m.running_mean == 0).all() and (m.running_var == 1).all()
    )  # reset_running_stats()
    if tracked == 0 and at_init:
        ctx.never_updated.add(name)
        measured = (
            f" (measured: running_mean off by {a.gap_rms:.2f} std, running_var by a factor "
            f"x/÷{math.exp(a.log_var_ratio_rms):.3g}, rms over channels)"
            if a.gap_rms is not None and a.log_var_ratio_rms is not None
            else ""
        )
        ctx.add(
            "error",
            "never-updated",
            name,
            "num_batches_tracked is 0 and the running statistics are still mean 0, "
            f"variance 1: the layer never saw a training batch, so in eval mode it does "
            f"not normalize at all{measured}",
            f"batchnorm.recalibrate({ctx.root}, loader)",
            {"num_batches_tracked": 0},
        )
    elif tracked == 0 and momentum is None:
        ctx.add(
            "info",
            "never-updated",
            name,
            "momentum=None and num_batches_tracked is 0: the next training batch replaces "
            "the running statistics (the cumulative average restarts)",
            f"{expr}.momentum = 0.1  # an exponential average starts from the current ones",
            {"num_batches_tracked": 0},
        )
    if momentum is None:
        if tracked:
            ctx.add(
                "info",
                "momentum",
                name,
                f"momentum=None: the running statistics are the plain average of all "
                f"{tracked} training batches since the start, early ones (taken with "
                f"long-gone weights) weighing as much as the last",
                f"{expr}.momentum = 0.1",
                {"momentum": None, "num_batches_tracked": tracked},
            )
    elif not 0.0 <= momentum <= 1.0 or math.isnan(momentum):
        ctx.add(
            "error",
            "momentum",
            name,
            f"momentum={momentum!r} is outside [0, 1]: the running average diverges",
            f"{expr}.momentum = 0.1",
            {"momentum": momentum},
        )
    elif momentum == 0.0:
        ctx.add(
            "warning",
            "momentum",
            name,
            "momentum=0: training never updates the running statistics, so eval mode uses "
            "whatever they were set to",
            f"{expr}.momentum = 0.1",
            {"momentum": 0.0},
        )
    elif momentum == 1.0:
        ctx.add(
            "warning",
            "momentum",
            name,
            "momentum=1: the running statistics are those of the last training batch "
            "alone, with all its noise",
            f"{expr}.momentum = 0.1",
            {"momentum": 1.0},
        )


# ------------------------------------------------------------------------- 6. DDP


def check_ddp(ctx: _Context, wrapped: bool) -> None:
    if ctx.world <= 1 and not wrapped:
        return
    plain = [n for n, m in ctx.layers.items() if isinstance(m, _BatchNorm) and not _is_sync(m)]
    if not plain:
        return
    noisy = [n for n in plain if ctx.noisy.get(n) in ("warning", "error")]
    n = statistics.median(b.size for b in ctx.batches)
    if noisy:
        severity = "error" if any(ctx.noisy[x] == "error" for x in noisy) else "warning"
        message = (
            f"{ctx.world} processes, each normalizing with its own batch of {n:g} "
            f"samples: {len(noisy)} of {len(plain)} batch-norm layers get noisy statistics "
            f"({_channels(noisy, 6)}); SyncBatchNorm normalizes over the "
            f"{ctx.world * n:g} samples of all processes (one all_reduce of 2C+3 values "
            f"per layer)"
        )
    else:
        severity = "info"
        message = (
            f"{ctx.world} processes without SyncBatchNorm: each of the {len(plain)} "
            f"batch-norm layers normalizes with its own batch of {n:g} samples, which is "
            f"enough here"
        )
    ctx.add(
        severity,
        "ddp-without-sync-batch-norm",
        None,
        message,
        f"{ctx.root} = batchnorm.convert_sync_batchnorm({ctx.root})  # before wrapping in DDP",
        {"world_size": ctx.world, "samples_per_process": n, "noisy_layers": noisy},
    )
