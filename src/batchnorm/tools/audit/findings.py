"""What the audit reports: a :class:`Finding` per problem, a :class:`LayerAudit` per
batch-norm layer, and the :class:`AuditReport` holding them (shown by
:mod:`~batchnorm.tools.audit.output`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from batchnorm._html import json_ready
from batchnorm.tools.audit.output import (
    print_table,
    render_text,
    write_html,
    write_json,
)
from batchnorm.tools.audit.thresholds import SEVERITIES


@dataclass(frozen=True)
class Finding:
    """One problem (or fact) found: its ``severity`` ("error", "warning", "info"), the
    ``check`` that found it, the ``layer`` (module name; None for the whole model), a
    ``message`` with the measured evidence, the ``fix`` as a line of code (the model is
    called ``model``, the data ``loader``) and the ``evidence`` as numbers."""

    severity: str
    check: str
    layer: str | None
    message: str
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerAudit:
    """What the audit measured at one batch-norm layer. Per-channel lists are None where
    the layer has no such statistics (``track_running_stats=False``, no data)."""

    name: str
    kind: str
    channels: int
    dtype: str
    eps: float
    momentum: float | None
    training: bool
    tracks_running_stats: bool
    batches: int = 0
    values_per_batch: int | None = None
    running_mean: list[float] | None = None
    running_var: list[float] | None = None
    mean: list[float] | None = None
    var: list[float] | None = None
    #: |running_mean - mean| / sqrt(var + eps) and log((running_var + eps) / (var + eps)).
    gap: list[float] | None = None
    log_var_ratio: list[float] | None = None
    gap_rms: float | None = None
    log_var_ratio_rms: float | None = None
    #: Spread of the batch statistics around the population's (standardized mean, log var).
    noise_mean: float | None = None
    noise_var: float | None = None
    effective_values: float | None = None


@dataclass
class AuditReport:
    """What :func:`audit` found: ``findings`` (worst first), the per-layer measurements
    ``layers``, the ``metric`` with running and recalibrated statistics (None without
    labels), the fold ``timing`` and the ``settings`` of the run.

    ``str(report)`` is a plain-text table; :meth:`print` a rich one; :meth:`to_json` and
    :meth:`to_html` write ``audit.json`` and a self-contained page with a plot per layer.
    """

    findings: list[Finding]
    layers: list[LayerAudit]
    metric: dict[str, Any] | None
    timing: dict[str, Any] | None
    settings: dict[str, Any]

    def select(
        self, check: str | None = None, layer: str | None = None, severity: str | None = None
    ) -> list[Finding]:
        """The findings of a ``check``, at a ``layer``, of a ``severity`` (None: any)."""
        return [
            f
            for f in self.findings
            if (check is None or f.check == check)
            and (layer is None or f.layer == layer)
            and (severity is None or f.severity == severity)
        ]

    @property
    def worst(self) -> str | None:
        """The worst severity found, or None when there is no finding."""
        return self.findings[0].severity if self.findings else None

    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (non-finite floats become None)."""
        return json_ready(
            {
                "settings": self.settings,
                "counts": self.counts(),
                "findings": [asdict(f) for f in self.findings],
                "metric": self.metric,
                "timing": self.timing,
                "layers": [asdict(layer) for layer in self.layers],
            }
        )

    def to_json(self, path: Any = None) -> str:
        """The report as strict JSON; written to ``path`` when given."""
        return write_json(self, path)

    def to_html(self, path: Any = None) -> str:
        """A self-contained HTML page (CSS inline, plots as base64 PNG; needs matplotlib);
        written to ``path`` when given."""
        return write_html(self, path)

    def print(self, console: Any = None) -> None:
        """Print the findings as a rich table (needs ``rich``, in the ``lab`` extra)."""
        print_table(self, console)

    def __str__(self) -> str:
        return render_text(self)
