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


class Interrupted(Exception):
    """Ctrl-C in a long command, with what was kept and how to go on: the command line prints
    `captune: interrupted: <message>` in one line and exits with status 130."""

    def __init__(self, message: str):
        super().__init__(message)


def ignore_interrupts_in_worker(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: Ctrl-C reaches the whole process group, as a Slurm job's SIGTERM reaches all of
    its processes, and only the main process should act on them (a worker's KeyboardInterrupt would print its own
    traceback; a worker killed mid-step would fail the step the main process is finishing). The main process stops
    the workers, which also end when it does (the DataLoader's watchdog)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
