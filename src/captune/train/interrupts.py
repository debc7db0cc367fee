"""Ctrl-C (SIGINT) and SIGTERM (a Slurm job's time limit or preemption, forwarded by torchrun) while training: the
run stops at a step's end, in every process at the same step, and keeps that step as a checkpoint."""

from __future__ import annotations

import signal
import threading
import time
from typing import Self


class Interrupts:
    """Ctrl-C, and SIGTERM the same way. While starting, the signal raises KeyboardInterrupt, as Python's own SIGINT
    handler does. While training (`stop_at_step_end`) the first one only asks for a stop: every process finishes its
    step, and they all stop at the same step's end (`requested` goes into the step's all-reduce), so none is left
    waiting in a collective, and none is interrupted while it holds a lock (a log writer's, a checkpoint's rename) it
    would then wait for; the loop saves that step before it stops. Another signal within a few seconds is the same one
    passed on (torchrun forwards the terminal's Ctrl-C to its workers, which have it already; Slurm signals every
    task) and is ignored; a later one raises KeyboardInterrupt at once."""

    REPEAT_S = 5.0

    def __init__(self):
        self.at: float | None = None
        self.previous: dict = {}
        self.stop_at_step_end = False

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(sig) is default:  # left alone where a caller handles it
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.at is not None and now - self.at < self.REPEAT_S:
            return
        first, self.at = self.at is None, now
        if not (first and self.stop_at_step_end):
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.at is not None

    def stop(self) -> None:
        """Stop now, at a step's end (this process, or another, was asked to)."""
        self.at = self.at or time.monotonic()  # a SIGINT that reaches this process only now is the same Ctrl-C
        self.stop_at_step_end = False
        raise KeyboardInterrupt
