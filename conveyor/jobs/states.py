"""The job states of the contract and the transitions allowed between them."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Every state a job can be in; mirrored by a CHECK constraint on `jobs.state`."""

    # In: a workflow step recorded with parents, or resumed when a parent is retried.
    # Out: queued when its parents are done (the workflow trigger), cancelled.
    PENDING = "pending"
    # In: store.create_job with a future run time, store.defer (over a flow-control limit).
    # Out: store.promote when due, store.cancel.
    SCHEDULED = "scheduled"
    # In: store.create_job, store.promote, store.requeue, store.release. Out: store.claim, cancel.
    QUEUED = "queued"
    # In: store.claim by a worker holding a lease.
    # Out: succeed, fail_retry, dead, release, cancel, rescue (lease expired).
    RUNNING = "running"
    # In: store.fail_retry after a retryable failure. Out: store.promote when due, store.cancel.
    RETRYING = "retrying"
    # In: store.succeed. Terminal.
    SUCCEEDED = "succeeded"
    # In: store.dead (attempts exhausted or permanent error), store.exhaust.
    # Out: store.requeue (replay).
    DEAD = "dead"
    # In: store.cancel. Out: store.requeue (retry by a user).
    CANCELLED = "cancelled"


# A workflow's states: running while any step is unfinished, then succeeded if every step
# did, else failed; cancelled once cancelled.
WORKFLOW_STATES = ("running", "succeeded", "failed", "cancelled")

TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})
WAITING_STATES = frozenset({JobState.SCHEDULED, JobState.RETRYING})
CANCELLABLE_STATES = frozenset(
    {JobState.PENDING, JobState.SCHEDULED, JobState.QUEUED, JobState.RETRYING, JobState.RUNNING}
)
REQUEUEABLE_STATES = frozenset({JobState.DEAD, JobState.CANCELLED})

# Every edge the store may take; the unit tests hold the store to this table.
TRANSITIONS: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.PENDING, JobState.SCHEDULED, JobState.QUEUED}),
    JobState.PENDING: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.SCHEDULED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.QUEUED: frozenset(
        {JobState.RUNNING, JobState.CANCELLED, JobState.DEAD, JobState.SCHEDULED}
    ),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.RETRYING,
            JobState.DEAD,
            JobState.QUEUED,
            JobState.CANCELLED,
        }
    ),
    JobState.RETRYING: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.DEAD: frozenset({JobState.QUEUED, JobState.PENDING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.PENDING}),
}


def can_move(source: JobState | None, target: JobState) -> bool:
    """Whether the state machine allows moving from `source` to `target`."""
    return target in TRANSITIONS[source]


class Priority(StrEnum):
    """A job's priority; each maps to its own queue and worker pool."""

    HIGH = "high"
    DEFAULT = "default"
    LOW = "low"
