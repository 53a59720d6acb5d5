"""One-shot commands over the job store: keys, submit, jobs, dead letters."""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any, TextIO

from pydantic import ValidationError

from conveyor.api.schemas import JobOut
from conveyor.cli.consumers import ConsumerWatch
from conveyor.cli.errors import CommandError
from conveyor.cli.tables import print_table, progress
from conveyor.cli.wiring import command_platform, sessions_for
from conveyor.config import Settings
from conveyor.jobs import keys, outbox, store
from conveyor.jobs.models import Job
from conveyor.jobs.states import JobState
from conveyor.tasks import UnknownTask, registry
from conveyor.tasks.submission import build_new_job


def job_json(job: Job) -> str:
    """A job as indented JSON, as the API shows it."""
    return JobOut.of(job).model_dump_json(indent=2)


def keys_create(settings: Settings, tenant: str, scopes: list[str]) -> None:
    """Create a key and print it alone on the last line."""
    sessions = sessions_for(settings)
    try:
        with sessions.begin() as session:
            key, record = keys.create_key(session, tenant=tenant, scopes=tuple(scopes))
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"created key {record.prefix}… for tenant {tenant!r} with scopes {sorted(scopes)}")
    print(key)


def keys_list(settings: Settings, tenant: str | None) -> None:
    """Print each key's id, tenant, prefix, scopes and whether it is revoked."""
    with sessions_for(settings)() as session:
        found = keys.list_keys(session, tenant=tenant)
    print_table(
        ["ID", "TENANT", "PREFIX", "SCOPES", "STATUS"],
        [
            (
                r.id,
                r.tenant,
                f"{r.prefix}…",
                ",".join(sorted(r.scopes)),
                "revoked" if r.revoked else "live",
            )
            for r in found
        ],
    )


def keys_revoke(settings: Settings, key_id: str) -> None:
    """Revoke a key; the API refuses it within seconds."""
    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        raise CommandError(f"not a key id: {key_id!r}") from None
    with sessions_for(settings).begin() as session:
        if not keys.revoke_key(session, parsed):
            raise CommandError(f"no live key {key_id}")
    print(f"revoked {key_id}")


def submit_file(
    settings: Settings, *, task: str, path: str, priority: str | None, tenant: str
) -> None:
    """Submit one job per line of a file of JSON payloads, with a progress bar on stderr.

    Every line is validated before any job is recorded; a bad line names its number.
    """
    handle = sys.stdin if path == "-" else _open(path)
    with handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    new_jobs = []
    for number, line in enumerate(lines, start=1):
        try:
            payload = json.loads(line)
            new_jobs.append(
                build_new_job(
                    registry, tenant=tenant, task=task, payload=payload, priority=priority
                )
            )
        except json.JSONDecodeError as error:
            raise CommandError(f"line {number} is not valid JSON: {error.msg}") from None
        except UnknownTask:
            raise CommandError(f"unknown task {task!r}") from None
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            raise CommandError(f"line {number}: {where}: {first['msg']}") from None
    platform = command_platform(settings)
    done = 0
    with progress("submitting") as bar:
        counter = bar.add_task("jobs", total=len(new_jobs))
        for start in range(0, len(new_jobs), 500):
            chunk = new_jobs[start : start + 500]
            outbox.submit(platform.sessions, platform.publisher, chunk)
            done += len(chunk)
            bar.update(counter, completed=done)
    print(f"submitted {done} jobs")


def _open(path: str) -> TextIO:
    try:
        return open(path, encoding="utf-8")
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror}") from None


def parse_job_id(text: str) -> uuid.UUID:
    """A job id from the command line."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise CommandError(f"not a job id: {text!r}") from None


def submit(
    settings: Settings,
    *,
    task: str,
    payload_text: str,
    priority: str | None,
    tenant: str,
    wait: bool,
    wait_timeout: float,
) -> int:
    """Record and publish one job; with `wait`, block until it is finished."""
    try:
        payload: Any = json.loads(payload_text)
    except json.JSONDecodeError as error:
        raise CommandError(f"--payload is not valid JSON: {error.msg}") from None
    try:
        new = build_new_job(registry, tenant=tenant, task=task, payload=payload, priority=priority)
    except UnknownTask:
        known = ", ".join(t.name for t in registry.all())
        raise CommandError(f"unknown task {task!r}; known: {known}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise CommandError(f"invalid payload for {task}: {where}: {first['msg']}") from None
    platform = command_platform(settings)
    job = outbox.submit(platform.sessions, platform.publisher, [new])[0]
    if not wait:
        print(job.id)
        return 0
    deadline = time.monotonic() + wait_timeout
    watch = ConsumerWatch(platform, job.queue, f"job {job.id}")
    while time.monotonic() < deadline:
        with platform.sessions() as session:
            current = store.get_job(session, job.id)
        assert current is not None
        watch.check(started=current.started_at is not None)
        if store.is_terminal(current.state):
            print(job_json(current))
            return 0 if current.state == JobState.SUCCEEDED else 1
        time.sleep(0.1)
    raise CommandError(f"job {job.id} did not finish within {wait_timeout:g}s")


def jobs_show(settings: Settings, job_id: str) -> None:
    """Print one job."""
    with sessions_for(settings)() as session:
        job = store.get_job(session, parse_job_id(job_id))
    if job is None:
        raise CommandError(f"no job {job_id}")
    print(job_json(job))


def jobs_list(settings: Settings, state: str | None, limit: int) -> None:
    """Print jobs newest first, one line each."""
    with sessions_for(settings)() as session:
        found = store.list_jobs(session, state=JobState(state) if state else None, limit=limit)
    print_table(
        ["ID", "STATE", "TASK", "CREATED"],
        [(j.id, j.state.value, j.task, j.created_at.isoformat()) for j in found],
    )


def jobs_cancel(settings: Settings, job_id: str) -> None:
    """Cancel a job that has not finished."""
    with sessions_for(settings).begin() as session:
        job = store.cancel(session, parse_job_id(job_id))
    if job is None:
        raise CommandError(f"job {job_id} does not exist or has already finished")
    print(f"{job.id} cancelled")


def jobs_retry(settings: Settings, job_id: str) -> None:
    """Queue a dead or cancelled job again under the same id."""
    platform = command_platform(settings)
    with platform.sessions.begin() as session:
        job = store.requeue(session, parse_job_id(job_id))
    if job is None:
        raise CommandError(f"job {job_id} does not exist or is not dead or cancelled")
    outbox.publish_recorded(platform.sessions, platform.publisher, [job])
    print(f"{job.id} queued")


def dlq_list(settings: Settings, limit: int) -> None:
    """Print dead jobs, newest first."""
    with sessions_for(settings)() as session:
        found = store.list_jobs(session, state=JobState.DEAD, limit=limit)
    print_table(
        ["ID", "TASK", "ERROR", "ATTEMPTS"],
        [(j.id, j.task, j.error_type or "-", j.attempts) for j in found],
    )


def dlq_replay(settings: Settings, ids: list[str], task: str | None) -> None:
    """Queue dead jobs again: the given ids, or every dead job (of one task type)."""
    platform = command_platform(settings)
    with platform.sessions() as session:
        if ids:
            targets = [parse_job_id(i) for i in ids]
        else:
            dead_jobs = store.list_jobs(session, state=JobState.DEAD, limit=100_000)
            targets = [j.id for j in dead_jobs if task is None or j.task == task]
    replayed: list[Job] = []
    with platform.sessions.begin() as session:
        for job_id in targets:
            job = store.requeue(session, job_id)
            if job is not None:
                replayed.append(job)
    outbox.publish_recorded(platform.sessions, platform.publisher, replayed)
    print(f"replayed {len(replayed)} jobs")


def schedules_command(settings: Settings, args: Any) -> None:
    """`conveyor schedules list | add | pause | resume | remove`."""
    from conveyor.jobs import schedules

    sessions = sessions_for(settings)
    action = args.schedules_command
    if action == "list":
        with sessions() as session:
            found = schedules.list_schedules(session, args.tenant)
        print_table(
            ["NAME", "TASK", "TIMING", "STATUS", "NEXT RUN"],
            [
                (
                    item.name,
                    item.task,
                    item.cron or f"every {item.interval_seconds:g}s",
                    "enabled" if item.enabled else "paused",
                    item.next_run_at.isoformat() if item.next_run_at else "-",
                )
                for item in found
            ],
        )
        return
    if action == "add":
        try:
            payload = json.loads(args.payload)
            registry.get(args.task).validate(payload)
        except json.JSONDecodeError as error:
            raise CommandError(f"--payload is not valid JSON: {error.msg}") from None
        except UnknownTask:
            raise CommandError(f"unknown task {args.task!r}") from None
        except ValidationError as error:
            first = error.errors()[0]
            raise CommandError(f"invalid payload: {first['msg']}") from None
        try:
            with sessions.begin() as session:
                if schedules.get_schedule(session, args.tenant, args.name) is not None:
                    raise CommandError(f"a schedule named {args.name!r} exists")
                created = schedules.create_schedule(
                    session,
                    tenant=args.tenant,
                    name=args.name,
                    task=args.task,
                    payload=payload,
                    cron=args.cron,
                    interval_seconds=args.every,
                    timezone=args.timezone,
                    priority=args.priority,
                    misfire=args.misfire,
                )
        except schedules.ScheduleError as error:
            raise CommandError(str(error)) from None
        print(f"added {created.name}; next run {created.next_run_at}")
        return
    with sessions.begin() as session:
        found_one = schedules.get_schedule(session, args.tenant, args.name)
        if found_one is None:
            raise CommandError(f"no schedule {args.name!r} for tenant {args.tenant!r}")
        if action == "remove":
            schedules.delete_schedule(session, args.tenant, args.name)
        else:
            schedules.update_schedule(session, found_one, {"enabled": action == "resume"})
    print(f"{args.name}: {action}d" if action != "remove" else f"{args.name}: removed")
