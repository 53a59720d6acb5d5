"""Keeping the leases of running jobs alive, and noticing when a job is taken away.

Each worker process renews the leases of the runs it holds from one background thread.
A run is known by its job id and its lease token (a new token for every claim), so a
stale run and a newer run of the same job are never confused. A run whose lease cannot
be renewed was cancelled or rescued: it is told to stop, and if it does not stop by
itself within a grace, it is stopped by force. Every stop acts only on the run it was
meant for: it is decided and delivered under the keeper's lock, while that run is still
held, and a run that ends clears any stop still pending for its thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conveyor import lazy

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from conveyor.jobs import store
    from conveyor.jobs.fastpath import FastPath
else:
    # On PostgreSQL the renewals go on the fast path and never load it (conveyor.lazy).
    store = lazy.module("conveyor.jobs.store")

log = logging.getLogger(__name__)


class JobCancelled(BaseException):
    """Raised inside a run whose job was cancelled while it ran.

    A BaseException, so task code catching Exception does not swallow it.
    """


class JobTimedOut(Exception):
    """Raised inside a run that outlived its time limit where Celery cannot enforce one."""


RunKey = tuple[uuid.UUID, int]


@dataclass(eq=False)
class Held:
    """A run this process is holding: its job, its lease token and the thread it runs on."""

    job_id: uuid.UUID
    token: int
    thread_id: int
    deadline: float | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    lost_at: float | None = None
    # Set once an exception was sent into the run's thread; the run clears it if it
    # ends before the exception arrives, so it cannot surface in the next job.
    interrupted: bool = False
    forced: bool = False
    # The run's code has ended and its outcome is being written: the lease is still
    # renewed, but no stop is ever sent to the thread, which has moved on.
    detached: bool = False

    @property
    def key(self) -> RunKey:
        """(job id, lease token)."""
        return (self.job_id, self.token)


def _set_async_exc(thread_id: int, error: type[BaseException] | None) -> bool:
    """Raise `error` in another thread at its next bytecode; None clears a pending one."""
    target = ctypes.py_object(error) if error is not None else None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)
    return bool(done == 1)


class LeaseKeeper:
    """Renews leases every `interval` seconds for the runs of this process."""

    def __init__(
        self,
        *,
        sessions: Callable[[], sessionmaker[Session]],
        worker: Callable[[], str],
        lease_seconds: float,
        interval: float,
        stop_grace: float = 2.0,
        kill_process: bool = False,
        fast_path: FastPath | None = None,
    ) -> None:
        self._sessions = sessions
        self._fast_path = fast_path
        self._worker = worker
        self._lease_seconds = lease_seconds
        self._interval = interval
        self._stop_grace = stop_grace
        self.kill_process = kill_process
        self._held: dict[RunKey, Held] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._renewed_at = time.monotonic()
        self._pid = -1

    def hold(self, job_id: uuid.UUID, token: int, timeout: float | None = None) -> threading.Event:
        """Start renewing a run's lease; the returned event is set if the job is taken away.

        Outside a prefork child (where Celery enforces time limits), a run still going
        after `timeout` seconds gets JobTimedOut raised in it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        held = Held(job_id, token, threading.get_ident(), deadline)
        with self._lock:
            self._held[held.key] = held
            self._ensure_thread()
        return held.lost

    def drop(self, job_id: uuid.UUID, token: int) -> None:
        """Stop renewing a run's lease (it ended); clear any stop not yet delivered to it."""
        with self._lock:
            held = self._held.pop((job_id, token), None)
            if held is not None and held.interrupted and held.thread_id == threading.get_ident():
                _set_async_exc(held.thread_id, None)

    def detach(self, job_id: uuid.UUID, token: int) -> None:
        """The run's code ended; keep its lease until `drop`, but never stop its thread."""
        with self._lock:
            held = self._held.get((job_id, token))
            if held is None:
                return
            if held.interrupted and held.thread_id == threading.get_ident():
                _set_async_exc(held.thread_id, None)
            held.detached = True
            held.deadline = None

    def holds(self, job_id: uuid.UUID, token: int) -> bool:
        """Whether this process still holds the run."""
        with self._lock:
            return (job_id, token) in self._held

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="conveyor-leases", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval)
            try:
                self.renew_once()
            except Exception as error:  # the database may be away for a while
                log.warning("could not renew leases: %s", error)
                self._fence()

    def _fence(self) -> None:
        """Stop every run once its lease may have expired unrenewed: rescue may take it."""
        unrenewed = time.monotonic() - self._renewed_at
        if unrenewed < self._lease_seconds - 2 * self._interval - self._stop_grace:
            return
        with self._lock:
            for held in list(self._held.values()):
                self._lose(held, time.monotonic(), "its lease could not be renewed")

    def renew_once(self) -> None:
        """Renew every held lease once, and stop the runs that lost theirs."""
        with self._lock:
            snapshot = list(self._held.values())
        if not snapshot:
            self._renewed_at = time.monotonic()
            return
        running = [h.key for h in snapshot if h.lost_at is None]
        # A run told to stop still lives: a retry of its job must wait for it.
        stopping = [h.key for h in snapshot if h.lost_at is not None]
        lease = self._lease_seconds
        if self._fast_path is not None:
            still = self._fast_path.renew(running, stopping, lease_seconds=lease)
        else:
            with self._sessions().begin() as session:
                still = store.renew_leases(session, running, lease_seconds=lease)
                store.extend_stop_windows(session, stopping, lease_seconds=lease)
        now = time.monotonic()
        self._renewed_at = now
        with self._lock:
            for held in snapshot:
                # The round trip took time: act only on runs that are still the ones held.
                if self._held.get(held.key) is not held:
                    continue
                if held.key not in still:
                    self._lose(held, now, "it was cancelled or taken away")
                elif not self.kill_process and held.deadline is not None and now > held.deadline:
                    held.deadline = None
                    log.warning("job %s passed its time limit; stopping the attempt", held.job_id)
                    held.interrupted = True
                    _set_async_exc(held.thread_id, JobTimedOut)

    def _lose(self, held: Held, now: float, why: str) -> None:
        """Tell a held run to stop; stop it by force after the grace. Caller holds the lock."""
        if held.lost_at is None:
            held.lost_at = now
            held.lost.set()
            log.info("job %s: %s; stopping it", held.job_id, why)
        elif not held.forced and not held.detached and now - held.lost_at >= self._stop_grace:
            self._force_stop(held)

    def _force_stop(self, held: Held) -> None:
        """Stop the run by force; the caller holds the lock and saw the run still held."""
        log.warning("job %s did not stop by itself; stopping it by force", held.job_id)
        # It stays held until its run ends (drop), so that a stop still pending then
        # is cleared instead of reaching whatever the thread runs next.
        held.forced = True
        if self.kill_process:
            # A prefork child: its pool replaces it, and the unacknowledged message
            # comes back and is dropped, since the job is no longer queued.
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            held.interrupted = True
            _set_async_exc(held.thread_id, JobCancelled)
