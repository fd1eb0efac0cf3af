"""Ctrl-C and SIGTERM during training: stop cleanly at the next safe point.

The first SIGINT/SIGTERM only sets a flag. The training loop finishes the current step (or
abandons validation), writes a checkpoint, prints the command that resumes, and raises
`Interrupted`, which the CLI turns into exit code 130 (SIGINT) or 143 (SIGTERM). A second
signal exits at once: every file is written atomically (temp file + rename), so whatever was
being written is simply not there yet, and the last complete checkpoint stays.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


class StopRequest:
    """Context manager: while active (main thread only), SIGINT and SIGTERM request a stop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None  # the first signal received
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # the second one: leave now, nothing half-written remains
            sys.stderr.write(
                f"\n{name} again: exiting at once; the last complete checkpoint is kept\n"
            )
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(
            f"\n{name}: finishing the current step, then saving a checkpoint "
            "(send it again to exit at once)\n"
        )
        sys.stderr.flush()

    def __enter__(self) -> StopRequest:
        if self.enabled:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
