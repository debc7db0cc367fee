"""User-facing errors: one clear message, naming the file and the problem, and no traceback."""

from __future__ import annotations

from pathlib import Path


class CaptuneError(Exception):
    """A problem with the user's input (a file, a folder, an option), not a bug in captune.

    The command line prints `captune: error: <message>` and exits with status 2, without a traceback.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)
