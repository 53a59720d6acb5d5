"""The claim of a delivered job through its flow-control limits, in the store's transactions.

Task types without limits are claimed by one statement on the fast path (`FastPath`);
the rest, and every delivery the fast path refuses, come here. A delivery reads its row
once: the gate applies the limits to that row, and a refused claim is explained from it
(no attempts left), from what a rescue or a promotion returned, or, when the row moved
since it was read, by one more read.
"""

from __future__ import annotations

import datetime as dt
import enum
import random
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conveyor import lazy
from conveyor.config import TaskLimits
from conveyor.jobs.models import Job, JobError
from conveyor.jobs.states import JobState
from conveyor.observability import logs, metrics
from conveyor.worker.context import Outcome, job_context

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from conveyor.jobs import db, store
    from conveyor.worker import limiter as limiting
    from conveyor.worker.limiter import Limiter
else:
    # Loaded by the first claim that needs a transaction (see conveyor.lazy).
    db = lazy.module("conveyor.jobs.db")
    store = lazy.module("conveyor.jobs.store")
    limiting = lazy.module("conveyor.worker.limiter")

log = logs.get(__name__)

# A reserved slot this close is taken as now: waiting for less is not worth it.
SLOT_SLACK = dt.timedelta(milliseconds=2)
WAITING_STATES = (JobState.SCHEDULED, JobState.RETRYING)


class ClaimKind(enum.Enum):
    """How a delivery's claim ended."""

    CLAIMED = "claimed"  # this delivery runs the job
    WAIT = "wait"  # it holds a rate-limit slot and claims after waiting for it
    DEFERRED = "deferred"  # over a limit: the job waits in the store, published when due
    DROPPED = "dropped"  # a duplicate: the job is gone, running elsewhere, finished, waiting
    EXHAUSTED = "exhausted"  # delivered with no attempts left: the job is dead


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery's claim: its kind, and the row or state that goes with it.

    `row` is the claimed job (CLAIMED) or the job as read before waiting for a slot
    (WAIT); `state` is the job's state when it is not run (DROPPED).
    """

    kind: ClaimKind
    job_id: uuid.UUID
    row: Job | None = None
    state: JobState | None = None
    wait_seconds: float = 0.0

    @classmethod
    def claimed(cls, job: Job) -> Claim:
        """This delivery holds the job's lease and runs it."""
        return cls(ClaimKind.CLAIMED, job.id, row=job, state=job.state)

    @classmethod
    def wait(cls, job: Job, seconds: float) -> Claim:
        """A slot is held for the job: claim it after `seconds`."""
        return cls(ClaimKind.WAIT, job.id, row=job, wait_seconds=seconds)

    @classmethod
    def deferred(cls, job_id: uuid.UUID) -> Claim:
        """The job was moved to `scheduled` by a limit."""
        return cls(ClaimKind.DEFERRED, job_id, state=JobState.SCHEDULED)

    @classmethod
    def dropped(cls, job_id: uuid.UUID, state: JobState | None) -> Claim:
        """This delivery must not run the job, found in `state` (None: no such job)."""
        return cls(ClaimKind.DROPPED, job_id, state=state)

    @classmethod
    def exhausted(cls, job_id: uuid.UUID) -> Claim:
        """The job had no attempts left and is dead."""
        return cls(ClaimKind.EXHAUSTED, job_id, state=JobState.DEAD)

    @property
    def job(self) -> Job:
        """The claimed job; only a claim of kind CLAIMED has one."""
        if self.kind is not ClaimKind.CLAIMED or self.row is None:
            raise ValueError(f"a {self.kind.value} claim holds no job")
        return self.row

    def outcome(self) -> Outcome:
        """The delivery's outcome when the claim did not lead to a run."""
        if self.kind is ClaimKind.DEFERRED:
            return Outcome(self.job_id, "deferred", JobState.SCHEDULED)
        if self.kind is ClaimKind.DROPPED:
            return Outcome(self.job_id, "dropped", self.state)
        if self.kind is ClaimKind.EXHAUSTED:
            return Outcome(self.job_id, "ran-dead", JobState.DEAD)
        raise ValueError(f"a {self.kind.value} claim has no outcome of its own")


class GateKind(enum.Enum):
    """What a job's limits say about claiming it now."""

    OPEN = "open"  # claim it now, counted under `limit_key`
    WAIT = "wait"  # claim it once the slot held for it comes
    DEFERRED = "deferred"  # the job was moved to `scheduled`


@dataclass(frozen=True, slots=True)
class Gate:
    """The answer of a job's limits."""

    kind: GateKind
    limit_key: str | None = None
    wait_seconds: float = 0.0


class Claimer:
    """Claims delivered jobs in transactions of their own, applying flow-control limits."""

    def __init__(
        self,
        *,
        lease_seconds: float,
        limits: dict[str, TaskLimits],
        limiter: Limiter | None,
        rate_horizon: float,
    ) -> None:
        self._lease_seconds = lease_seconds
        self._limits = limits
        self._limiter = limiter
        self._rate_horizon = rate_horizon

    def claim(self, sessions: sessionmaker[Session], job_id: uuid.UUID, worker: str) -> Claim:
        """Claim the job for `worker`, or say why this delivery does not run it (never WAIT)."""
        # A rate-limit slot is waited for outside any transaction (no lock is held while
        # waiting); the claim that follows does not reserve again.
        with sessions.begin() as session:
            first = self._claim_in(session, job_id, worker)
        if first.kind is not ClaimKind.WAIT or first.row is None:
            return first
        if first.wait_seconds > 0:
            time.sleep(first.wait_seconds)
        with sessions.begin() as session:
            # The row read before the wait gives the gate the task and limit key, which
            # do not change; the claim checks the state it is in now.
            return self._take(session, first.row, worker, holds_slot=True, revive=True)

    def _claim_in(self, session: Session, job_id: uuid.UUID, worker: str) -> Claim:
        """One transaction's claim, before any slot is held."""
        if self._limits:
            # The gate needs the row; a claim refused below is explained from it.
            current = store.get_job(session, job_id)
            if current is not None and current.state == JobState.QUEUED:
                return self._take(session, current, worker, holds_slot=False, revive=True)
        else:
            job = self._store_claim(session, job_id, worker, None)
            if job is not None:
                return Claim.claimed(job)
            current = store.get_job(session, job_id)
        return self._unclaimed(session, job_id, current, worker, holds_slot=False, revive=True)

    def _take(
        self, session: Session, current: Job, worker: str, *, holds_slot: bool, revive: bool
    ) -> Claim:
        """Claim a job read as queued, through its limits."""
        gate = self._gate(session, current, holds_slot)
        if gate.kind is GateKind.DEFERRED:
            return Claim.deferred(current.id)
        if gate.kind is GateKind.WAIT:
            return Claim.wait(current, gate.wait_seconds)
        job = self._store_claim(session, current.id, worker, gate.limit_key)
        if job is not None:
            return Claim.claimed(job)
        if current.attempts >= current.max_attempts:
            return self._not_run(session, current, worker)
        # The row has moved on since it was read: see where it is now.
        moved = store.get_job(session, current.id)
        return self._unclaimed(
            session, current.id, moved, worker, holds_slot=holds_slot, revive=revive
        )

    def _unclaimed(
        self,
        session: Session,
        job_id: uuid.UUID,
        current: Job | None,
        worker: str,
        *,
        holds_slot: bool,
        revive: bool,
    ) -> Claim:
        """A job found not claimable: take it back if its run or its wait is over, else drop."""
        if current is None:
            return Claim.dropped(job_id, None)
        revived = self._revive(session, current) if revive else None
        if revived is not None and revived.state == JobState.QUEUED:
            # Its last worker is gone, or its time has come: this delivery takes it.
            return self._take(session, revived, worker, holds_slot=holds_slot, revive=False)
        return self._not_run(session, revived or current, worker)

    @staticmethod
    def _revive(session: Session, current: Job) -> Job | None:
        """Rescue a run whose lease has expired, or promote a wait that is over."""
        if current.state == JobState.RUNNING:
            # Whether the lease has expired is the database's to say, not this host's clock.
            rescued = store.rescue(session, current.id)
            if rescued is not None and rescued.state == JobState.DEAD:
                metrics.count_finished(rescued, JobState.DEAD.value)
            return rescued
        if current.state in WAITING_STATES:
            return store.promote(session, current.id)
        return None

    def _not_run(self, session: Session, current: Job, worker: str) -> Claim:
        """End a job with no attempts left, or record this delivery as a duplicate."""
        if current.state == JobState.QUEUED and current.attempts >= current.max_attempts:
            # A message that keeps killing its worker ends here, counted in the store.
            return self._exhausted(session, current, worker)
        # Running elsewhere (or in another thread of this process), finished, or waiting:
        # this delivery is a duplicate and must not run.
        store.record_dropped_delivery(
            session, current, worker=worker, reason=f"job is {current.state.value}"
        )
        return Claim.dropped(current.id, current.state)

    def _store_claim(
        self, session: Session, job_id: uuid.UUID, worker: str, key: str | None
    ) -> Job | None:
        return store.claim(
            session, job_id, worker=worker, lease_seconds=self._lease_seconds, limit_key=key
        )

    def _gate(self, session: Session, current: Job, holds_slot: bool) -> Gate:
        """Apply a queued job's limits: its limit key, a slot to wait for, or the job deferred."""
        spec = self._limits.get(current.task)
        if spec is None:
            return Gate(GateKind.OPEN)
        key = limiting.limit_key(spec, current.payload, current.tags)
        now = db.db_now(session)
        if spec.concurrency and key is not None:
            store.lock_limit_key(session, f"{current.task}|{key}")
            if store.count_running(session, task=current.task, limit_key=key) >= spec.concurrency:
                wait = dt.timedelta(seconds=random.uniform(0.3, 0.8))
                metrics.JOBS_DEFERRED.labels(current.task, "concurrency").inc()
                return self._defer(session, current, run_after=now + wait, reason="concurrency")
        if holds_slot or self._limiter is None or not (spec.rate or spec.key_rate):
            return Gate(GateKind.OPEN, key)
        pause = 0.0
        names = []
        if spec.rate:
            names.append((current.task, 1 / spec.rate))
        if spec.key_rate and key is not None:
            names.append((f"{current.task}|{key}", 1 / spec.key_rate))
        for name, interval in names:
            answer = self._limiter.reserve(session, name, interval, self._rate_horizon)
            if not answer.taken:
                # Every slot that near is taken: come back when the limit has room.
                metrics.JOBS_DEFERRED.labels(current.task, "rate").inc()
                return self._defer(
                    session, current, run_after=answer.at, slot_at=answer.at, reason="rate"
                )
            pause = max(pause, answer.wait_seconds)
        if pause > SLOT_SLACK.total_seconds():
            return Gate(GateKind.WAIT, key, pause)
        return Gate(GateKind.OPEN, key)

    @staticmethod
    def _defer(
        session: Session,
        current: Job,
        *,
        run_after: dt.datetime,
        reason: str,
        slot_at: dt.datetime | None = None,
    ) -> Gate:
        """Move the job to `scheduled` until `run_after`, if it is still queued."""
        deferred = store.defer(
            session, current.id, run_after=run_after, slot_at=slot_at, reason=reason
        )
        if deferred is not None:
            return Gate(GateKind.DEFERRED)
        # No longer queued: the claim that follows is refused and the row read again.
        return Gate(GateKind.OPEN)

    @staticmethod
    def _exhausted(session: Session, job: Job, worker: str) -> Claim:
        error = JobError("AttemptsExhausted", "delivered with no attempts left", None, None)
        if store.exhaust(session, job.id, worker=worker, error=error) is not None:
            metrics.count_finished(job, JobState.DEAD.value)
            with logs.bound(**job_context(job)):
                log.warning("job dead: delivered with no attempts left")
        return Claim.exhausted(job.id)
