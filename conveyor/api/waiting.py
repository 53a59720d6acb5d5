"""Requests waiting for jobs to finish (`?wait=S`), answered by one shared poll.

Every waiting request of an API process registers the job it waits for; one thread asks
the store, in one query, which of all the awaited jobs have finished, every `interval`
while anyone waits (never while no one does), and wakes the requests of those that have.
However many clients wait, the database sees one query per interval: 200 waiters cost
what one does. A job is reported within about one interval of its terminal transition.
The same poll serves SQLite's embedded mode, in process.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from conveyor.observability import logs

log = logs.get(__name__)

INTERVAL_SECONDS = 0.02
# Seconds a request may wait at most (the contract's 0 to 60).
MAX_WAIT_SECONDS = 60.0

Finished = Callable[[list[uuid.UUID]], Iterable[uuid.UUID]]
_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]


class Waiters:
    """Wakes the requests waiting for jobs once the store shows them finished."""

    def __init__(self, finished: Finished, *, interval: float = INTERVAL_SECONDS) -> None:
        self._finished = finished
        self.interval = interval
        self._waiting: dict[uuid.UUID, list[_Waiter]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closing = False
        self.polls = 0  # queries made, for tests and stats

    def count(self) -> int:
        """How many requests wait now."""
        with self._cond:
            return sum(len(waiters) for waiters in self._waiting.values())

    async def wait(self, job_id: uuid.UUID, timeout: float) -> bool:
        """Wait until the store shows `job_id` finished, at most `timeout` seconds.

        True when it finished, False when the time ran out first. The caller has
        checked that the job exists, belongs to its tenant and has not finished yet.
        """
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = (loop, future)
        with self._cond:
            if self._closing:
                return False
            self._ensure_thread()
            self._waiting.setdefault(job_id, []).append(waiter)
            self._cond.notify()
        try:
            await asyncio.wait_for(future, min(timeout, MAX_WAIT_SECONDS))
            return True
        except TimeoutError:
            return False
        finally:
            self._forget(job_id, waiter)

    def close(self) -> None:
        """Stop polling; requests still waiting run out their time."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def _forget(self, job_id: uuid.UUID, waiter: _Waiter) -> None:
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
                done = set(self._finished(awaited))
            except Exception as error:  # the store is away: keep waiting, try again
                log.warning("could not poll for finished jobs: %s", error)
                done = set()
            self.polls += 1
            if done:
                self._wake(done)
            time.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    def _wake(self, done: set[uuid.UUID]) -> None:
        with self._cond:
            woken = [w for job_id in done for w in self._waiting.pop(job_id, [])]
        for loop, future in woken:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the request's loop has closed
                continue


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
