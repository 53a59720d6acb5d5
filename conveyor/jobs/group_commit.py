"""Group commit: single submissions that arrive together share one transaction.

Each request hands its job (or a batch request its jobs, as one unit) to one recording
thread and waits. The thread takes every unit waiting at that moment (up to `max_batch`
jobs, and always at least one unit), records them with one multi-row INSERT and one
durable COMMIT, publishes them together (one Redis pipeline, or one wait for RabbitMQ's
confirms), and answers each request. A unit is recorded whole or not at all. Nothing
waits on purpose: under load the jobs that arrive during one commit form the next batch,
and an idle API records a lone job at once.

On PostgreSQL a batch is one statement (the rows and their events in one CTE) run in
autocommit: one round trip that returns once the commit is on disk, with no BEGIN or
COMMIT of its own. The marks of publication do not cost a transaction each: those
gathered over `mark_delay` go in one UPDATE whose commit does not wait for the disk
(`conveyor.jobs.marks`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs import outbox
from conveyor.jobs.db import recorder_for
from conveyor.jobs.marks import MARK_DELAY, DeferredMarks
from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.outbox import Publisher
from conveyor.observability import logs

log = logs.get(__name__)

MAX_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Recorded:
    """A submission's answer: the job as recorded, and whether the broker took it."""

    job: Job
    published: bool


Settle = Callable[["list[Recorded] | BaseException"], None]


@dataclass(slots=True)
class _Waiting:
    news: Sequence[NewJob]
    settle: Settle


def _settle_future(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[list[Recorded]]
) -> Settle:
    """A callback, safe from any thread, that answers `future` on its loop."""

    def answer(outcome: list[Recorded] | BaseException) -> None:
        if future.done():  # the caller went away; the job stays recorded
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def settle(outcome: list[Recorded] | BaseException) -> None:
        loop.call_soon_threadsafe(answer, outcome)

    return settle


class GroupCommitter:
    """Records submissions in batches on a thread of its own; see the module's docstring."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        publisher: Publisher,
        *,
        max_batch: int = MAX_BATCH,
        mark_delay: float = MARK_DELAY,
    ) -> None:
        self._sessions = sessions
        self._recorder = recorder_for(sessions)
        self._publisher = publisher
        self._max_batch = max_batch
        self._marks = DeferredMarks(
            self._recorder.mark_published, mark_delay, on_idle=self._recorder.close_thread
        )
        self._waiting: deque[_Waiting] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.batches = 0  # how many transactions recorded jobs, for tests and stats

    async def submit(self, new: NewJob) -> Recorded:
        """Record `new` with whatever else is waiting; the job once committed."""
        [recorded] = await self.submit_all([new])
        return recorded

    async def submit_all(self, news: Sequence[NewJob]) -> list[Recorded]:
        """Record `news` together (all or none) with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Recorded]] = loop.create_future()
        self.put(news, _settle_future(loop, future))
        return await future

    def put(self, news: Sequence[NewJob], settle: Settle) -> None:
        """Queue jobs, one unit, for the next batch; `settle` is called with the outcome."""
        if not news:
            raise ValueError("nothing to record")
        with self._wake:
            if self._closing:
                raise RuntimeError("the API is shutting down")
            self._ensure_thread()
            self._waiting.append(_Waiting(news, settle))
            self._wake.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Record what is waiting, write the pending marks, and stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
        self._marks.flush()
        self._recorder.close_thread()  # the connection that flush may have opened

    def _ensure_thread(self) -> None:
        # A forked process inherits no thread.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = None
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="conveyor-group-commit", daemon=True
            )
            self._thread.start()

    def _next(self) -> list[_Waiting] | None:
        """The next batch; None when closed and done."""
        with self._wake:
            while not self._waiting:
                if self._closing:
                    return None
                self._wake.wait()
            batch = [self._waiting.popleft()]
            size = len(batch[0].news)
            while self._waiting and size + len(self._waiting[0].news) <= self._max_batch:
                size += len(self._waiting[0].news)
                batch.append(self._waiting.popleft())
            return batch

    def _loop(self) -> None:
        while (batch := self._next()) is not None:
            self._record(batch)

    def _record(self, batch: list[_Waiting]) -> None:
        try:
            jobs = self._recorder.record([new for w in batch for new in w.news])
        except (IntegrityError, DataError, psycopg.IntegrityError, psycopg.DataError) as error:
            if len(batch) > 1:
                # One unit's values must not fail the others: record them one by one.
                for waiting in batch:
                    self._record([waiting])
                return
            batch[0].settle(error)
            return
        except BaseException as error:
            for waiting in batch:
                waiting.settle(error)
            if not isinstance(error, Exception):
                raise
            return
        self.batches += 1
        published = self._publish(jobs)
        start = 0
        for waiting in batch:
            mine = jobs[start : start + len(waiting.news)]
            start += len(waiting.news)
            waiting.settle([Recorded(job, job.id in published) for job in mine])
        self._marks.add(list(published))

    def _publish(self, jobs: Sequence[Job]) -> set[uuid.UUID]:
        published, _ = outbox.publish_ready(self._publisher, jobs)
        return set(published)
