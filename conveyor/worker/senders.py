"""The threads that carry publishes, and one publish call's progress.

A broker that stops answering without closing its sockets would hold a publish forever:
publishes run on a few daemon threads of the publisher's own, each with its own
connection, and the caller follows an `Attempt` and stops waiting once it makes no
progress (see `conveyor.worker.publisher`).
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence

from conveyor.jobs.models import Job

# Publishes in flight at once per publisher; a frozen broker can hold at most these.
SENDER_THREADS = 4
# A sender thread (and its connection) with nothing to do for this long ends.
SENDER_IDLE_SECONDS = 60.0


class Attempt:
    """One publish call handed to a sender thread; its caller may stop waiting for it."""

    def __init__(self, jobs: Sequence[Job], progress: Callable[[], None] = lambda: None) -> None:
        self.jobs = jobs
        # Tells the publisher that the broker is moving, for calls still waiting their turn.
        self._progress = progress
        # The caller's trace and log fields, for the spans and lines of the sender thread.
        self.context = contextvars.copy_context()
        self.done = threading.Event()
        self.error: Exception | None = None
        self._lock = threading.Lock()
        self._published: list[uuid.UUID] = []
        self._abandoned = False
        self._progressed_at = time.monotonic()

    @property
    def abandoned(self) -> bool:
        """The caller gave up: send nothing more."""
        return self._abandoned

    def idle(self) -> float:
        """Seconds since the last message went out (or since the call began)."""
        return time.monotonic() - self._progressed_at

    def sent(self, job_id: uuid.UUID) -> None:
        """Record a message the broker took."""
        self.sent_all([job_id])

    def sent_all(self, job_ids: Sequence[uuid.UUID]) -> None:
        """Record messages the broker took."""
        with self._lock:
            self._published.extend(job_ids)
            self._progressed_at = time.monotonic()
        self._progress()

    def working(self) -> None:
        """Note progress short of the broker's answer: a message built and buffered.

        A batch is answered only at its end; until then each message made ready counts
        as progress, and the wait for the answer itself is bounded by the socket's.
        """
        with self._lock:
            self._progressed_at = time.monotonic()
        self._progress()

    def published(self) -> list[uuid.UUID]:
        """The jobs whose messages went out so far."""
        with self._lock:
            return list(self._published)

    def abandon(self) -> list[uuid.UUID]:
        """Stop the sender before its next message; the jobs it had sent by now."""
        with self._lock:
            self._abandoned = True
            return list(self._published)


class Senders:
    """Up to `size` daemon threads that carry publishes; an idle one ends after a while.

    Daemon threads rather than an executor: a process that exits while one is stuck on a
    frozen broker must not wait for it.
    """

    def __init__(self, size: int, on_exit: Callable[[], None]) -> None:
        self._size = size
        self._on_exit = on_exit
        self._reset()
        # Threads do not survive a fork: a prefork child starts its own on first use.
        ref = weakref.ref(self)

        def forget_in_child() -> None:
            senders = ref()
            if senders is not None:
                senders._reset()

        os.register_at_fork(after_in_child=forget_in_child)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0

    def submit(self, task: Callable[[], None]) -> None:
        """Run `task` on a sender thread; a new one starts when none is idle (up to `size`)."""
        with self._lock:
            self._tasks.put(task)
            if self._idle == 0 and self._threads < self._size:
                self._threads += 1
                threading.Thread(
                    target=self._serve,
                    args=(self._tasks,),
                    name=f"conveyor-publish-{self._threads}",
                    daemon=True,
                ).start()

    def _serve(self, tasks: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                task = tasks.get(timeout=SENDER_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    # Checked under the lock `submit` puts under: no task is left behind.
                    if tasks.empty():
                        self._threads -= 1
                        break
                continue
            with self._lock:
                self._idle -= 1
            try:
                task()
            except BaseException:
                with self._lock:
                    self._threads -= 1
                raise
        self._on_exit()
