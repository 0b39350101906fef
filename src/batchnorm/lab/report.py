"""The report folder: ``metrics.json`` (every number measured) and ``report.html``, one
self-contained page (CSS inline, images embedded as base64) with the printed summary."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchnorm._html import BASE_STYLE, json_ready

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_STYLE = (
    BASE_STYLE
    + """
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.95em; }
"""
)


def write_metrics(path: Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics`` as strict JSON (no NaN) to ``path``."""
    path.write_text(json.dumps(json_ready(metrics), separators=(",", ":"), allow_nan=False) + "\n")
    return path


def write_report(
    out_dir: str | Path,
    title: str,
    summary: str,
    metrics: dict[str, Any],
    figures: Sequence[tuple[Path, str]] = (),
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write ``metrics.json`` and ``report.html`` into ``out_dir`` (created if needed) and
    return the HTML's path.

    ``summary`` is the text the command printed (shown verbatim, so page and terminal
    agree); ``figures`` are ``(png path, caption)`` pairs, embedded in the page;
    ``settings`` is shown as a table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<pre>{html.escape(summary)}</pre>",
    ]
    for path, caption in figures:
        data = Path(path).read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            raise ValueError(f"write_report: {path} is not a PNG file.")
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if settings:
        rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in settings.items()
        )
        parts.append(f"<h2>Settings</h2><table>{rows}</table>")
    parts.append(
        "<p>Every number above, and every curve, is in <code>metrics.json</code> next to this "
        "file.</p></body></html>"
    )
    page = out / "report.html"
    page.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return page
