"""The line of the platform's health that `conveyor up` prints now and then.

At INFO when jobs moved or the health changed since the last line, at WARNING when the
job store or the broker does not answer or jobs died; an idle, healthy platform's line
is kept for DEBUG, so a quiet terminal stays quiet.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from conveyor.cli.wiring import Platform
from conveyor.jobs import db, store
from conveyor.jobs.states import JobState
from conveyor.observability import logs

log = logs.get(__name__)


class HealthReport:
    """A thread that reads the platform's health every `seconds` and logs a line of it."""

    def __init__(self, platform: Platform, seconds: float) -> None:
        self._platform = platform
        self._seconds = seconds
        self._stop = threading.Event()
        self._last: tuple[str, str] | None = None
        self._thread = threading.Thread(target=self._run, name="conveyor-health", daemon=True)

    def start(self) -> None:
        """Begin reporting."""
        self._thread.start()

    def stop(self) -> None:
        """Stop reporting."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._seconds):
            level, fields = self.read()
            log.log(level, "platform health", **fields)

    def read(self) -> tuple[int, dict[str, Any]]:
        """The level and the fields of the next line."""
        fields: dict[str, Any] = {}
        try:
            self._platform.broker_check()
            fields["broker"] = "ok"
        except Exception as error:
            fields["broker"] = f"not answering: {error}"
        try:
            with self._platform.sessions() as session:
                now = db.db_now(session)
                since = now - dt.timedelta(seconds=self._seconds)
                finished = store.finished_since(session, since)
                by_queue = store.counts_by_queue(session)
                oldest = store.oldest_queued_by_queue(session)
            fields["database"] = "ok"
        except Exception as error:
            fields["database"] = f"not answering: {error}"
            return logging.WARNING, fields
        waiting = sum(c.get(JobState.QUEUED, 0) for c in by_queue.values())
        running = sum(c.get(JobState.RUNNING, 0) for c in by_queue.values())
        fields.update(
            succeeded=finished.get(JobState.SUCCEEDED.value, 0),
            dead=finished.get(JobState.DEAD.value, 0),
            cancelled=finished.get(JobState.CANCELLED.value, 0),
            waiting=waiting,
            running=running,
            oldest_waiting_seconds=(
                round((now - min(oldest.values())).total_seconds(), 1) if oldest else 0
            ),
            window_seconds=self._seconds,
        )
        status = (fields["broker"], fields["database"])
        changed = status != self._last
        self._last = status
        if fields["broker"] != "ok" or fields["dead"]:
            return logging.WARNING, fields
        moved = fields["succeeded"] or fields["cancelled"] or waiting or running
        return (logging.INFO if moved or changed else logging.DEBUG), fields
