"""How an :class:`~batchnorm.tools.audit.AuditReport` is shown: a plain-text table
(``str``), a rich table in the terminal (the ``lab`` extra's ``rich``), strict JSON and one
self-contained HTML page with a plot per layer (matplotlib, embedded as base64 PNG, as the
lab's report)."""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchnorm._html import BASE_STYLE

if TYPE_CHECKING:
    from batchnorm.tools.audit.findings import AuditReport, LayerAudit

#: Most layers the HTML page plots (the worst first, by running-statistics gap).
MAX_PLOTTED_LAYERS = 24
_COLORS = {"error": "#c62828", "warning": "#b26a00", "info": "#1565c0"}
_RICH_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_STYLE = (
    BASE_STYLE
    + """
body { max-width: 1200px; }
table { width: 100%; }
td, th { padding: 0.3em 0.6em; vertical-align: top; }
code { background: #f6f8fa; padding: 0.1em 0.3em; font-size: 0.92em; word-break: break-word; }
.error { color: #c62828; font-weight: bold; } .warning { color: #b26a00; font-weight: bold; }
.info { color: #1565c0; }
"""
)


def summary_line(report: AuditReport) -> str:
    counts = report.counts()
    s = report.settings
    found = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "nothing"
    return (
        f"batchnorm audit: {found} in {s['batch_norm_layers']} batch-norm layer(s); "
        f"{s['batches']} batch(es), {s['samples']} samples"
    )


def render_text(report: AuditReport, width: int = 100) -> str:
    """One block per finding, worst first: severity, layer, check, evidence, fix."""
    lines = [summary_line(report)]
    for f in report.findings:
        head = f"{f.severity:<8}{f.layer if f.layer is not None else '<model>'}  [{f.check}]"
        lines.append(head)
        lines += textwrap.wrap(f.message, width, initial_indent="  ", subsequent_indent="  ")
        if f.fix:
            lines.append(f"  fix: {f.fix}")
    return "\n".join(lines)


def rich_table(report: AuditReport) -> Any:
    """The findings as a ``rich.table.Table``: one row per finding, worst first."""
    try:
        from rich.table import Table
    except ImportError as error:
        raise ImportError(
            "the audit's terminal table needs rich: pip install 'batchnorm[lab]' (or pip "
            "install rich); str(report) gives the same as plain text."
        ) from error
    table = Table(title=summary_line(report), show_lines=True, expand=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("layer", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("finding (measured)", ratio=3, overflow="fold")
    table.add_column("fix", ratio=2, overflow="fold")
    for f in report.findings:
        style = _RICH_STYLES[f.severity]
        table.add_row(
            f"[{style}]{f.severity}[/]",
            f.layer if f.layer is not None else "<model>",
            f.check,
            _escape(f.message),
            _escape(f.fix),
        )
    return table


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_table(report: AuditReport, console: Any = None) -> None:
    table = rich_table(report)
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(table)


def write_json(report: AuditReport, path: Any = None) -> str:
    text = json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def layer_figure(layer: LayerAudit) -> bytes | None:
    """PNG of one layer: running against measured mean and variance per channel (the
    diagonal is agreement), and the batch-to-batch noise when measured; None when the layer
    has no running statistics or no data."""
    if layer.mean is None or layer.running_mean is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mean, var = np.asarray(layer.mean), np.asarray(layer.var)
    rmean, rvar = np.asarray(layer.running_mean), np.asarray(layer.running_var)
    gap = np.nan_to_num(np.asarray(layer.gap), nan=0.0, posinf=10.0)
    fig, (ax_mean, ax_var) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    ok = np.isfinite(rmean) & np.isfinite(mean)
    points = ax_mean.scatter(
        mean[ok], rmean[ok], c=np.minimum(gap[ok], 2.0), cmap="viridis", vmin=0, vmax=2, s=12
    )
    if ok.any():
        low, high = min(mean[ok].min(), rmean[ok].min()), max(mean[ok].max(), rmean[ok].max())
        ax_mean.plot([low, high], [low, high], color="0.5", linewidth=1)
    ax_mean.set(xlabel="mean of the data", ylabel="running_mean", title="mean per channel")
    fig.colorbar(points, ax=ax_mean, label="|gap| / std (capped at 2)")
    eps = layer.eps
    ok = np.isfinite(rvar) & np.isfinite(var) & (rvar + eps > 0)
    x, y = var[ok] + eps, rvar[ok] + eps
    ax_var.scatter(x, y, s=12, color="tab:orange")
    if ok.any():
        low, high = min(x.min(), y.min()), max(x.max(), y.max())
        ax_var.plot([low, high], [low, high], color="0.5", linewidth=1)
        ax_var.set_xscale("log")
        ax_var.set_yscale("log")
    ax_var.set(
        xlabel="variance of the data + eps",
        ylabel="running_var + eps",
        title="variance per channel (log)",
    )
    noise = (
        f"; batch noise {layer.noise_mean:.3g} std (~{layer.effective_values:.0f} values)"
        if layer.noise_mean is not None
        else ""
    )
    fig.suptitle(f"{layer.name} ({layer.kind}, {layer.channels} channels){noise}", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def write_html(report: AuditReport, path: Any = None) -> str:
    """The report as one HTML page: the findings table, the metric, the fold timing and a
    figure per layer; nothing external (CSS inline, images as data: URIs)."""
    title = "batchnorm audit"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{title}</h1>",
        f"<p>{html.escape(summary_line(report))}</p>",
        "<table><tr><th>severity</th><th>layer</th><th>check</th><th>finding (measured)</th>"
        "<th>fix</th></tr>",
    ]
    for f in report.findings:
        parts.append(
            f'<tr><td class="{f.severity}">{f.severity}</td>'
            f"<td>{html.escape(f.layer if f.layer is not None else '<model>')}</td>"
            f"<td>{html.escape(f.check)}</td><td>{html.escape(f.message)}</td>"
            f"<td><code>{html.escape(f.fix)}</code></td></tr>"
        )
    parts.append("</table>")
    if report.metric:
        m = report.metric
        parts.append(
            f"<h2>Metric</h2><p>eval {html.escape(m['name'])}: {m['running']:.4f} with the "
            f"running statistics, {m['recalibrated']:.4f} with recalibrated ones "
            f"({m['samples']} samples).</p>"
        )
    if report.timing:
        t = report.timing
        parts.append(
            f"<h2>Fold</h2><p>measured: {t['model_ms']:.3g} ms per batch of {t['batch_size']} "
            f"before folding, {t['folded_ms']:.3g} ms after ({t['speedup']:.2f}x; best of "
            f"{t['repeats']} runs of {t['calls']} calls, {html.escape(t['device'])}).</p>"
        )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(_cell(v))}</td>"
            for v in (
                a.name,
                a.kind,
                a.channels,
                a.dtype,
                a.eps,
                a.momentum,
                a.training,
                a.values_per_batch,
                a.gap_rms,
                a.log_var_ratio_rms,
                a.noise_mean,
                a.effective_values,
            )
        )
        + "</tr>"
        for a in report.layers
    )
    parts.append(
        "<h2>Layers</h2><table><tr><th>layer</th><th>class</th><th>channels</th><th>dtype</th>"
        "<th>eps</th><th>momentum</th><th>training</th><th>values per batch</th>"
        "<th>mean gap (rms, std)</th><th>|log var ratio| (rms)</th><th>batch noise (std)</th>"
        f"<th>effective values</th></tr>{rows}</table>"
    )
    plotted = sorted(
        (a for a in report.layers if a.mean is not None and a.running_mean is not None),
        key=lambda a: -(a.gap_rms or 0.0) - (a.log_var_ratio_rms or 0.0),
    )[:MAX_PLOTTED_LAYERS]
    if plotted:
        shown = len(plotted)
        total = sum(a.running_mean is not None for a in report.layers)
        note = f" (the {shown} of {total} that differ most)" if shown < total else ""
        parts.append(f"<h2>Running against measured statistics{note}</h2>")
    for a in plotted:
        png = layer_figure(a)
        if png is None:
            continue
        encoded = base64.b64encode(png).decode("ascii")
        caption = (
            f"{a.name}: each dot a channel; on the diagonal the running statistics equal the data's"
        )
        parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append(
        "<p>Every number is in the JSON report (<code>batchnorm audit --json</code>, "
        "<code>report.to_json()</code>).</p></body></html>"
    )
    page = "\n".join(parts) + "\n"
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
