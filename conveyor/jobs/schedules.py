"""Users' schedules: cron or interval timing, and firing exactly one job per tick.

A tick is fired by inserting a job carrying (schedule id, tick); the unique key on that
pair makes a second firing of the same tick, by a second beat or a retry, a no-op.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import RowMapping, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from conveyor.jobs import store
from conveyor.jobs.models import Job, NewJob, NewStep
from conveyor.jobs.states import JobState
from conveyor.jobs.tables import jobs, schedules

MISFIRE_POLICIES = ("run_once", "skip")
MAX_CATCH_UP = 1000


class ScheduleError(ValueError):
    """A schedule's timing or time zone is invalid."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """One row of the schedules table."""

    id: uuid.UUID
    tenant: str
    name: str
    task: str
    payload: Any
    cron: str | None
    interval_seconds: float | None
    timezone: str
    enabled: bool
    priority: str | None
    misfire: str
    next_run_at: dt.datetime | None
    last_run_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row: RowMapping) -> Schedule:
        """Build from a row of the schedules table."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def zone(name: str) -> ZoneInfo:
    """The time zone called `name`; ScheduleError when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {name!r}") from None


def check_timing(cron: str | None, interval_seconds: float | None, timezone: str) -> None:
    """Raise ScheduleError unless exactly one valid timing and a known zone are given."""
    if (cron is None) == (interval_seconds is None):
        raise ScheduleError("give exactly one of cron and interval_seconds")
    if cron is not None and not croniter.is_valid(cron):
        raise ScheduleError(f"invalid cron expression {cron!r}")
    if interval_seconds is not None and not (0 < interval_seconds <= 366 * 86400):
        raise ScheduleError("interval_seconds must be above 0 and at most a year")
    zone(timezone)


def next_tick(
    *,
    cron: str | None,
    interval_seconds: float | None,
    timezone: str,
    after: dt.datetime,
    anchor: dt.datetime | None = None,
) -> dt.datetime:
    """The first tick strictly after `after`, in UTC.

    Cron expressions are read in the schedule's time zone; intervals count from
    `anchor` (the previous tick), or from `after` when there is none.
    """
    if cron is not None:
        local = after.astimezone(zone(timezone))
        following: dt.datetime = croniter(cron, local).get_next(dt.datetime)
        return following.astimezone(dt.UTC)
    assert interval_seconds is not None
    if anchor is None or anchor > after:
        return after + dt.timedelta(seconds=interval_seconds)
    steps = math.floor((after - anchor).total_seconds() / interval_seconds) + 1
    return anchor + dt.timedelta(seconds=steps * interval_seconds)


def create_schedule(
    session: Session,
    *,
    tenant: str,
    name: str,
    task: str,
    payload: Any,
    cron: str | None,
    interval_seconds: float | None,
    timezone: str = "UTC",
    enabled: bool = True,
    priority: str | None = None,
    misfire: str = "run_once",
    now: dt.datetime | None = None,
) -> Schedule:
    """Record a schedule; its first tick is the first one after now."""
    now = now or store.utcnow()
    check_timing(cron, interval_seconds, timezone)
    values = {
        "id": uuid.uuid4(),
        "tenant": tenant,
        "name": name,
        "task": task,
        "payload": payload,
        "cron": cron,
        "interval_seconds": interval_seconds,
        "timezone": timezone,
        "enabled": enabled,
        "priority": priority,
        "misfire": misfire,
        "next_run_at": next_tick(
            cron=cron, interval_seconds=interval_seconds, timezone=timezone, after=now
        ),
        "last_run_at": None,
        "created_at": now,
        "updated_at": now,
    }
    session.execute(insert(schedules), values)
    return Schedule(**values)


def get_schedule(session: Session, tenant: str, name: str) -> Schedule | None:
    """A tenant's schedule by name."""
    row = (
        session.execute(
            select(schedules).where(schedules.c.tenant == tenant, schedules.c.name == name)
        )
        .mappings()
        .first()
    )
    return None if row is None else Schedule.from_row(row)


def list_schedules(session: Session, tenant: str) -> list[Schedule]:
    """A tenant's schedules by name."""
    statement = select(schedules).where(schedules.c.tenant == tenant).order_by(schedules.c.name)
    return [Schedule.from_row(r) for r in session.execute(statement).mappings()]


def update_schedule(
    session: Session,
    schedule: Schedule,
    changes: dict[str, Any],
    *,
    now: dt.datetime | None = None,
) -> Schedule:
    """Apply changes; a new timing or a re-enable starts counting ticks from now."""
    now = now or store.utcnow()
    merged = {**{f.name: getattr(schedule, f.name) for f in fields(Schedule)}, **changes}
    check_timing(merged["cron"], merged["interval_seconds"], merged["timezone"])
    timing = {"cron", "interval_seconds", "timezone"} & set(changes)
    resumed = changes.get("enabled") is True and not schedule.enabled
    if timing or resumed:
        merged["next_run_at"] = next_tick(
            cron=merged["cron"],
            interval_seconds=merged["interval_seconds"],
            timezone=merged["timezone"],
            after=now,
        )
    merged["updated_at"] = now
    session.execute(
        update(schedules)
        .where(schedules.c.id == schedule.id)
        .values({k: v for k, v in merged.items() if k not in ("id", "tenant", "created_at")})
    )
    return Schedule(**merged)


def delete_schedule(session: Session, tenant: str, name: str) -> bool:
    """Remove a schedule; the jobs it created stay."""
    result = session.execute(
        delete(schedules)
        .where(schedules.c.tenant == tenant, schedules.c.name == name)
        .returning(schedules.c.id)
    )
    return result.first() is not None


def recent_runs(
    session: Session, schedule_id: uuid.UUID, limit: int = 10
) -> list[tuple[dt.datetime, Job]]:
    """The ticks of this schedule and the jobs they created, latest first."""
    statement = (
        select(jobs)
        .where(jobs.c.schedule_id == schedule_id)
        .order_by(jobs.c.schedule_tick.desc())
        .limit(limit)
    )
    return [(r["schedule_tick"], Job.from_row(r)) for r in session.execute(statement).mappings()]


def due_schedules(session: Session, *, now: dt.datetime, limit: int = 100) -> list[Schedule]:
    """Enabled schedules whose next tick has come, every tenant's."""
    statement = (
        select(schedules)
        .where(schedules.c.enabled.is_(True), schedules.c.next_run_at <= now)
        .order_by(schedules.c.next_run_at)
        .limit(limit)
    )
    return [Schedule.from_row(r) for r in session.execute(statement).mappings()]


def ticks_to_fire(
    schedule: Schedule, *, now: dt.datetime, misfire_grace_seconds: float
) -> tuple[list[dt.datetime], dt.datetime]:
    """The ticks to fire now, and the next tick after now.

    Ticks due within the grace fire one by one (a beat that took over a little late
    fires what its predecessor left). Older ticks were missed while no beat ran: the
    schedule's misfire policy fires the latest of them once, or skips them.
    """
    assert schedule.next_run_at is not None
    due: list[dt.datetime] = []
    tick = schedule.next_run_at
    while tick <= now and len(due) < MAX_CATCH_UP:
        due.append(tick)
        tick = next_tick(
            cron=schedule.cron,
            interval_seconds=schedule.interval_seconds,
            timezone=schedule.timezone,
            after=tick,
            anchor=tick,
        )
    if tick <= now:  # far behind: jump past now
        tick = next_tick(
            cron=schedule.cron,
            interval_seconds=schedule.interval_seconds,
            timezone=schedule.timezone,
            after=now,
            anchor=due[-1] if due else None,
        )
    horizon = now - dt.timedelta(seconds=misfire_grace_seconds)
    recent = [t for t in due if t >= horizon]
    missed = [t for t in due if t < horizon]
    fire = list(recent)
    if missed and schedule.misfire == "run_once" and not recent:
        fire = [missed[-1]]
    return fire, tick


def fire_workflows(
    session: Session,
    schedule: Schedule,
    runs: Sequence[tuple[dt.datetime, Sequence[NewStep]]],
    next_run_at: dt.datetime,
    *,
    name: str | None,
    tags: Sequence[str],
    now: dt.datetime,
) -> list[Job]:
    """For a schedule that fires a workflow: record one workflow per tick (its first step
    carries the schedule and tick, so a tick fired already is skipped as for jobs) and
    advance the schedule, as `fire` does; the steps to publish now."""
    from conveyor.jobs.store import workflows

    firsts = [
        (
            tick,
            [
                replace(
                    steps[0], job=replace(steps[0].job, schedule_id=schedule.id, schedule_tick=tick)
                ),
                *steps[1:],
            ],
        )
        for tick, steps in runs
    ]
    if not _advance(session, schedule, next_run_at, [tick for tick, _ in runs], now):
        return []
    ready: list[Job] = []
    for _tick, steps in firsts:
        try:
            with session.begin_nested():
                _, jobs = workflows.create_workflow(
                    session, tenant=schedule.tenant, name=name, tags=tags, steps=steps, now=now
                )
        except IntegrityError:
            continue  # this tick was fired already
        ready += [job for job in jobs if job.state is JobState.QUEUED]
    return ready


def _advance(
    session: Session,
    schedule: Schedule,
    next_run_at: dt.datetime,
    ticks: Sequence[dt.datetime],
    now: dt.datetime,
) -> bool:
    """Move the schedule to its next run, unless another beat moved it first."""
    advanced = session.execute(
        update(schedules)
        .where(schedules.c.id == schedule.id, schedules.c.next_run_at == schedule.next_run_at)
        .values(
            next_run_at=next_run_at,
            last_run_at=max(ticks, default=None) or schedule.last_run_at,
            updated_at=now,
        )
        .returning(schedules.c.id)
    ).first()
    return advanced is not None


def fire(
    session: Session,
    schedule: Schedule,
    new_jobs: list[NewJob],
    next_run_at: dt.datetime,
    *,
    now: dt.datetime,
) -> list[Job]:
    """Record the jobs of these ticks (skipping ticks already fired) and advance the schedule.

    Advances only if no other beat advanced it first; returns the jobs created.
    """
    ticks = [j.schedule_tick for j in new_jobs if j.schedule_tick]
    if not _advance(session, schedule, next_run_at, ticks, now):
        return []
    created: list[Job] = []
    for new in new_jobs:
        try:
            with session.begin_nested():
                created.append(store.create_job(session, new, now=now))
        except IntegrityError:
            continue  # this tick was fired already
    return created
