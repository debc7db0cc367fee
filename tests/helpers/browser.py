"""A headless Chromium for the tests that check that captune's HTML pages render (report.html, compare.html).

`make test` installs Debian's chromium through apt when it can (root); without a browser these tests skip, saying
why, unless CAPTUNE_REQUIRE_BROWSER=1 (CI sets it: a missing browser is then a failure, so CI cannot pass without
rendering the pages). CAPTUNE_BROWSER names a browser executable explicitly; CAPTUNE_SKIP_BROWSER=1 skips them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str:
    """The browser to run: CAPTUNE_BROWSER, else the first of BROWSER_NAMES on PATH; else skip (or fail in CI)."""
    if os.environ.get("CAPTUNE_SKIP_BROWSER") == "1":
        pytest.skip("CAPTUNE_SKIP_BROWSER=1")
    explicit = os.environ.get("CAPTUNE_BROWSER")
    found = shutil.which(explicit) if explicit else next(filter(None, map(shutil.which, BROWSER_NAMES)), None)
    if found is None:
        looked_for = f"CAPTUNE_BROWSER={explicit}" if explicit else " / ".join(BROWSER_NAMES) + " on PATH"
        reason = (f"no headless browser to render the page ({looked_for} not found); `make test` installs Debian's "
                  "chromium when run as root (apt-get install chromium), or set CAPTUNE_BROWSER=/path/to/chrome")
        if os.environ.get("CAPTUNE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (CAPTUNE_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return found


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the browser headless with its own profile folder; assert that it exits 0."""
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def render(chromium: str, profile: Path, page: Path, shot: Path) -> int:
    """Render `page` (its DOM after the scripts ran, and a 1200x900 screenshot at `shot`); assert that the page's
    script finished and that the screenshot is not (nearly) blank; return the thumbnails it rendered (the body's
    data-rendered count)."""
    import re

    from PIL import Image

    dom = run_chromium(chromium, profile, "--dump-dom", page.as_uri()).stdout
    rendered = re.search(r'<body[^>]*data-rendered="(\d+)"', dom)
    assert rendered, "the page's script did not finish: " + dom[:500]
    run_chromium(chromium, profile, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, "the screenshot is (nearly) blank"
    return int(rendered.group(1))
