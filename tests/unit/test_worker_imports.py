"""What a worker process loads: the pool children fork from it and hold all of it too.

Each case runs in a fresh interpreter, since this one has long since imported everything.
`conveyor worker` runs there as far as Celery's worker, built for real (its hooks, worker_init
among them, run before the pool forks), whose start is replaced by a stand-in that reports the
loaded modules; the network is refused there, as everywhere in the unit tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Loaded by a worker only when it serves or does the thing they are for.
API_STACK = ("fastapi", "starlette", "uvicorn")
MIGRATIONS = ("alembic", "mako")
TELEMETRY_SDK = ("opentelemetry.sdk", "opentelemetry.exporter")
HTTP_CLIENT = ("httpx", "httpcore")
# Celery's command line: click's REPL and every installed plugin command, Flower's among them.
CELERY_CLI = ("celery.bin", "click_repl", "prompt_toolkit", "flower", "tornado")

PRELUDE = """
import gc, json, socket, sys

def refuse(*args, **kwargs):
    raise AssertionError(f"no network here: {args!r}")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse

def report(**extra):
    print(json.dumps({"modules": sorted(sys.modules), **extra}))
"""

RUN_WORKER = """
from celery.apps.worker import Worker

def start(self):
    report(queues=sorted(self.app.amqp.queues), frozen=gc.get_freeze_count())

Worker.start = start
from conveyor.cli.main import main

main(["worker", "--pool", "default"])
"""


def run(script: str, tmp_path: Path, **env: str) -> dict[str, Any]:
    """Run PRELUDE + `script` in a new interpreter; what its `report` printed."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CONVEYOR_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    clean.update(
        PYTHONPATH=str(ROOT),
        CONVEYOR_BROKER_URL="redis://127.0.0.1:6379/9",
        CONVEYOR_DATABASE_URL="postgresql+psycopg://conveyor@127.0.0.1:1/unused",
        CONVEYOR_METRICS_PORT="0",
        CONVEYOR_LOG_FORMAT="json",
        **env,
    )
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + script],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def loaded(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    """The modules of `modules` that are `packages` or inside one of them."""
    return [m for m in modules if any(m == p or m.startswith(f"{p}.") for p in packages)]


@pytest.fixture(scope="module")
def default_worker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What `conveyor worker --pool default` reported with default settings."""
    return run(RUN_WORKER, tmp_path_factory.mktemp("worker"))


def test_a_worker_loads_no_api_migrations_telemetry_sdk_or_http_client(
    default_worker: dict[str, Any],
) -> None:
    assert "default" in default_worker["queues"]
    modules = default_worker["modules"]
    assert "conveyor.worker.app" in modules and "conveyor.jobs.fastpath" in modules
    assert loaded(modules, API_STACK + MIGRATIONS + TELEMETRY_SDK + HTTP_CLIENT) == []


def test_a_worker_starts_without_sqlalchemy(default_worker: dict[str, Any]) -> None:
    # The fast path runs on psycopg; the store loads SQLAlchemy when first used.
    modules = default_worker["modules"]
    assert "psycopg" in modules
    assert loaded(modules, ("sqlalchemy", "conveyor.jobs.store", "conveyor.jobs.db")) == []


def test_a_worker_starts_without_celerys_command_line(default_worker: dict[str, Any]) -> None:
    modules = default_worker["modules"]
    assert "celery.worker.consumer" in modules and "celery.apps.worker" in modules
    assert loaded(modules, CELERY_CLI) == []


def test_a_prefork_worker_freezes_its_heap_before_the_pool_forks(
    default_worker: dict[str, Any],
) -> None:
    assert default_worker["frozen"] > 0


def test_a_worker_with_tracing_loads_the_exporter(tmp_path: Path) -> None:
    modules = run(RUN_WORKER, tmp_path, CONVEYOR_OTLP_ENDPOINT="http://127.0.0.1:4318")["modules"]
    assert "opentelemetry.exporter.otlp.proto.http.trace_exporter" in modules
    assert "opentelemetry.sdk.trace" in modules
    assert loaded(modules, API_STACK + MIGRATIONS) == []


def test_building_the_worker_app_loads_no_api_migrations_or_exporter(tmp_path: Path) -> None:
    script = """
from conveyor.config import Settings
from conveyor.worker.app import create_celery

create_celery(Settings(_env_file=None))
report()
"""
    modules = run(script, tmp_path)["modules"]
    assert loaded(modules, API_STACK + MIGRATIONS + ("opentelemetry.exporter",)) == []


def test_redis_imported_through_the_guard_leaves_the_sdk_unloaded_but_importable(
    tmp_path: Path,
) -> None:
    script = """
from conveyor.observability import sdk_guard

sdk_guard.import_redis_without_sdk()
before = sorted(sys.modules)
import opentelemetry.sdk.trace

report(before=before)
"""
    report = run(script, tmp_path)
    assert "redis" in report["before"]
    assert loaded(report["before"], ("opentelemetry.sdk",)) == []
    assert "opentelemetry.sdk.trace" in report["modules"]
