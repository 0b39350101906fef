"""The reports as a reader sees them: each ``report.html`` opened in headless Chromium.

Every image has loaded (natural size > 0), the console shows no error, every number of the
results tables equals ``metrics.json`` (read back from disk) at the shown precision, and a
full-page screenshot is not blank. Without Chromium the test skips, with the reason, except
on CI (``CI=true``), where a missing browser is a failure: ``.ci/run`` installs it.
"""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest

from batchnorm.cli import main

from .browser import Browser, find_chromium, on_ci
from .conftest import blobs

pytest.importorskip("websocket", reason="websocket-client (the dev extra) drives Chromium")

#: JavaScript: every image's loaded state and natural size; every tagged table cell.
IMAGES = "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
CELLS = (
    "Array.from(document.querySelectorAll('td[data-metric]'))"
    ".map(td => [JSON.parse(td.dataset.metric), td.dataset.format, td.textContent])"
)

#: The reproductions run once per session at --quick (conftest), and their figure counts.
QUICK_RUNS = {"santurkar2018": ("santurkar_quick", 2), "renorm2017": ("renorm_quick", 1)}


def _format(value, fmt: str) -> str:
    """As the report formats a metric (None as "-")."""
    return "-" if value is None else format(value, fmt)


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        message = "Chromium is not installed (Debian: apt-get install chromium)"
        if on_ci():
            pytest.fail(f"{message}; CI must run the browser test (.ci/run installs it).")
        # A developer's machine without Chromium may skip; CI fails above instead.
        pytest.skip(message)
    with Browser() as b:
        yield b


@pytest.fixture(scope="module")
def small_reports(tmp_path_factory):
    """The demo's and ioffe2015's reports on a small data set (seconds)."""
    out = tmp_path_factory.mktemp("reports")
    np.savez(out / "blobs.npz", **blobs())
    data = ["--data", "npz", "--data-dir", str(out / "blobs.npz"), "--no-progress"]
    assert (
        main(["demo", "--epochs", "3", "--batch-size", "40", "--out", str(out / "demo"), *data])
        == 0
    )
    assert main(["reproduce", "ioffe2015", "--steps", "40", "--eval-every", "10",
                 "--out", str(out / "ioffe2015"), *data]) == 0  # fmt: skip
    return {"demo": (out / "demo", 3), "ioffe2015": (out / "ioffe2015", 1)}


@pytest.mark.parametrize("report", ["demo", "ioffe2015", "santurkar2018", "renorm2017"])
def test_report_in_a_browser(report, browser, request, tmp_path):
    if report in QUICK_RUNS:
        fixture, images = QUICK_RUNS[report]
        folder = request.getfixturevalue(fixture)[0]
    else:
        folder, images = request.getfixturevalue("small_reports")[report]
    metrics = json.loads((folder / "metrics.json").read_text())

    browser.open(folder / "report.html")
    assert browser.errors() == []
    loaded = browser.evaluate(IMAGES)
    assert len(loaded) == images
    assert all(done and width > 0 and height > 0 for done, width, height in loaded), loaded

    cells = browser.evaluate(CELLS)
    assert cells, "the report shows no results table"
    for path, fmt, text in cells:
        value = metrics
        for key in path:
            value = value[key]
        assert text == _format(value, fmt), (path, text, value)

    shot = browser.screenshot(tmp_path / f"{report}.png")
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[0] > 600 and pixels.shape[1] >= 800
    assert pixels.std() > 0.05  # not blank: text, tables and figures
    assert len(np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 100
