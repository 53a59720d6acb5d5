"""`conveyor up`: the whole platform on one machine, embedded or as supervised processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from conveyor.api.app import create_app
from conveyor.cli.handover import HandoverServer
from conveyor.cli.health_report import HealthReport
from conveyor.cli.wiring import Platform, build_platform, run_migrations, sessions_for
from conveyor.config import POOLS, Settings
from conveyor.jobs import keys, outbox, store
from conveyor.observability import metrics, tracing

log = logging.getLogger(__name__)


def create_admin_key(settings: Settings, tenant: str = "default") -> str:
    """A fresh key with every scope, printed once at start."""
    sessions = sessions_for(settings)
    with sessions.begin() as session:
        key, _record = keys.create_key(session, tenant=tenant)
    return key


def banner(settings: Settings, key: str) -> str:
    """What `conveyor up` prints: where the API is, a key, and a job to try."""
    url = f"http://{settings.api_host}:{settings.api_port}"
    return "\n".join(
        [
            f"Conveyor API: {url}  (docs: {url}/docs)",
            f"Console: {url}/ui/  (sign in with the admin key below)",
            f"Admin API key (shown once): {key}",
            "Submit a job:",
            f"  curl -s -X POST {url}/v1/jobs -H 'Authorization: Bearer {key}'"
            " -H 'Content-Type: application/json'"
            ' -d \'{"task": "demo.echo", "payload": {"hello": "world"}}\'',
            "Then read it back from the Location it names, with the same key.",
            f"Prometheus metrics: {url}/metrics",
        ]
    )


class EmbeddedWorkers:
    """One Celery worker per pool, each in a thread of this process."""

    def __init__(self, platform: Platform) -> None:
        self._platform = platform
        self._workers: list[Any] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start a thread-pool worker for each of high, default and low."""
        app = self._platform.celery
        app.finalize()
        app.set_current()
        # Pool threads look the app up as the process default, not the thread-local one.
        app.set_default()
        for pool in POOLS:
            ready = threading.Event()
            worker = app.WorkController(
                app=app,
                hostname=f"{pool}@embedded",
                concurrency=self._platform.settings.pool_concurrency(pool) * 2,
                prefetch_multiplier=self._platform.settings.pool_prefetch(pool),
                pool="threads",
                queues=[pool],
                without_heartbeat=True,
                without_mingle=True,
                without_gossip=True,
                loglevel=self._platform.settings.log_level,
                ready_callback=lambda *_args, ready=ready: ready.set(),
            )
            thread = threading.Thread(target=worker.start, name=f"worker-{pool}", daemon=True)
            thread.start()
            # One at a time: workers starting together in one process can leave one of
            # them connected but never consuming.
            if not ready.wait(timeout=30):
                raise RuntimeError(f"the embedded {pool} worker did not start")
            self._workers.append(worker)
            self._threads.append(thread)

    def stop(self) -> None:
        """Warm stop: running jobs finish."""
        for worker in self._workers:
            worker.stop(in_sighandler=False)
        for thread in self._threads:
            thread.join(timeout=30)


def run_embedded(settings: Settings) -> None:
    """API, worker pools and beat in this one process, on the in-process broker."""
    run_migrations(settings)
    key = create_admin_key(settings)
    platform = build_platform(settings, pool_size=20)
    # One process: the API's /metrics shows the workers' and beat's metrics too.
    tracing.setup(settings.otlp_endpoint, "conveyor")
    workers = EmbeddedWorkers(platform)
    workers.start()
    for pool in POOLS:
        metrics.WORKER_CONSUMING.labels(pool).set(1)
    from celery.beat import EmbeddedService

    beat = EmbeddedService(
        platform.celery, thread=True, scheduler_cls=platform.celery.conf.beat_scheduler
    )
    beat.start()
    handover = _handover(platform)
    health = HealthReport(platform, settings.health_log_seconds)
    health.start()
    print(banner(settings, key), flush=True)
    config = uvicorn.Config(
        create_app(platform.api_state()),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        # Conveyor's own logging (JSON lines) carries uvicorn's records too.
        log_config=None,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        health.stop()
        if handover is not None:
            handover.stop()
        beat.stop()
        workers.stop()


def _handover(platform: Platform) -> HandoverServer | None:
    """Listen for jobs that commands record on this database (cli/handover.py)."""

    def publish(ids: list[uuid.UUID]) -> list[uuid.UUID]:
        with platform.sessions() as session:
            found = store.jobs_among(session, ids)
        ready = [found[job_id] for job_id in ids if job_id in found]
        published, _taken = outbox.publish_ready(platform.publisher, ready)
        return published

    server = HandoverServer(platform.settings.database_url, publish, POOLS)
    try:
        server.start()
    except OSError as error:
        log.warning(
            "commands' jobs wait for the relay: cannot listen on %s: %s", server.path, error
        )
        return None
    return server


@dataclass
class Child:
    """A supervised process and how to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        """Start (or restart) the process."""
        self.process = subprocess.Popen(self.argv, env={**os.environ, **self.env})
        self.started_at = time.monotonic()


def child_commands(settings: Settings) -> list[Child]:
    """The processes `conveyor up` supervises for these settings."""
    conveyor = [sys.executable, "-m", "conveyor"]
    children = [Child("api", [*conveyor, "api"])]
    children += [Child(f"worker-{pool}", [*conveyor, "worker", "--pool", pool]) for pool in POOLS]
    children.append(Child("beat", [*conveyor, "beat"]))
    if settings.metrics_port:
        # One machine: each worker and beat gets its own metrics port, in this order.
        for offset, child in enumerate(children[1:]):
            child.env["CONVEYOR_METRICS_PORT"] = str(settings.metrics_port + offset)
    if settings.flower_user and settings.flower_password:
        children.append(Child("flower", [*conveyor, "flower"]))
    return children


def supervise(settings: Settings, *, grace_seconds: float = 30.0) -> None:
    """Run each part as its own process, restart what dies, stop all on SIGINT or SIGTERM."""
    run_migrations(settings)
    key = create_admin_key(settings)
    children = child_commands(settings)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for child in children:
        child.start()
    print(banner(settings, key), flush=True)
    parts = [
        f"{c.name} (metrics :{c.env['CONVEYOR_METRICS_PORT']})"
        if "CONVEYOR_METRICS_PORT" in c.env
        else c.name
        for c in children
    ]
    print(f"Supervising: {', '.join(parts)}", flush=True)
    while not stopping.wait(0.5):
        for child in children:
            assert child.process is not None
            code = child.process.poll()
            if code is None:
                continue
            # Back off a part that keeps dying at start, so its logs stay readable.
            if time.monotonic() - child.started_at < 5 and child.restarts > 3:
                continue
            log.warning("%s exited with %s; restarting", child.name, code)
            child.restarts += 1
            child.start()
    for child in children:
        if child.process and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
    print("Conveyor stopped.", flush=True)


def up(settings: Settings) -> None:
    """The whole platform: embedded without a broker URL, supervised processes with one."""
    if settings.embedded:
        run_embedded(settings)
    else:
        supervise(settings)
