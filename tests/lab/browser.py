"""A headless Chromium driven over the DevTools protocol (CDP), just enough to check a
report the way a reader sees it: load a page, collect console errors and uncaught
exceptions, evaluate JavaScript, take a full-page screenshot.

Only the Debian ``chromium`` binary and ``websocket-client`` (the ``dev`` extra) are needed:
Playwright's browser download is not available on our machines.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

#: Binaries tried, in order (Debian names it ``chromium``).
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
#: Seconds to wait for the browser to start, a page to load, a command to answer.
TIMEOUT = 30


def find_chromium() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class Browser:
    """``with Browser() as b: page = b.open(path)``; see :meth:`open`."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise FileNotFoundError(f"no Chromium found (tried {', '.join(CANDIDATES)}).")
        self._profile = tempfile.TemporaryDirectory(prefix="bn-chromium-")
        self._process: subprocess.Popen | None = None
        self._ws: Any = None
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> Browser:
        import websocket  # the dev extra's websocket-client

        # As root in a container Chromium needs --no-sandbox; port 0: any free port, announced
        # on stderr as "DevTools listening on ws://127.0.0.1:PORT/...".
        self._process = subprocess.Popen(
            [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--user-data-dir={self._profile.name}",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        port = self._devtools_port()
        deadline = time.monotonic() + TIMEOUT
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not pages:
            raise RuntimeError("Chromium started but shows no page target.")
        self._ws = websocket.create_connection(
            pages[0]["webSocketDebuggerUrl"], timeout=TIMEOUT, suppress_origin=True
        )
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        return self

    def _devtools_port(self) -> int:
        assert self._process is not None and self._process.stderr is not None
        deadline = time.monotonic() + TIMEOUT
        seen = []
        while time.monotonic() < deadline:
            line = self._process.stderr.readline()
            if not line and self._process.poll() is not None:
                break
            seen.append(line)
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                return int(match.group(1))
        raise RuntimeError("Chromium did not announce its DevTools port:\n" + "".join(seen[-20:]))

    def __exit__(self, *exc: object) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._profile.cleanup()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one CDP command and return its result; events that arrive meanwhile are
        kept in ``self.events``."""
        self._next_id += 1
        self._ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str) -> dict[str, Any]:
        for index, message in enumerate(self.events):
            if message.get("method") == event:
                return self.events.pop(index)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            message = json.loads(self._ws.recv())
            if message.get("method") == event:
                return message
            self.events.append(message)
        raise TimeoutError(f"no {event} within {TIMEOUT} s")

    def open(self, path: Path) -> None:
        """Load a local file and wait until it (images included) has loaded."""
        self.events.clear()
        self.call("Page.navigate", url=Path(path).resolve().as_uri())
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries since the last open."""
        found = []
        for message in self.events:
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not only the window)."""
        width, height = self.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        )
        data = self.call(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        )["data"]  # fmt: skip
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
