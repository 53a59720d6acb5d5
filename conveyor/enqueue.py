"""Transactional enqueue for Python applications that share Conveyor's database.

    from conveyor.enqueue import enqueue

    with Session(engine) as session, session.begin():
        session.add(order)
        enqueue(session, "webhook.deliver", {"url": ..., "body": ...}, tenant="shop")

The job is recorded in the caller's session and transaction. Its message is published
only after that transaction commits, and never if it rolls back. If the process stops
between the commit and the publish, the relay publishes the job a few seconds later.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from conveyor.config import get_settings
from conveyor.jobs import outbox, store
from conveyor.jobs.models import Job
from conveyor.jobs.outbox import Publisher
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

PENDING = "conveyor_pending_jobs"
_default_publisher: Publisher | None = None
_lock = threading.Lock()


def default_publisher() -> Publisher:
    """A publisher on the configured broker, built once per process."""
    global _default_publisher
    with _lock:
        if _default_publisher is None:
            from conveyor.worker.app import create_celery

            _default_publisher = create_celery(get_settings()).conveyor_publisher
        return _default_publisher


def enqueue(
    session: Session,
    task: str,
    payload: Any,
    *,
    tenant: str = "default",
    priority: str | None = None,
    run_at: dt.datetime | None = None,
    delay_seconds: float | None = None,
    max_attempts: int | None = None,
    timeout_seconds: float | None = None,
    tags: list[str] | None = None,
    publisher: Publisher | None = None,
) -> Job:
    """Record a job in `session`'s transaction; publish it once that transaction commits.

    Raises UnknownTask or pydantic's ValidationError, like the API's 422.
    """
    new = build_new_job(
        registry,
        tenant=tenant,
        task=task,
        payload=payload,
        priority=priority,
        run_at=run_at,
        delay_seconds=delay_seconds,
        max_attempts=max_attempts,
        timeout_seconds=timeout_seconds,
        tags=tags,
    )
    job = store.create_job(session, new)
    _watch(session)
    session.info.setdefault(PENDING, []).append((job, publisher))
    return job


def _watch(session: Session) -> None:
    if session.info.get("conveyor_watched"):
        return
    session.info["conveyor_watched"] = True

    @event.listens_for(session, "after_commit")
    def _publish(committed: Session) -> None:
        pending = committed.info.pop(PENDING, [])
        if not pending:
            return
        sessions = sessionmaker(bind=committed.get_bind())
        by_publisher: dict[int, tuple[Publisher, list[Job]]] = {}
        for job, chosen in pending:
            target = chosen or default_publisher()
            by_publisher.setdefault(id(target), (target, []))[1].append(job)
        for target, jobs in by_publisher.values():
            outbox.publish_recorded(sessions, target, jobs)

    @event.listens_for(session, "after_rollback")
    def _forget(rolled_back: Session) -> None:
        rolled_back.info.pop(PENDING, None)
