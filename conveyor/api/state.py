"""What the API's routes share: settings, the job store, the publisher, probes."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from sqlalchemy.orm import Session, sessionmaker

from conveyor.api.ratelimit import RateLimiter
from conveyor.api.waiting import Waiters
from conveyor.config import Settings
from conveyor.jobs import keys, store
from conveyor.jobs.db import make_engine, make_session_factory
from conveyor.jobs.group_commit import GroupCommitter
from conveyor.jobs.models import Job
from conveyor.jobs.outbox import Publisher
from conveyor.jobs.replica import ReadSessions
from conveyor.jobs.store import workflows as flows
from conveyor.jobs.store.workflows import Workflow

KEY_CACHE_SECONDS = 10.0
# How long a request waits on a broker probe (readiness, queue depths): a frozen broker
# must cost /readyz and /v1/queues this much, not the whole outage.
PROBE_SECONDS = 1.5

T = TypeVar("T")


class _Flight(Generic[T]):
    """One run of a probe on its own thread, and what it came back with."""

    def __init__(self, probe: Callable[[], T]) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: Exception | None = None
        self._probe = probe
        threading.Thread(target=self._run, name="conveyor-broker-probe", daemon=True).start()

    def _run(self) -> None:
        try:
            self.value = self._probe()
        except Exception as error:
            self.error = error
        finally:
            self.done.set()


class BoundedProbe(Generic[T]):
    """Calls a probe on a thread of its own and waits for it at most `seconds`.

    One run at a time: while a run is stuck on a frozen broker, later callers wait on that
    same run instead of starting another, so an outage ties up one thread, not one per
    request.
    """

    def __init__(self, probe: Callable[[], T], seconds: float = PROBE_SECONDS) -> None:
        self.seconds = seconds
        self._probe = probe
        self._lock = threading.Lock()
        self._flight: _Flight[T] | None = None
        self._pid = os.getpid()

    def __call__(self) -> T:
        """The probe's answer; TimeoutError when it does not come within `seconds`."""
        with self._lock:
            flight = self._flight
            # A forked process has no thread behind an inherited run.
            if flight is None or flight.done.is_set() or self._pid != os.getpid():
                flight = self._flight = _Flight(self._probe)
                self._pid = os.getpid()
        if not flight.done.wait(self.seconds):
            raise TimeoutError(f"no answer within {self.seconds:g} s")
        if flight.error is not None:
            raise flight.error
        return cast(T, flight.value)


@dataclass
class KeyCache:
    """Recently seen keys by hash: most requests skip the lookup; revocations show in seconds."""

    ttl: float = KEY_CACHE_SECONDS
    _entries: dict[str, tuple[float, keys.ApiKey | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cached(self, presented: str) -> tuple[bool, keys.ApiKey | None]:
        """(True, the key or None) when the cache answers for this secret; else (False, None)."""
        with self._lock:
            cached = self._entries.get(keys.hash_key(presented))
        if cached is not None and time.monotonic() - cached[0] < self.ttl:
            return True, cached[1]
        return False, None

    def lookup(self, sessions: sessionmaker[Session], presented: str) -> keys.ApiKey | None:
        """The live key for a presented secret, or None."""
        known, found = self.cached(presented)
        if known:
            return found
        digest = keys.hash_key(presented)
        now = time.monotonic()
        with sessions() as session:
            found = keys.find_key(session, presented)
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[digest] = (now, found)
        return found


@dataclass
class ApiState:
    """Dependencies of the API, built once by whoever starts it."""

    settings: Settings
    sessions: sessionmaker[Session]
    publisher: Publisher
    broker_check: Callable[[], None]
    queue_depths: Callable[[], dict[str, int]] | None = None
    key_cache: KeyCache = field(default_factory=KeyCache)
    limiter: RateLimiter | None = None
    committer: GroupCommitter = field(init=False)
    read_sessions: ReadSessions = field(init=False)
    waiters: Waiters[Job] = field(init=False)
    workflow_waiters: Waiters[Workflow] = field(init=False)

    def __post_init__(self) -> None:
        # Routes call these on request threads: bound them whatever the broker does.
        if not isinstance(self.broker_check, BoundedProbe):
            self.broker_check = BoundedProbe(self.broker_check)
        if self.queue_depths is not None and not isinstance(self.queue_depths, BoundedProbe):
            self.queue_depths = BoundedProbe(self.queue_depths)
        self.committer = GroupCommitter(self.sessions, self.publisher)
        replica = None
        if self.settings.database_read_url:
            replica = make_session_factory(make_engine(self.settings.database_read_url))
        self.read_sessions = ReadSessions(self.sessions, replica)
        self.waiters = Waiters(self._finished_among)
        self.workflow_waiters = Waiters(self._finished_workflows_among)
        if self.limiter is None:
            self.limiter = RateLimiter(
                self.settings.api_rate_per_second, float(self.settings.api_rate_burst)
            )

    def _finished_among(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, Job]:
        with self.read_sessions() as session:
            return store.finished_among(session, job_ids)

    def _finished_workflows_among(self, workflow_ids: list[uuid.UUID]) -> dict[uuid.UUID, Workflow]:
        with self.read_sessions() as session:
            return flows.finished_workflows_among(session, workflow_ids)
