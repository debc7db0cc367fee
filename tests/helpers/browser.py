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
