"""Marks of publication written a moment after the publish, many in one statement.

A mark written at once meets the worker's claim of the same row: both update it within
the same millisecond, the claim waits for the mark's row lock, and the CPU the mark needs
is taken from the delivery it follows (on an idle two-core host, about a millisecond of
a job's enqueue-to-start). Written `delay` later, one statement marks every job published
meanwhile. A mark that is never written (the process killed first) only makes the relay
publish the job again; the extra delivery is dropped at claim. A process that exits
normally writes what it holds.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

MARK_DELAY = 0.05
# The writer thread ends after this long with nothing to write (and `on_idle` closes what
# it held: its database connection); the next mark starts another.
IDLE_SECONDS = 5.0

Write = Callable[[Sequence[uuid.UUID]], None]


class DeferredMarks:
    """Gathers job ids and hands them to `write` together, `delay` after the first."""

    def __init__(
        self,
        write: Write,
        delay: float = MARK_DELAY,
        *,
        on_idle: Callable[[], None] = lambda: None,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._write = write
        self._delay = delay
        self._on_idle = on_idle
        self._idle_seconds = idle_seconds
        self._pid = -1
        self._own()
        atexit.register(self.flush)

    def _own(self) -> None:
        # A forked process inherits no thread, and the ids it inherited are its parent's.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._wake = threading.Condition()
            self._pending: list[uuid.UUID] = []
            self._since = 0.0
            self._thread: threading.Thread | None = None

    def add(self, job_ids: Sequence[uuid.UUID]) -> None:
        """Mark these jobs published within `delay` seconds."""
        if not job_ids:
            return
        self._own()
        with self._wake:
            first = not self._pending
            self._pending.extend(job_ids)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="conveyor-marks", daemon=True
                )
                self._thread.start()
            if first:  # else the writer's timed wait ends when these are due
                self._since = time.monotonic()
                self._wake.notify()

    def flush(self) -> None:
        """Write what is held now, in the calling thread."""
        self._own()
        with self._wake:
            pending, self._pending = self._pending, []
        self._write_quietly(pending)

    def _loop(self) -> None:
        while True:
            with self._wake:
                if not self._await_marks():
                    self._thread = None  # under the lock: the next mark starts a writer
                    break
                pending, self._pending = self._pending, []
            self._write_quietly(pending)
        try:
            self._on_idle()
        except Exception as error:
            log.warning("could not close the writer's connection: %s", error)

    def _await_marks(self) -> bool:
        """Wait (the lock held) until the held marks are due; False after IDLE_SECONDS
        without any."""
        idle_until = time.monotonic() + self._idle_seconds
        while not self._pending:
            left = idle_until - time.monotonic()
            if left <= 0:
                return False
            self._wake.wait(left)
        while (due := self._since + self._delay - time.monotonic()) > 0:
            self._wake.wait(due)
        return True

    def _write_quietly(self, job_ids: list[uuid.UUID]) -> None:
        if not job_ids:
            return
        try:
            self._write(job_ids)
        except Exception as error:  # the relay publishes these again; claims drop extras
            log.warning("could not mark %d jobs published: %s", len(job_ids), error)
