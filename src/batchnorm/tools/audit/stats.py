"""Stale running statistics (against the exact statistics of the data, and the metric with
recalibrated ones, measured on a copy) and noisy batch statistics (how far each batch's mean
and variance wander from the population's)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn import dims_of
from batchnorm.tools.audit.context import _channels, _Context, _worst
from batchnorm.tools.audit.measure import _is_ghost, _is_renorm, _is_sync, _metric, _to
from batchnorm.tools.audit.thresholds import (
    GAIN_ERROR,
    GAIN_WARNING,
    GHOST_BATCH_SIZE,
    MIN_NOISE_BATCHES,
    NOISY_VALUES_ERROR,
    NOISY_VALUES_WARNING,
    STALE_GAP_ERROR,
    STALE_GAP_WARNING,
    STALE_LOG_VAR_ERROR,
    STALE_LOG_VAR_WARNING,
)
from batchnorm.tools.recalibrate import recalibrate

# ------------------------------------------------------------------------- 1. stale statistics


def measure_recalibration(
    ctx: _Context, work: nn.Module, device: torch.device, loss_fn: Callable | None
) -> None:
    work.eval()
    before = _metric(work, ctx.batches, device, loss_fn)
    if before is None:
        return
    if not any(
        isinstance(m, _BatchNorm) and m.running_mean is not None for m in ctx.layers.values()
    ):
        ctx.add(
            "info",
            "recalibration-gain",
            None,
            f"eval {before[0]} {before[1]:.4f}; recalibrate updates no layer of this model "
            f"(frozen, or without running statistics)",
            "",
            {"running": before[1]},
        )
        return
    inputs = (_to(b.inputs, device) for b in ctx.batches)
    try:
        recalibrate(work, inputs, progress=False)
        work.eval()
        after = _metric(work, ctx.batches, device, loss_fn)
    except Exception as error:  # e.g. a model of several inputs, which recalibrate
        ctx.add(  # cannot feed: report the metric without the comparison
            "info",
            "recalibration-gain",
            None,
            f"batchnorm.recalibrate failed on a copy of the model ({type(error).__name__}: "
            f"{error}); the gain from recalibrating was not measured",
            "",
            {"running": before[1]},
        )
        return
    assert after is not None
    name, running = before
    recalibrated = after[1]
    gain = recalibrated - running if name == "accuracy" else running - recalibrated
    relative = gain / abs(running) if name == "loss" and running else gain
    ctx.metric = {
        "name": name,
        "running": running,
        "recalibrated": recalibrated,
        "gain": gain,
        "relative_gain": relative,
        "samples": sum(b.size for b in ctx.batches if b.labels is not None),
    }


def check_stale(ctx: _Context) -> None:
    gain = None if ctx.metric is None else ctx.metric["relative_gain"]
    flagged = []
    for name, m in ctx.layers.items():
        a = ctx.by_name[name]
        if a.gap is None or a.gap_rms is None or name in ctx.never_updated:
            continue
        gap, ratio = torch.tensor(a.gap), torch.tensor(a.log_var_ratio)
        keep = ~ctx.constant[name]
        gap = torch.where(keep, gap, torch.zeros_like(gap))
        ratio = torch.where(keep, ratio, torch.zeros_like(ratio))
        if a.gap_rms >= STALE_GAP_ERROR or a.log_var_ratio_rms >= STALE_LOG_VAR_ERROR:
            severity = "error"
        elif a.gap_rms >= STALE_GAP_WARNING or a.log_var_ratio_rms >= STALE_LOG_VAR_WARNING:
            severity = "warning"
        else:
            continue
        recalibrates = isinstance(m, _BatchNorm)
        if gain is not None and gain < GAIN_WARNING and recalibrates:
            severity = "info"  # measured: it does not matter for the metric
        worst_gap = _worst(gap)
        worst_ratio = _worst(ratio.abs())
        ratios = ", ".join(f"channel {i}: x{math.exp(float(ratio[i])):.3g}" for i in worst_ratio)
        gaps = ", ".join(f"channel {i}: {float(gap[i]):.2f}" for i in worst_gap)
        fix = (
            f"batchnorm.recalibrate({ctx.root}, loader)"
            if recalibrates
            else f"{ctx.root} = batchnorm.unfreeze({ctx.root})[0]; "
            f"batchnorm.recalibrate({ctx.root}, loader); "
            f"{ctx.root}, _ = batchnorm.freeze({ctx.root})"
        )
        cause = ""
        if isinstance(m, _BatchNorm) and m.momentum is None:
            cause = "; momentum=None (a plain average since the start) is a likely cause"
        ctx.add(
            severity,
            "stale-statistics",
            name,
            f"running statistics differ from the data's: running_mean is off by "
            f"{a.gap_rms:.2f} std (rms over channels; worst {gaps}) and running_var by a "
            f"factor x/÷{math.exp(a.log_var_ratio_rms):.3g} (rms; worst {ratios}){cause}",
            fix,
            {
                "gap_rms": a.gap_rms,
                "log_var_ratio_rms": a.log_var_ratio_rms,
                "worst_gap_channels": worst_gap,
                "worst_var_channels": worst_ratio,
            },
        )
        flagged.append(name)
    if ctx.metric is None:
        if not any(b.labels is not None for b in ctx.batches):
            ctx.add(
                "info",
                "recalibration-gain",
                None,
                "no labels: the metric with recalibrated statistics was not measured",
                "batchnorm.audit(model, x, labels=y)  # or batches of (inputs, labels)",
                {},
            )
        return
    metric = ctx.metric
    name = metric["name"]
    if gain >= GAIN_ERROR:
        severity = "error"
    elif gain >= GAIN_WARNING:
        severity = "warning"
    else:
        severity = "info"
    change = (
        f"{metric['gain'] * 100:+.2f} points"
        if name == "accuracy"
        else f"{-metric['gain']:+.4g} ({-metric['relative_gain'] * 100:+.1f} %)"
    )
    where = f"; stale: {_channels(flagged, 6)}" if flagged else ""
    ctx.add(
        severity,
        "recalibration-gain",
        None,
        f"eval {name} with the running statistics {metric['running']:.4f}, with "
        f"statistics recalibrated on these {metric['samples']} samples "
        f"{metric['recalibrated']:.4f}: {change}{where}",
        f"batchnorm.recalibrate({ctx.root}, loader)",
        dict(metric),
    )


# ------------------------------------------------------------------------- 2. noise


def check_noise(ctx: _Context) -> None:
    for name, m in ctx.layers.items():
        a = ctx.by_name[name]
        if not isinstance(m, _BatchNorm):
            continue  # frozen: never normalizes with batch statistics
        samples = ctx.stats[name].samples
        n = int(statistics.median(samples)) if samples else 0
        if a.effective_values is None:
            if ctx.stats[name].values and len(ctx.stats[name].values) < MIN_NOISE_BATCHES:
                ctx.add(
                    "info",
                    "noisy-batch-statistics",
                    name,
                    f"only {len(ctx.stats[name].values)} batch(es): at least "
                    f"{MIN_NOISE_BATCHES} are needed to measure the noise of batch "
                    f"statistics",
                    "batchnorm.audit(model, loader, num_batches=None)  # more batches",
                    {"batches": len(ctx.stats[name].values)},
                )
            continue
        sync = _is_sync(m) and ctx.world > 1
        m_eff = a.effective_values * (ctx.world if sync else 1)
        evidence = {
            "values_per_batch": a.values_per_batch,
            "samples_per_batch": n,
            "noise_mean": a.noise_mean,
            "noise_var": a.noise_var,
            "effective_values": m_eff,
            "threshold": NOISY_VALUES_WARNING,
        }
        if m_eff < NOISY_VALUES_WARNING:
            severity = "error" if m_eff < NOISY_VALUES_ERROR else "warning"
            if _is_ghost(m) or _is_renorm(m):
                severity = "info"
            correlated = (
                f" (values within a batch are correlated: {a.values_per_batch} values count "
                f"as {m_eff:.0f})"
                if a.values_per_batch and m_eff < 0.5 * a.values_per_batch
                else ""
            )
            message = (
                f"batches of {n} samples give {a.values_per_batch} values per channel"
                f"{' (virtual batches of Ghost BN)' if _is_ghost(m) else ''}: measured, the "
                f"batch mean wanders by {a.noise_mean:.3g} std and the batch variance by a "
                f"factor x/÷{math.exp(a.noise_var):.3g} (rms) around the population's, as from "
                f"{m_eff:.0f} independent values{correlated}, fewer than "
                f"{NOISY_VALUES_WARNING} (noise above {NOISY_VALUES_WARNING**-0.5:.2f} std)"
            )
            if _is_ghost(m):
                message += "; Ghost BN adds this noise on purpose"
            elif _is_renorm(m):
                message += "; Batch Renorm corrects it towards the running statistics"
            elif ctx.world > 1 and not _is_sync(m):
                message += (
                    f"; under DDP with {ctx.world} processes, SyncBatchNorm normalizes "
                    f"over all {ctx.world * n} samples"
                )
            else:
                dims = dims_of(m) or 2
                message += (
                    f"; if you train with batches this small: freeze BN when fine-tuning "
                    f"(running statistics of the pretrained model, no batch noise), or "
                    f"train with batchnorm.BatchRenorm{dims}d (Ioffe 2017: corrects batch "
                    f"statistics towards the running ones), or use larger batches"
                )
            fix = (
                f"{ctx.root} = batchnorm.convert_sync_batchnorm({ctx.root})"
                if ctx.world > 1 and not _is_sync(m)
                else f"{ctx.root}, _ = batchnorm.freeze({ctx.root})"
            )
            if _is_ghost(m):
                fix = f"{ctx.expr(name)}.virtual_batch_size = {max(n, 1) * 4}  # if too noisy"
            ctx.noisy[name] = severity
            ctx.add(severity, "noisy-batch-statistics", name, message, fix, evidence)
        elif n >= GHOST_BATCH_SIZE and not _is_ghost(m):
            dims = dims_of(m) or 2
            ctx.add(
                "info",
                "noisy-batch-statistics",
                name,
                f"batches of {n} samples: batch statistics are almost noiseless (the "
                f"batch mean wanders by {a.noise_mean:.2g} std); large-batch training loses "
                f"the regularizing noise of small batches, which Ghost BN restores "
                f"(Hoffer et al. 2017)",
                f"new = batchnorm.GhostBatchNorm{dims}d({a.channels}, virtual_batch_size="
                f"128).train({ctx.expr(name)}.training); new.load_state_dict("
                f"{ctx.expr(name)}.state_dict()); {ctx.expr(name)} = new",
                evidence,
            )
