"""Writing the successes of one worker process in batches, off the runs' path.

A run that succeeds hands its result here and its thread takes the next delivery at
once; one thread per process writes every success waiting at that moment with one
statement (each row with its event) and one durable commit. The successes that arrive
during one write form the next; a write that would carry only a few waits LINGER_SECONDS
for more first (a busy process finishes several in that time), which divides the
statements by the batch size at the cost of a few milliseconds before `succeeded`.

Until its success is written, the run's lease is still held and renewed, so nobody else
can take the job. The message may be acknowledged before the write: if the process dies
in between, the job is still `running` under a lease nobody renews, and rescue runs it
again once the lease has expired; a write refused because the lease was lost (the job
was cancelled or rescued meanwhile) is reported as a lost run. Transient database errors
are retried; the lease keeper keeps the leases alive meanwhile.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conveyor.jobs.fastpath import FastPath
from conveyor.jobs.models import Job
from conveyor.jobs.states import JobState
from conveyor.observability import logs, metrics
from conveyor.worker.leases import LeaseKeeper

log = logs.get(__name__)

MAX_BATCH = 500
# A write that finds fewer than this many successes waiting lingers for more.
LINGER_BELOW = 32
LINGER_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class Success:
    """A run that succeeded and whose result is not written yet."""

    job: Job
    worker: str
    result: Any
    run_seconds: float
    context: dict[str, Any]


class Completer:
    """Batches the success writes of this process; see the module's docstring."""

    def __init__(
        self,
        fast_path: FastPath,
        leases: LeaseKeeper,
        *,
        lost: Callable[[Job, str], object],
        transient: Callable[[], tuple[type[BaseException], ...]],
        finished_steps: Callable[[list[Job]], object] = lambda jobs: None,
        max_batch: int = MAX_BATCH,
        linger: float = LINGER_SECONDS,
    ) -> None:
        self._fast_path = fast_path
        self._leases = leases
        self._lost = lost
        self._transient = transient
        self._finished_steps = finished_steps
        self._max_batch = max_batch
        self.linger = linger  # seconds; settable
        self._flushing = 0
        self._waiting: list[Success] = []
        self._writing = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self.writes = 0  # statements that wrote successes, for tests and stats

    def add(self, success: Success) -> None:
        """Queue a success for the next write; its lease stays held until then."""
        with self._cond:
            self._ensure_thread()
            self._waiting.append(success)
            if len(self._waiting) in (1, LINGER_BELOW):
                # The first wakes the writer; the one that fills a batch ends its linger.
                self._cond.notify_all()

    def pending(self) -> int:
        """Successes queued or being written."""
        with self._cond:
            return len(self._waiting) + self._writing

    def flush(self, timeout: float) -> bool:
        """Wait until every queued success is written; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._pid != os.getpid():
                return not self._waiting
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._waiting or self._writing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._flushing -= 1
        return True

    def _ensure_thread(self) -> None:
        # A forked child inherits no thread, and no successes of its parent's to write.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = None
            self._waiting = []
            self._writing = 0
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="conveyor-completer", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                self._gather()
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                self._writing = len(batch)
            try:
                self._write(batch)
            except Exception as error:  # leave the runs to rescue rather than die
                log.error("could not record successes: %s", error)
                for success in batch:
                    self._leases.drop(success.job.id, success.job.lease_token)
            finally:
                with self._cond:
                    self._writing = 0
                    self._cond.notify_all()

    def _gather(self) -> None:
        """Wait a moment for more successes when only a few are waiting (lock held)."""
        until = time.monotonic() + self.linger
        while len(self._waiting) < LINGER_BELOW and not self._flushing:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _write(self, batch: list[Success]) -> None:
        groups: dict[str, list[Success]] = {}
        for success in batch:
            groups.setdefault(success.worker, []).append(success)
        for worker, group in groups.items():
            try:
                moved = self._write_group(worker, group)
            except Exception:
                if len(group) == 1:
                    raise
                # One result the database refuses must not hold back the others.
                for success in group:
                    self._write([success])
                continue
            self.writes += 1
            steps = [
                s.job
                for s in group
                if s.job.workflow_id is not None and (s.job.id, s.job.lease_token) in moved
            ]
            if steps:
                # What their successes released goes to the broker now, not at the relay.
                self._finished_steps(steps)
            for success in group:
                job = success.job
                self._leases.drop(job.id, job.lease_token)
                if (job.id, job.lease_token) in moved:
                    metrics.count_finished(job, JobState.SUCCEEDED.value)
                    log.info(
                        "job succeeded",
                        **success.context,
                        run_seconds=round(success.run_seconds, 6),
                    )
                else:
                    with logs.bound(**success.context):
                        log.info("job result not recorded: it was cancelled or taken away")
                        self._lost(job, success.worker)

    def _write_group(self, worker: str, group: list[Success]) -> set[Any]:
        runs = [(s.job.id, s.job.lease_token, s.result) for s in group]
        pause = 0.05
        while True:
            try:
                return self._fast_path.succeed_many(worker, runs)
            except self._transient() as error:
                log.warning("could not record successes, trying again: %s", error)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
