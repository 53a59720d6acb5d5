"""webhook.deliver from a real worker process: internal addresses are refused before any
connection is made, unless CONVEYOR_WEBHOOK_ALLOWED_NETWORKS lets them through."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from tests import workers
from tests.support import run_conveyor, wait_until

Api = tuple[TestClient, dict[str, str]]


@pytest.fixture
def api(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[Api]:
    """The API in this process and an admin key's headers."""
    platform = build_platform(
        Settings(database_url=pg_url, broker_url=redis_url, api_rate_per_second=0)
    )
    with make_session_factory(pg_engine).begin() as session:
        key, _ = keys.create_key(session, tenant="acme")
    with TestClient(create_app(platform.api_state())) as client:
        yield client, {"Authorization": f"Bearer {key}"}
    platform.store.dispose()


@contextmanager
def worker(pg_url: str, redis_url: str, logs: Path, allowed: str) -> Iterator[None]:
    """One default-pool worker process with these allowed networks."""
    env = workers.service_env(pg_url, redis_url, CONVEYOR_WEBHOOK_ALLOWED_NETWORKS=allowed)
    with workers.running([["worker", "--pool", "default"]], env, logs):
        yield


def deliver(api: Api, url: str) -> dict[str, Any]:
    """Submit a webhook.deliver job and wait until it succeeded or went dead."""
    client, headers = api
    body = {"task": "webhook.deliver", "payload": {"url": url, "body": {"to": url}}}
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def finished() -> dict[str, Any]:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        return job if job["state"] in ("succeeded", "dead") else {}

    return wait_until(finished, timeout=60, interval=0.1, what=f"the delivery to {url}")


def test_loopback_is_refused_before_any_connection(
    api: Api, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Listening but never accepting: a connection that reached it would wait in the
    # backlog, where a non-blocking accept finds it afterwards.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        cases = {
            f"http://127.0.0.1:{port}/hook": "127.0.0.1 is a loopback address",
            f"http://localhost:{port}/hook": "localhost resolves to",
            f"http://[::ffff:127.0.0.1]:{port}/hook": "(IPv4-mapped 127.0.0.1)",
            f"http://0.0.0.0:{port}/hook": "0.0.0.0 is an unspecified address",
        }
        with worker(pg_url, redis_url, tmp_path, allowed=""):
            jobs = {url: deliver(api, url) for url in cases}
        for url, says in cases.items():
            job = jobs[url]
            assert job["state"] == "dead", (url, job)
            assert job["attempts"] == 1, (url, job)
            assert job["error"]["type"] == "conveyor.tasks.webhook.DeliveryRefused", job
            message = job["error"]["message"]
            assert message.startswith("refused: "), message
            assert says in message, message
            assert message.endswith("; allow it with CONVEYOR_WEBHOOK_ALLOWED_NETWORKS")
        assert "loopback" in jobs[f"http://localhost:{port}/hook"]["error"]["message"]
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            connection, peer = listener.accept()
            connection.close()
            pytest.fail(f"a refused delivery connected from {peer}")


class Receiver(ThreadingHTTPServer):
    """Records every connection and request; /moved answers a redirect to /target."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.port = self.server_address[1]

    def get_request(self) -> tuple[socket.socket, Any]:
        self.connections += 1
        return super().get_request()


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.server.requests.append(
            {
                "path": self.path,
                "host": self.headers.get("Host"),
                "key": self.headers.get("Idempotency-Key"),
                "body": json.loads(self.rfile.read(length) or b"null"),
            }
        )
        self.send_response(302 if self.path == "/moved" else 200)
        if self.path == "/moved":
            self.send_header("Location", f"http://127.0.0.1:{self.server.port}/target")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        return


def test_allowed_network_is_delivered_to_with_the_idempotency_key(
    api: Api, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"127.0.0.1:{receiver.port}"
        with worker(pg_url, redis_url, tmp_path, allowed="10.99.0.0/16, 127.0.0.0/8, ::1/128"):
            by_ip = deliver(api, f"http://{base}/hook")
            by_name = deliver(api, f"http://localhost:{receiver.port}/hook")
            moved = deliver(api, f"http://{base}/moved")
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert by_ip["state"] == "succeeded", by_ip
    assert by_ip["result"] == {"status": 200}
    assert by_name["state"] == "succeeded", by_name
    # A redirect is the receiver's answer, not followed: dead at once, /target never asked.
    assert moved["state"] == "dead", moved
    assert moved["attempts"] == 1
    assert "redirects are not followed" in moved["error"]["message"]
    assert [r["path"] for r in receiver.requests] == ["/hook", "/hook", "/moved"]
    first, second, _ = receiver.requests
    assert first["key"] == by_ip["id"]
    assert first["body"] == {"to": f"http://{base}/hook"}
    assert first["host"] == base
    # Connected to the checked address, still sent for the name the URL gave.
    assert second["key"] == by_name["id"]
    assert second["host"] == f"localhost:{receiver.port}"


def test_invalid_allowed_network_stops_the_worker_at_start(tmp_path: Path) -> None:
    result = run_conveyor(
        "worker",
        "--pool",
        "default",
        env={
            "CONVEYOR_DATABASE_URL": f"sqlite:///{tmp_path / 'never.db'}",
            "CONVEYOR_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8,10.0.0.0/33",
        },
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "invalid setting CONVEYOR_WEBHOOK_ALLOWED_NETWORKS: " in lines[0], lines[0]
    assert "'10.0.0.0/33'" in lines[0]
    assert not (tmp_path / "never.db").exists()
