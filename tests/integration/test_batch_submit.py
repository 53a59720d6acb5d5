"""A batch costs a few statements and one broker round trip, on PostgreSQL, Redis and RabbitMQ.

Statements are counted with a SQLAlchemy cursor listener; broker round trips by the
calls that make them (kombu's pipeline flush, py-amqp's per-message confirm wait).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from amqp.channel import Channel as AmqpChannel
from celery import Celery
from fastapi.testclient import TestClient
from kombu.connection import Connection
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import POOLS, Settings, celery_config
from conveyor.jobs import keys, migrate, store
from conveyor.jobs.db import make_engine, make_session_factory
from conveyor.jobs.fastpath import FastPath
from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.tables import job_events, jobs
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job
from conveyor.worker import confirms as confirms_module
from conveyor.worker.broker import queue_depths
from conveyor.worker.publisher import CeleryPublisher
from conveyor.worker.redis_transport import Channel as RedisChannel

BATCH = 1000


class Statements:
    """Every statement an engine sends while installed."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sent: list[str] = []

    def _record(self, *args: Any) -> None:
        self.sent.append(" ".join(str(args[2]).split()))

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def touching(self, *tables: str) -> list[str]:
        """The statements that name any of these tables."""
        return [s for s in self.sent if any(f" {t} " in f" {s} " for t in tables)]


def new_jobs(count: int, **overrides: Any) -> list[NewJob]:
    return [
        build_new_job(registry, tenant="acme", task="demo.echo", payload={"n": n}, **overrides)
        for n in range(count)
    ]


def test_a_batch_is_one_statement_on_postgresql(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    batch = new_jobs(BATCH - 1) + new_jobs(1, run_at=later)
    with Statements(pg_engine) as seen, sessions.begin() as session:
        created = store.create_jobs(session, batch)
    assert len(seen.sent) == 1, seen.sent
    assert [job.id for job in created] == [new.id for new in batch]
    assert [job.payload for job in created] == [new.payload for new in batch]
    assert {job.state.value for job in created[:-1]} == {"queued"}
    assert created[-1].state.value == "scheduled"
    assert created[-1].run_after == later
    with pg_engine.connect() as conn:
        events = conn.execute(
            select(job_events.c.job_id, job_events.c.to_state).order_by(job_events.c.id)
        ).all()
    # One `created` event per job, written in input order.
    assert [row.job_id for row in events] == [new.id for new in batch]
    assert events[-1].to_state == "scheduled"


def test_marking_a_batch_published_is_one_update(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    with sessions.begin() as session:
        created = store.create_jobs(session, new_jobs(BATCH))
    with Statements(pg_engine) as seen, sessions.begin() as session:
        store.mark_published(session, [job.id for job in created])
    assert len(seen.touching("jobs")) == 1, seen.sent
    with pg_engine.connect() as conn:
        unmarked = conn.execute(select(jobs.c.id).where(jobs.c.published_at.is_(None))).all()
    assert unmarked == []


@pytest.fixture
def api(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[tuple[TestClient, Engine]]:
    settings = Settings(database_url=pg_url, broker_url=redis_url, api_rate_per_second=0)
    platform = build_platform(settings)
    engine = platform.sessions.kw["bind"]
    with TestClient(create_app(platform.api_state())) as client:
        yield client, engine
    platform.store.dispose()


def auth(engine: Engine) -> dict[str, str]:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant="acme")
    return {"Authorization": f"Bearer {key}"}


def test_a_batch_request_writes_the_jobs_once_and_marks_them_once(
    api: tuple[TestClient, Engine], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, engine = api
    headers = auth(engine)
    flushes = count_calls(monkeypatch, RedisChannel, "put_many")
    records = count_calls(monkeypatch, FastPath, "record")
    marks = count_calls(monkeypatch, FastPath, "mark_published")
    body = {"jobs": [{"task": "demo.echo", "payload": {"n": n}} for n in range(BATCH)]}
    with Statements(engine) as seen:
        response = client.post("/v1/jobs/batch", json=body, headers=headers)
        assert response.status_code == 202, response.text
        # The mark follows the answer, within the group committer's mark delay.
        deadline = time.monotonic() + 10.0
        while not all_published(engine) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "Conveyor-Publish" not in response.headers
    # The insert of jobs and events is one prepared statement on the recording thread's
    # own connection (test_recorder.py); then one publish and one mark, the ids as one
    # array, on that thread's connection too: nothing per job, nothing through a session.
    assert records == [1] and marks == [1]
    assert seen.touching("jobs", "job_events") == []
    assert flushes == [1]
    assert redis.Redis.from_url(redis_url).llen("default") == BATCH
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.request_hash, jobs.c.published_at)).all()
    assert len(rows) == BATCH
    assert {row.request_hash for row in rows} == {None}
    assert all(row.published_at is not None for row in rows)


def all_published(engine: Engine) -> bool:
    """Asked on an engine of its own, so that the question is not among the statements."""
    watcher = make_engine(engine.url.render_as_string(hide_password=False), pool_size=1)
    try:
        with watcher.connect() as conn:
            unmarked = conn.execute(
                select(func.count()).select_from(jobs).where(jobs.c.published_at.is_(None))
            ).scalar_one()
            return bool(unmarked == 0)
    finally:
        watcher.dispose()


def test_request_hash_only_with_an_idempotency_key(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    headers = auth(engine)
    body = {"task": "demo.echo", "payload": {"n": 1}}
    plain = client.post("/v1/jobs", json=body, headers=headers)
    keyed_headers = {**headers, "Idempotency-Key": "k-1"}
    keyed = client.post("/v1/jobs", json=body, headers=keyed_headers)
    again = client.post("/v1/jobs", json=body, headers=keyed_headers)
    other = client.post("/v1/jobs", json={**body, "payload": {"n": 2}}, headers=keyed_headers)
    assert (plain.status_code, keyed.status_code, again.status_code) == (202, 202, 200)
    assert again.json()["id"] == keyed.json()["id"]
    assert other.status_code == 422
    with engine.connect() as conn:
        hashes = dict(conn.execute(select(jobs.c.idempotency_key, jobs.c.request_hash)).all())
    assert hashes[None] is None
    assert hashes["k-1"] is not None and len(hashes["k-1"]) == 64


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Count calls of `owner.name` (still made); the count is the list's one item."""
    original = getattr(owner, name)
    calls = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def app_for(broker_url: str) -> Celery:
    app = Celery("batch-publish", set_as_current=False)
    app.conf.update(celery_config(Settings(_env_file=None, broker_url=broker_url)))
    return app


def recorded(sessions: sessionmaker[Session], count: int) -> list[Job]:
    with sessions.begin() as session:
        return store.create_jobs(session, new_jobs(count))


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    migrate.upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def test_redis_takes_a_batch_through_one_pipeline(
    sqlite_sessions: sessionmaker[Session], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One pipeline (one round trip: Channel.put_many) for the batch, not an LPUSH each.
    flushes = count_calls(monkeypatch, RedisChannel, "put_many")
    app = app_for(redis_url)
    jobs_ = recorded(sqlite_sessions, BATCH)
    assert CeleryPublisher(app).publish(jobs_) == [job.id for job in jobs_]
    assert flushes == [1]
    assert queue_depths(app) == {"high": 0, "default": BATCH, "low": 0}


def _delete_rabbitmq_queues(url: str) -> None:
    with Connection(url) as connection:  # type: ignore[no-untyped-call]
        channel = connection.default_channel
        for name in POOLS:
            channel.queue_delete(name)


def test_rabbitmq_confirms_a_batch_with_one_wait(
    sqlite_sessions: sessionmaker[Session], amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_message = count_calls(monkeypatch, AmqpChannel, "basic_publish_confirm")
    waits = count_calls(monkeypatch, confirms_module.Confirms, "wait")
    _delete_rabbitmq_queues(amqp_url)
    app = app_for(amqp_url)
    try:
        publisher = CeleryPublisher(app)
        for _ in range(2):  # the second batch reuses the channel and its numbering
            jobs_ = recorded(sqlite_sessions, BATCH)
            assert publisher.publish(jobs_) == [job.id for job in jobs_]
        assert per_message == [0]
        assert waits == [2]
        assert queue_depths(app) == {"high": 0, "default": 2 * BATCH, "low": 0}
    finally:
        _delete_rabbitmq_queues(amqp_url)
