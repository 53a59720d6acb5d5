"""Broker calls give up in time: a peer that accepts and never answers looks like a frozen broker.

Publishing, queue depths and the API's probes return or raise within about a second,
and the job stays in the store for the relay.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from fastapi.testclient import TestClient
from kombu.connection import Connection
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from conveyor.api.app import create_app
from conveyor.api.state import BoundedProbe
from conveyor.cli.wiring import build_platform
from conveyor.config import POOLS, Settings, celery_config
from conveyor.jobs import keys, migrate, outbox, store
from conveyor.jobs.db import make_engine, make_session_factory
from conveyor.jobs.models import Job, NewJob
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job
from conveyor.worker import publisher as publisher_module
from conveyor.worker.broker import queue_depths
from conveyor.worker.publisher import BrokerUnavailable, CeleryPublisher
from tests.support import wait_until

# The deadline is about a second; this leaves room for a busy machine.
BOUND = 1.5


class SilentPeer:
    """A TCP server that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(128)
        self.port: int = self._server.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._server.accept()
            except OSError:
                return
            self._held.append(peer)

    def url(self, scheme: str) -> str:
        if scheme == "redis":
            return f"redis://127.0.0.1:{self.port}/0"
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def close(self) -> None:
        self._server.close()
        for peer in self._held:
            peer.close()


class StallingRedis(SilentPeer):
    """A Redis that takes `answered` messages (whole LPUSH commands, each of one or more
    values), then falls silent like a frozen server."""

    def __init__(self, answered: int) -> None:
        self.answered = answered
        self.pushed = 0
        super().__init__()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._server.accept()
            except OSError:
                return
            self._held.append(peer)
            threading.Thread(target=self._serve, args=(peer,), daemon=True).start()

    def _serve(self, peer: socket.socket) -> None:
        buffer = b""
        queued: list[bytes] | None = None  # replies held inside MULTI … EXEC
        while True:
            try:
                data = peer.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while (parsed := _command(buffer)) is not None:
                words, buffer = parsed
                name = words[0].upper()
                if name == b"LPUSH":
                    values = len(words) - 2  # LPUSH key value [value ...]
                    if self.pushed + values > self.answered:
                        return  # fall silent, the connection left open
                    self.pushed += values
                if name == b"MULTI":
                    queued, reply = [], b"+OK\r\n"
                elif name == b"EXEC" and queued is not None:
                    reply = b"*%d\r\n" % len(queued) + b"".join(queued)
                    queued = None
                elif queued is not None:
                    queued.append(_reply(name))
                    reply = b"+QUEUED\r\n"
                else:
                    reply = _reply(name)
                try:
                    peer.sendall(reply)
                except OSError:  # the client gave up and closed
                    return


def _reply(name: bytes) -> bytes:
    if name == b"HELLO":
        # redis-py speaks RESP3 and checks the version in the reply.
        return b"%1\r\n$5\r\nproto\r\n:3\r\n"
    if name == b"PING":
        return b"+PONG\r\n"
    if name in (b"LPUSH", b"LLEN", b"SADD", b"EXISTS", b"SISMEMBER"):
        return b":1\r\n" if name == b"LPUSH" else b":0\r\n"
    return b"+OK\r\n"


def _command(buffer: bytes) -> tuple[list[bytes], bytes] | None:
    """One RESP command off the front of `buffer`, or None until it is complete."""
    if not buffer.startswith(b"*") or b"\r\n" not in buffer:
        return None
    head, rest = buffer.split(b"\r\n", 1)
    words = []
    for _ in range(int(head[1:])):
        if b"\r\n" not in rest:
            return None
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line[1:])
        if len(rest) < size + 2:
            return None
        words.append(rest[:size])
        rest = rest[size + 2 :]
    return words, rest


@pytest.fixture
def silent() -> Iterator[SilentPeer]:
    peer = SilentPeer()
    yield peer
    peer.close()


def app_for(broker_url: str) -> Celery:
    settings = Settings(_env_file=None, broker_url=broker_url)
    app = Celery("bounded-publish", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A job store for the tests that only need job rows to publish."""
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    migrate.upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def new_jobs(count: int, priorities: tuple[str, ...] = ("default",)) -> list[NewJob]:
    return [
        build_new_job(
            registry,
            tenant="acme",
            task="demo.echo",
            payload={"n": n},
            priority=priorities[n % len(priorities)],
        )
        for n in range(count)
    ]


def recorded(sessions: sessionmaker[Session], count: int) -> list[Job]:
    with sessions.begin() as session:
        return store.create_jobs(session, new_jobs(count))


def unpublished_for_relay(sessions: sessionmaker[Session]) -> set[uuid.UUID]:
    """What the relay would publish once every job has waited its grace."""
    later = store.utcnow() + dt.timedelta(minutes=5)
    with sessions() as session:
        return {job.id for job in store.due_for_publish(session, cutoff=later, now=later)}


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_silent_broker_costs_a_submission_about_a_second(
    sessions: sessionmaker[Session], silent: SilentPeer, scheme: str
) -> None:
    publisher = CeleryPublisher(app_for(silent.url(scheme)))
    started = time.monotonic()
    [job] = outbox.submit(sessions, publisher, new_jobs(1))
    took = time.monotonic() - started
    assert took < BOUND, f"the submission waited {took:.2f} s on a broker that never answers"
    assert unpublished_for_relay(sessions) == {job.id}

    # Right after, the broker is skipped: the next job is recorded at once, also for the relay.
    started = time.monotonic()
    [second] = outbox.submit(sessions, publisher, new_jobs(1))
    assert time.monotonic() - started < 0.5
    assert unpublished_for_relay(sessions) == {job.id, second.id}


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_stuck_publishes_hold_a_bounded_number_of_threads(
    sqlite_sessions: sessionmaker[Session],
    silent: SilentPeer,
    scheme: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No backoff, so every call goes to the broker and each gives up on its own.
    monkeypatch.setattr(publisher_module, "BROKER_DOWN_BACKOFF_SECONDS", 0.0)
    publisher = CeleryPublisher(app_for(silent.url(scheme)), deadline=0.2)
    before = {t.ident for t in threading.enumerate()}
    for _ in range(12):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            publisher.publish(recorded(sqlite_sessions, 1))
        assert time.monotonic() - started < 0.6
    senders = [
        t
        for t in threading.enumerate()
        if t.ident not in before and t.name.startswith("conveyor-publish")
    ]
    assert 0 < len(senders) <= publisher_module.SENDER_THREADS


def test_a_batch_stalling_midway_keeps_what_went_out(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two messages per round trip: the broker answers the first two pipelines in full.
    monkeypatch.setattr(publisher_module, "MESSAGES_PER_ROUND_TRIP", 2)
    peer = StallingRedis(answered=4)
    try:
        publisher = CeleryPublisher(app_for(peer.url("redis")))
        started = time.monotonic()
        jobs = outbox.submit(sessions, publisher, new_jobs(10))
        assert time.monotonic() - started < BOUND + 0.5
    finally:
        peer.close()
    assert peer.pushed == 4
    # The four the broker took are marked (a moment later); the relay publishes the
    # other six.
    rest = {job.id for job in jobs[4:]}
    wait_until(lambda: unpublished_for_relay(sessions) == rest, timeout=5, what="the marks")


def test_a_pipeline_cut_off_midway_leaves_all_its_jobs_to_the_relay(
    sessions: sessionmaker[Session],
) -> None:
    peer = StallingRedis(answered=5)
    try:
        publisher = CeleryPublisher(app_for(peer.url("redis")))
        started = time.monotonic()
        # Five for each of two queues: one pipeline of two LPUSHes of five values each.
        jobs = outbox.submit(sessions, publisher, new_jobs(10, ("default", "low")))
        assert time.monotonic() - started < BOUND + 0.5
    finally:
        peer.close()
    # All ten went out in one write and the broker took the first queue's five; which
    # ones, the client cannot tell, so none is marked: the relay publishes all ten again
    # and the five extra deliveries are dropped at claim.
    assert peer.pushed == 5
    assert unpublished_for_relay(sessions) == {job.id for job in jobs}


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_queue_depths_give_up_on_a_silent_broker(silent: SilentPeer, scheme: str) -> None:
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - whichever error the transport raises
        queue_depths(app_for(silent.url(scheme)))
    assert time.monotonic() - started < BOUND


def test_a_probe_stuck_on_the_broker_runs_once_and_answers_in_time() -> None:
    release = threading.Event()
    calls: list[int] = []

    def stuck() -> None:
        calls.append(1)
        release.wait(30)

    probe = BoundedProbe(stuck, seconds=0.3)
    try:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                probe()
            assert time.monotonic() - started < 0.6
        assert calls == [1]
    finally:
        release.set()


def test_the_api_answers_while_the_broker_is_silent(
    pg_engine: Engine, pg_url: str, silent: SilentPeer
) -> None:
    settings = Settings(database_url=pg_url, broker_url=silent.url("redis"), api_rate_per_second=0)
    platform = build_platform(settings)
    with platform.sessions.begin() as session:
        key, _ = keys.create_key(session, tenant="acme")
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with TestClient(create_app(platform.api_state())) as client:
            started = time.monotonic()
            response = client.post(
                "/v1/jobs", json={"task": "demo.echo", "payload": {}}, headers=headers
            )
            assert time.monotonic() - started < BOUND + 0.5
            assert response.status_code == 202
            assert response.headers["Conveyor-Publish"] == "deferred"

            started = time.monotonic()
            ready = client.get("/readyz")
            assert time.monotonic() - started < 2.0
            assert ready.status_code == 503
            assert "broker" in ready.json()["detail"]
            assert ready.json()["checks"]["database"] == "ok"

            started = time.monotonic()
            queues = client.get("/v1/queues", headers=headers)
            assert time.monotonic() - started < 2.0
            assert queues.status_code == 200
            assert [q["depth"] for q in queues.json()["items"]] == [None] * len(POOLS)
    finally:
        platform.store.dispose()


def _delete_rabbitmq_queues(url: str) -> None:
    with Connection(url) as connection:  # type: ignore[no-untyped-call]
        channel = connection.default_channel
        for name in POOLS:
            channel.queue_delete(name)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_live_broker_takes_every_message(
    request: pytest.FixtureRequest, sqlite_sessions: sessionmaker[Session], broker: str
) -> None:
    url = request.getfixturevalue("redis_url" if broker == "redis" else "amqp_url")
    if broker == "amqp":
        _delete_rabbitmq_queues(url)
    app = app_for(url)
    try:
        jobs = recorded(sqlite_sessions, 30)
        published = CeleryPublisher(app).publish(jobs)
        assert published == [job.id for job in jobs]
        depths = queue_depths(app)
        assert depths == {"high": 0, "default": 30, "low": 0}
    finally:
        if broker == "amqp":
            _delete_rabbitmq_queues(url)
