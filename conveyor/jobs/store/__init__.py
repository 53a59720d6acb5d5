"""The job store: one function per state transition, each a conditional UPDATE.

Every function takes the caller's session and never commits: the caller owns the
transaction. What depends on the database lives in a driver (`driver.Driver`, with
`postgres` and `sqlite` implementations); the modules here are written once on top:
`transitions` and `cancellation` move jobs, `leases` renews and rescues runs,
`publication` keeps the outbox's books, `reads` and `dead_letters` serve the API,
`gauges` count, and `locks` serialize on names.
"""

from __future__ import annotations

from conveyor.jobs.models import Job, JobError, JobEvent, NewJob, utcnow
from conveyor.jobs.store.cancellation import cancel, requeue, stopped
from conveyor.jobs.store.dead_letters import dead_groups, delete_dead, list_dead
from conveyor.jobs.store.driver import Driver, database_now, driver_for
from conveyor.jobs.store.gauges import (
    count_running,
    counts_by_queue,
    dead_counts_by_task,
    finished_since,
    oldest_queued_by_queue,
)
from conveyor.jobs.store.leases import expired_leases, extend_stop_windows, renew_leases, rescue
from conveyor.jobs.store.locks import lock_idempotency_key, lock_limit_key, try_transaction_lock
from conveyor.jobs.store.publication import (
    due_for_publish,
    forget_overtaken_publications,
    forget_publication,
    forget_publications,
    forget_stale_publications,
    mark_published,
)
from conveyor.jobs.store.reads import (
    find_by_idempotency_key,
    finished_among,
    get_job,
    jobs_among,
    list_events,
    list_jobs,
    list_jobs_page,
)
from conveyor.jobs.store.transitions import (
    claim,
    create_job,
    create_jobs,
    dead,
    defer,
    exhaust,
    fail_retry,
    is_terminal,
    promote,
    record_dropped_delivery,
    release,
    succeed,
)

__all__ = [
    "Driver",
    "Job",
    "JobError",
    "JobEvent",
    "NewJob",
    "cancel",
    "claim",
    "count_running",
    "counts_by_queue",
    "create_job",
    "create_jobs",
    "database_now",
    "dead",
    "dead_counts_by_task",
    "dead_groups",
    "defer",
    "delete_dead",
    "driver_for",
    "due_for_publish",
    "exhaust",
    "expired_leases",
    "extend_stop_windows",
    "fail_retry",
    "find_by_idempotency_key",
    "finished_among",
    "finished_since",
    "forget_overtaken_publications",
    "forget_publication",
    "forget_publications",
    "forget_stale_publications",
    "get_job",
    "is_terminal",
    "jobs_among",
    "list_dead",
    "list_events",
    "list_jobs",
    "list_jobs_page",
    "lock_idempotency_key",
    "lock_limit_key",
    "mark_published",
    "oldest_queued_by_queue",
    "promote",
    "record_dropped_delivery",
    "release",
    "renew_leases",
    "requeue",
    "rescue",
    "stopped",
    "succeed",
    "try_transaction_lock",
    "utcnow",
]
