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

Write = Callable[[Sequence[uuid.UUID]], None]


class DeferredMarks:
    """Gathers job ids and hands them to `write` together, `delay` after the first."""

    def __init__(self, write: Write, delay: float = MARK_DELAY) -> None:
        self._write = write
        self._delay = delay
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
                while not self._pending:
                    self._wake.wait()
                while self._pending and (due := self._since + self._delay - time.monotonic()) > 0:
                    self._wake.wait(due)
                pending, self._pending = self._pending, []
            self._write_quietly(pending)

    def _write_quietly(self, job_ids: list[uuid.UUID]) -> None:
        if not job_ids:
            return
        try:
            self._write(job_ids)
        except Exception as error:  # the relay publishes these again; claims drop extras
            log.warning("could not mark %d jobs published: %s", len(job_ids), error)
