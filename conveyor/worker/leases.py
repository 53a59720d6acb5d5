"""Keeping the leases of running jobs alive, and noticing when a job is taken away.

Each worker process renews the leases of the jobs it is running from one background
thread. A job whose lease cannot be renewed was cancelled or rescued: its run is told
to stop, and if it does not stop by itself within a grace, it is stopped by force.
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

from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs import store

log = logging.getLogger(__name__)


class JobCancelled(BaseException):
    """Raised inside a run whose job was cancelled while it ran.

    A BaseException, so task code catching Exception does not swallow it.
    """


class JobTimedOut(Exception):
    """Raised inside a run that outlived its time limit where Celery cannot enforce one."""


@dataclass
class Held:
    """A run this process is holding."""

    attempt: int
    thread_id: int
    deadline: float | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    lost_at: float | None = None


def _raise_in_thread(thread_id: int, error: type[BaseException] = JobCancelled) -> bool:
    """Raise `error` in another thread of this process at its next bytecode."""
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(error)
    )
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
    ) -> None:
        self._sessions = sessions
        self._worker = worker
        self._lease_seconds = lease_seconds
        self._interval = interval
        self._stop_grace = stop_grace
        self.kill_process = kill_process
        self._held: dict[uuid.UUID, Held] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._renewed_at = time.monotonic()
        self._pid = -1

    def hold(
        self, job_id: uuid.UUID, attempt: int, timeout: float | None = None
    ) -> threading.Event:
        """Start renewing a run's lease; the returned event is set if the job is taken away.

        Outside a prefork child (where Celery enforces time limits), a run still going
        after `timeout` seconds gets JobTimedOut raised in it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        held = Held(attempt, threading.get_ident(), deadline)
        with self._lock:
            self._held[job_id] = held
            self._ensure_thread()
        return held.lost

    def drop(self, job_id: uuid.UUID) -> None:
        """Stop renewing a run's lease (it finished)."""
        with self._lock:
            self._held.pop(job_id, None)

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
            held = list(self._held.items())
        for job_id, h in held:
            if h.lost_at is None:
                h.lost_at = time.monotonic()
                h.lost.set()
                log.warning("lease of job %s could not be renewed; stopping it", job_id)
            elif time.monotonic() - h.lost_at >= self._stop_grace:
                self._force_stop(job_id, h)

    def renew_once(self) -> None:
        """Renew every held lease once, and stop the runs that lost theirs."""
        with self._lock:
            held = {job_id: h for job_id, h in self._held.items()}
        if not held:
            self._renewed_at = time.monotonic()
            return
        with self._sessions().begin() as session:
            still = store.renew_leases(
                session,
                [(job_id, h.attempt) for job_id, h in held.items()],
                worker=self._worker(),
                lease_seconds=self._lease_seconds,
            )
        now = time.monotonic()
        self._renewed_at = now
        for job_id, h in held.items():
            if job_id in still:
                if not self.kill_process and h.deadline is not None and now > h.deadline:
                    h.deadline = None
                    log.warning("job %s passed its time limit; stopping the attempt", job_id)
                    _raise_in_thread(h.thread_id, JobTimedOut)
                continue
            if h.lost_at is None:
                h.lost_at = now
                h.lost.set()
                log.info("job %s was taken away (cancelled or rescued); stopping it", job_id)
            elif now - h.lost_at >= self._stop_grace:
                self._force_stop(job_id, h)

    def _force_stop(self, job_id: uuid.UUID, held: Held) -> None:
        log.warning("job %s did not stop by itself; stopping it by force", job_id)
        with self._lock:
            self._held.pop(job_id, None)
        if self.kill_process:
            # A prefork child: its pool replaces it, and the unacknowledged message
            # comes back and is dropped, since the job is no longer queued.
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            _raise_in_thread(held.thread_id)
