"""The report folder: ``metrics.json`` (every number measured) and ``report.html``, one
self-contained page (CSS inline, images embedded as base64) with the printed summary,
result tables whose every number names its place in ``metrics.json`` (``data-metric``,
checked in a browser by the tests), text sections and the figures."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchnorm._html import BASE_STYLE, json_ready

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_STYLE = (
    BASE_STYLE
    + """
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.95em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.results { margin: 1em 0; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: 0.3em; }
section p { line-height: 1.45; }
"""
)


@dataclass(frozen=True)
class Table:
    """A table of results. ``rows``: (label, cells); a cell is ``(path, format)``: the number
    at ``path`` (keys) in ``metrics.json``, shown with ``format`` (a None value shows as
    "-"); a None path is an empty cell ("-", nothing measured)."""

    caption: str
    columns: Sequence[str]
    rows: Sequence[tuple[str, Sequence[tuple[Sequence[str] | None, str]]]]


@dataclass(frozen=True)
class Section:
    """A heading and its paragraphs (plain text, escaped)."""

    heading: str
    paragraphs: Sequence[str] = field(default_factory=tuple)


def lookup(metrics: dict[str, Any], path: Sequence[str]) -> Any:
    """The value at ``path`` (a sequence of keys) in ``metrics``."""
    value: Any = metrics
    for key in path:
        value = value[key]
    return value


def format_metric(value: Any, fmt: str) -> str:
    """A number as a table shows it; None (e.g. "never reached") as "-"."""
    return "-" if value is None else format(value, fmt)


def _table_html(table: Table, metrics: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    rows = []
    for label, cells in table.rows:
        tds = "".join(
            '<td class="num">-</td>'
            if path is None
            else f'<td class="num" data-metric="{html.escape(json.dumps(list(path)))}" '
            f'data-format="{html.escape(fmt)}">'
            f"{html.escape(format_metric(lookup(metrics, path), fmt))}</td>"
            for path, fmt in cells
        )
        rows.append(f"<tr><th>{html.escape(label)}</th>{tds}</tr>")
    return (
        f'<table class="results"><caption>{html.escape(table.caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
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
    tables: Sequence[Table] = (),
    sections: Sequence[Section] = (),
) -> Path:
    """Write ``metrics.json`` and ``report.html`` into ``out_dir`` (created if needed) and
    return the HTML's path.

    ``summary`` is the text the command printed (shown verbatim, so page and terminal
    agree); ``figures`` are ``(png path, caption)`` pairs, embedded in the page;
    ``settings`` is shown as a table. ``tables`` (results, each number tagged with its
    place in ``metrics``) follow the summary, then ``sections`` (what the paper found,
    what we found, ...), then the figures."""
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
    parts += [_table_html(table, metrics) for table in tables]
    for section in sections:
        paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in section.paragraphs)
        parts.append(f"<section><h2>{html.escape(section.heading)}</h2>{paragraphs}</section>")
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
