"""report.html in a real browser: headless Chromium opens it from disk, every image decodes at a readable size,
the console stays free of errors, and a screenshot of the whole page is kept for a person to look at.

The report is built from tests/data/report_e2e.json, the report.json of a real end-to-end run (tiny models,
`PRESET=ci`, absolute paths shortened), with its router heatmaps drawn again from the router counts it holds,
so the test takes seconds and no pipeline. Chromium is driven through its DevTools protocol
(tests/chromium_page.py). Skipped only when no Chromium binary is found; .ci/run installs Debian's `chromium`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eval.report import write_report
from teachers.router_analytics import write_heatmaps
from tests.chromium_page import BINARIES, find_chromium, open_page

FIXTURE = Path(__file__).parent / "data" / "report_e2e.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason=f"no Chromium binary found (looked for $CHROMIUM, then {', '.join(BINARIES)} on PATH); "
           "install it with `apt-get install -y --no-install-recommends chromium` (.ci/run does)")


def _build_report(run_dir: Path) -> dict[str, Path]:
    """The fixture's report written as the pipeline writes it: heatmaps under logits/router, report under run."""
    report = json.loads(FIXTURE.read_text())
    heatmaps = write_heatmaps(report["router"], run_dir / "logits" / "router")
    report["router"]["heatmaps"] = [str(p) for p in heatmaps]
    return write_report(report, run_dir)


@needs_chromium
def test_report_html_in_chromium(tmp_path: Path) -> None:
    files = _build_report(tmp_path / "run")
    # Opened from another folder, as a reader would open a mailed or downloaded copy: the page needs no files.
    page = tmp_path / "elsewhere" / "report.html"
    page.parent.mkdir()
    shutil.copy(files["html"], page)

    seen = open_page(page)

    shot = tmp_path / "report_screenshot.png"
    shot.write_bytes(seen.screenshot)
    print(f"\nscreenshot of report.html in Chromium: {shot}")

    assert seen.errors == [], f"browser console errors: {seen.errors}"
    # 3 plots (quality per task, quality vs speedup, training curves) and 2 router heatmaps.
    assert [i["alt"] for i in seen.images] == ["quality per task", "quality vs speedup", "training curves",
                                               "router_load", "router_sources"]
    for img in seen.images:
        assert img["complete"] and img["naturalWidth"] > 0, f"image did not load: {img}"
        # Readable: no plot below 600 x 400 pixels (a 7-inch figure at 110 dpi is 825 wide).
        assert img["naturalWidth"] >= 600 and img["naturalHeight"] >= 400, f"image too small to read: {img}"
    assert seen.screenshot.startswith(PNG_MAGIC)
    width = int.from_bytes(seen.screenshot[16:20], "big")
    height = int.from_bytes(seen.screenshot[20:24], "big")
    assert width == 1280 and height > 2000, f"screenshot {width}x{height}: the page did not render in full"


@needs_chromium
def test_the_browser_check_sees_a_broken_image_and_console_errors(tmp_path: Path) -> None:
    """The checks above can fail: a page with a missing image, a console.error and an uncaught exception."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body>"
                    "<img alt='gone' src='missing.png'><script>console.error('boom'); notDefined();</script>"
                    "</body></html>")
    seen = open_page(page)
    assert [(i["alt"], i["naturalWidth"]) for i in seen.images] == [("gone", 0)]
    assert any("missing.png" in e for e in seen.errors), seen.errors
    assert any("console.error: boom" in e for e in seen.errors), seen.errors
    assert any("notDefined" in e for e in seen.errors), seen.errors
