"""Recording jobs and handing them to the broker after commit (the outbox).

A job exists once its row commits; the broker only carries a message naming it.
The row is committed first and published after, so a crash in between leaves a
row with no `published_at`, which the relay publishes later. A publish that
fails is not an error for the submitter: the job is recorded and will run.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs.db import recorder_for
from conveyor.jobs.models import Job, NewJob

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Hands jobs' messages to the broker; raises when the broker does not take them."""

    def publish(self, jobs: Sequence[Job]) -> list[uuid.UUID]:
        """Publish a message per job to its queue; returns the ids actually published.

        A job waiting far ahead may be left to the relay and not be returned. Returns or
        raises within about a second even when the broker does not answer; the error may
        carry `published`, the ids whose messages went out before it.
        """
        ...


def publish_ready(publisher: Publisher, jobs: Sequence[Job]) -> tuple[list[uuid.UUID], bool]:
    """Publish the jobs not yet published: the ids that went out, and whether all did.

    A refused publish is not an error for the caller: the relay publishes those jobs
    later. What went out before a failure is still returned; it needs no second message.
    """
    ready = [job for job in jobs if job.published_at is None]
    if not ready:
        return [], True
    try:
        return list(publisher.publish(ready)), True
    except Exception as error:  # the relay publishes these later
        log.warning("publish failed, the relay will retry: %s", error)
        return [i for i in getattr(error, "published", ()) if isinstance(i, uuid.UUID)], False


def publish_recorded(
    sessions: sessionmaker[Session], publisher: Publisher, jobs: Sequence[Job]
) -> bool:
    """Publish committed jobs and mark them published (a moment later, with the other
    marks of the process: `conveyor.jobs.marks`); False if the broker refused."""
    published, taken = publish_ready(publisher, jobs)
    recorder_for(sessions).mark_published_soon(published)
    return taken


def submit(
    sessions: sessionmaker[Session], publisher: Publisher, new_jobs: Sequence[NewJob]
) -> list[Job]:
    """Record jobs (on PostgreSQL one statement, committed by itself), then publish them."""
    jobs = recorder_for(sessions).record(new_jobs)
    publish_recorded(sessions, publisher, jobs)
    return jobs
