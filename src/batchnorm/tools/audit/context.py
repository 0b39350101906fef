"""What the checks share: the per-layer measurements (:class:`LayerAudit`, with the noise
of batch statistics), the findings they add, and the helpers that write a fix line."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.nn import flavour_of
from batchnorm.tools.audit.findings import Finding, LayerAudit
from batchnorm.tools.audit.measure import _Batch, _f64, _LayerStats
from batchnorm.tools.audit.thresholds import MIN_NOISE_BATCHES, WORST_CHANNELS

# ------------------------------------------------------------------------- fix lines


def _expr(name: str, root: str = "model") -> str:
    """Python that reaches module ``name`` from ``root``: model.blocks[0].bn1."""
    if not name:
        return root
    text = root
    for part in name.split("."):
        text += f"[{part}]" if part.isdigit() else f".{part}" if part.isidentifier() else ""
    if not all(p.isdigit() or p.isidentifier() for p in name.split(".")):
        return f'{root}.get_submodule("{name}")'
    return text


def _class_expr(cls: type) -> str:
    kind = flavour_of(cls)
    if kind is not None and kind[0] == "torch":
        return f"nn.{cls.__name__}"
    if cls.__module__.startswith("batchnorm."):
        return f"batchnorm.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _worst(values: Tensor, k: int = WORST_CHANNELS) -> list[int]:
    """Indices of the ``k`` largest finite values."""
    finite = torch.where(values.isfinite(), values, torch.full_like(values, -math.inf))
    order = torch.argsort(finite, descending=True)[:k]
    return [int(i) for i in order if math.isfinite(float(finite[i]))]


def _channels(indices: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def _rms(t: Tensor) -> float:
    return float(t.square().mean().sqrt()) if t.numel() else 0.0


class _Context:
    """The measurements shared by the checks, and the findings they add."""

    def __init__(
        self,
        model: nn.Module,
        root: str,
        layers: dict[str, nn.Module],
        stats: dict[str, _LayerStats],
        found_training: dict[str, bool],
        model_training: bool,
        world: int,
        batches: list[_Batch],
    ) -> None:
        self.model, self.root, self.layers, self.stats = model, root, layers, stats
        self.found_training, self.model_training = found_training, model_training
        self.world, self.batches = world, batches
        self.findings: list[Finding] = []
        self.audits: list[LayerAudit] = []
        self.by_name: dict[str, LayerAudit] = {}
        self.metric: dict[str, Any] | None = None
        self.timing: dict[str, Any] | None = None
        self.constant: dict[str, Tensor] = {}  # channels with (almost) constant input
        self.noisy: dict[str, str] = {}  # layer -> severity of its noise finding
        self.never_updated: set[str] = set()  # reported as such, not again as stale

    def add(
        self, severity: str, check: str, layer: str | None, message: str, fix: str, evidence: dict
    ) -> None:
        self.findings.append(Finding(severity, check, layer, message, fix, evidence))

    def expr(self, name: str) -> str:
        return _expr(name, self.root)

    # --------------------------------------------------------------- measurements

    def build_layer_audits(self) -> None:
        for name, m in self.layers.items():
            s = self.stats[name]
            rm, rv = _f64(getattr(m, "running_mean", None)), _f64(getattr(m, "running_var", None))
            tensor = rv if rv is not None else _f64(getattr(m, "weight", None))
            dtype = m.running_var.dtype if rv is not None else s.dtype
            channels = int(getattr(m, "num_features", 0) or (0 if tensor is None else len(tensor)))
            layer = LayerAudit(
                name=name,
                kind=type(m).__name__,
                channels=channels,
                dtype=str(dtype).removeprefix("torch.") if dtype is not None else "unknown",
                eps=float(m.eps),
                momentum=getattr(m, "momentum", None),
                training=self.found_training[name],
                tracks_running_stats=rm is not None and rv is not None,
                batches=len(s.values),
                values_per_batch=int(statistics.median(s.values)) if s.values else None,
            )
            if rm is not None and rv is not None:
                layer.running_mean, layer.running_var = rm.tolist(), rv.tolist()
            pop = s.population()
            if pop is not None:
                mean, var = pop
                layer.mean, layer.var = mean.tolist(), var.tolist()
                self.constant[name] = var <= m.eps
                if rm is not None and rv is not None and rm.shape == mean.shape:
                    gap = (rm - mean).abs() / (var + m.eps).sqrt()
                    ratio = ((rv + m.eps) / (var + m.eps)).log()
                    layer.gap, layer.log_var_ratio = gap.tolist(), ratio.tolist()
                    keep = ~self.constant[name]
                    layer.gap_rms = _rms(gap[keep])
                    layer.log_var_ratio_rms = _rms(ratio[keep])
                self._measure_noise(layer, m, s, mean, var)
            self.audits.append(layer)
            self.by_name[name] = layer

    def _measure_noise(
        self, layer: LayerAudit, m: nn.Module, s: _LayerStats, mean: Tensor, var: Tensor
    ) -> None:
        if len(s.batch_means) < MIN_NOISE_BATCHES:
            return
        keep = var > m.eps
        if not keep.any():
            return
        scale = (var + m.eps)[keep]
        means = torch.stack(s.batch_means)[:, keep]
        variances = torch.stack(s.batch_vars)[:, keep]
        z = (means - mean[keep]).square() / scale
        # Finite-population correction: batches drawn from these M values without
        # replacement spread by sqrt((M - m) / (M - 1)) less than from an infinite one.
        m_values = float(statistics.median(s.values))
        total = float(s.count)
        shrink = max((total - m_values) / max(total - 1, 1.0), 1e-12)
        layer.noise_mean = math.sqrt(float(z.mean()) / shrink)
        log_ratio = ((variances + m.eps) / scale).log()
        layer.noise_var = math.sqrt(float(log_ratio.square().mean()) / shrink)
        layer.effective_values = 1.0 / max(layer.noise_mean**2, 1e-12)
