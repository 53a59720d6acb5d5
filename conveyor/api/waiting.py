"""Requests waiting for jobs to finish (`?wait=S`), answered by one shared poll.

Every waiting request of an API process registers the job it waits for; one thread asks
the store, in one query, which of all the awaited jobs have finished, every `interval`
while anyone waits (never while no one does), and hands each waiting request its job as
that query read it, so no request reads it again. However many clients wait, the database
sees one query per interval: 200 waiters cost what one does. A job is reported within
about one interval of its terminal transition. The same poll serves SQLite's embedded
mode, in process.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from conveyor.observability import logs

log = logs.get(__name__)

T = TypeVar("T")

INTERVAL_SECONDS = 0.03
# Seconds a request may wait at most (the contract's 0 to 60).
MAX_WAIT_SECONDS = 60.0

_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[T]]


class Waiters(Generic[T]):
    """Wakes the requests waiting for jobs once the store shows them finished.

    `finished` is the one query: of the ids given, those finished, each with what the
    waiting requests answer (the job as read).
    """

    def __init__(
        self,
        finished: Callable[[list[uuid.UUID]], Mapping[uuid.UUID, T]],
        *,
        interval: float = INTERVAL_SECONDS,
    ) -> None:
        self._finished = finished
        self.interval = interval
        self._waiting: dict[uuid.UUID, list[_Waiter[T]]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closing = False
        self.polls = 0  # queries made, for tests and stats

    def count(self) -> int:
        """How many requests wait now."""
        with self._cond:
            return sum(len(waiters) for waiters in self._waiting.values())

    async def wait(self, job_id: uuid.UUID, timeout: float) -> T | None:
        """Wait until the store shows `job_id` finished, at most `timeout` seconds.

        What the poll read for it when it finished; None when the time ran out first.
        The caller has checked that the job exists, belongs to its tenant and has not
        finished yet.
        """
        if timeout <= 0:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        waiter = (loop, future)
        with self._cond:
            if self._closing:
                return None
            self._ensure_thread()
            self._waiting.setdefault(job_id, []).append(waiter)
            self._cond.notify()
        try:
            return await asyncio.wait_for(future, min(timeout, MAX_WAIT_SECONDS))
        except TimeoutError:
            return None
        finally:
            self._forget(job_id, waiter)

    def close(self) -> None:
        """Stop polling; requests still waiting run out their time."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def _forget(self, job_id: uuid.UUID, waiter: _Waiter[T]) -> None:
        with self._cond:
            waiters = self._waiting.get(job_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiting[job_id]

    def _ensure_thread(self) -> None:
        # A forked process inherits no thread (and none of its parent's waiters).
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = None
            self._waiting.clear()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="conveyor-waiters", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                awaited = list(self._waiting)
            began = time.monotonic()
            try:
                done = dict(self._finished(awaited))
            except Exception as error:  # the store is away: keep waiting, try again
                log.warning("could not poll for finished jobs: %s", error)
                done = {}
            self.polls += 1
            if done:
                self._wake(done)
            time.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    def _wake(self, done: dict[uuid.UUID, T]) -> None:
        with self._cond:
            woken = [(w, done[j]) for j in done for w in self._waiting.pop(j, [])]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[T], T]]] = {}
        for (loop, future), value in woken:
            by_loop.setdefault(loop, []).append((future, value))
        for loop, answers in by_loop.items():
            try:
                # One wake-up of each loop for all its requests.
                loop.call_soon_threadsafe(_resolve, answers)
            except RuntimeError:  # the requests' loop has closed
                continue


def _resolve(answers: list[tuple[asyncio.Future[T], T]]) -> None:
    for future, value in answers:
        if not future.done():
            future.set_result(value)
