"""Open a page in headless Chromium and report what a reader would see: its images, its console, a screenshot.

Chromium is driven through its DevTools protocol over `--remote-debugging-pipe`: the browser reads JSON
commands from file descriptor 3 and writes replies and events to descriptor 4, each message ended by a NUL
byte (the transport Puppeteer uses). That needs nothing beyond the standard library, where the websocket
transport would need a websocket client package.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Every <img> of the page after it loaded: whether it decoded, and its size in pixels.
_IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({
  alt: i.alt, src: i.src.slice(0, 60), complete: i.complete, naturalWidth: i.naturalWidth,
  naturalHeight: i.naturalHeight})))"""


def find_chromium() -> str | None:
    """Path of a Chromium (or Chrome) binary: $CHROMIUM if set, else the first of BINARIES on PATH."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((p for p in map(shutil.which, BINARIES) if p), None)


@dataclass
class PageReport:
    """What loading one page produced."""

    images: list[dict[str, Any]]  # per <img>: alt, src (first 60 chars), complete, naturalWidth, naturalHeight
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    screenshot: bytes = b""  # PNG of the whole page


class Chromium:
    """A headless Chromium process and one DevTools session on a fresh tab; use as a context manager."""

    def __init__(self, binary: str, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Moved above 10 first, so that putting them on 3 and 4 in the child cannot overwrite one another.
        high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def _child_fds() -> None:
            os.dup2(high_r, 3)  # os.dup2 makes the copies inheritable
            os.dup2(high_w, 4)

        self._proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
             f"--user-data-dir={self._profile.name}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=_child_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(high_r)
        os.close(high_w)
        self._buf = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self.session = ""

    def __enter__(self) -> Chromium:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call("Browser.close")
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self._profile.cleanup()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError(f"Chromium sent nothing for {self.timeout_s:.0f} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed its DevTools pipe (exit code {self._proc.poll()})")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        """Send one DevTools command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        """The first event `method` of this session, waiting for it if it has not come yet."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            for i, ev in enumerate(self._events):
                if ev.get("method") == method and ev.get("sessionId") == self.session:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads (Log domain errors) seen so far on the page."""
        out = []
        for ev in self._events:
            p = ev.get("params", {})
            if ev.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                  for a in p.get("args", [])))
            elif ev.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('text', '')} {d.get('exception', {}).get('description', '')}")
            elif ev.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                out.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".strip())
        return out

    def open(self, url: str, width: int = 1280) -> PageReport:
        """Load `url`, then return its images, the errors so far and a screenshot of the whole page."""
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=True)
        nav = self.call("Page.navigate", {"url": url}, session=True)
        if nav.get("errorText"):
            raise RuntimeError(f"Chromium could not open {url}: {nav['errorText']}")
        self.wait_event("Page.loadEventFired")
        images = json.loads(self.call("Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True},
                                      session=True)["result"]["value"])
        size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
        shot = self.call("Page.captureScreenshot",
                         {"format": "png", "captureBeyondViewport": True,
                          "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}},
                         session=True)
        return PageReport(images=images, errors=self.errors(), screenshot=base64.b64decode(shot["data"]))


def open_page(path: Path, timeout_s: float = 60.0) -> PageReport:
    """Open the local file `path` in a fresh headless Chromium (found by `find_chromium`) and report on it."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium binary on PATH (tried {', '.join(BINARIES)})")
    with Chromium(binary, timeout_s) as browser:
        return browser.open(path.resolve().as_uri())
