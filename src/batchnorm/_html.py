"""What the lab's reports and the audit's page share: the base style of one self-contained
HTML page and strict JSON. Only the standard library: the core's tools use it without the
lab's optional packages."""

from __future__ import annotations

import math
from typing import Any

#: The look of every page we write (a page adds its own rules after these).
BASE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
figure { margin: 2em 0; }
figcaption { color: #555; margin-top: 0.4em; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
"""


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats (a diverged loss) replaced by None (strict JSON),
    tuples as lists and keys as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
