"""Conveyor's API and the bare FastAPI app, each one uvicorn process, on a migrated database.

Both are served the same way (`uvicorn.run(app, host, port, log_level, access_log=False)`,
one process, the same uvicorn, loop and HTTP implementation), each in its own process
group with its output in a log file. Conveyor runs `python -m conveyor api` on a fresh
temporary PostgreSQL database (created, migrated, dropped at the end) with the per-key rate
limit off (CONVEYOR_API_RATE_PER_SECOND=0) and CONVEYOR_LOG_LEVEL=WARNING, and an API key
with every scope created with `conveyor.jobs.keys.create_key`; the bare side runs
`python -m bench.bare_api`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import Engine, func, select

from bench.databases import temporary_pg_database
from bench.processes import HOST, Worker, free_port, running_worker, wait_ready, worker_env
from conveyor.config import Settings
from conveyor.jobs import migrate
from conveyor.jobs.db import make_engine, make_session_factory
from conveyor.jobs.keys import create_key
from conveyor.jobs.tables import jobs as jobs_table

TENANT = "bench"
CONVEYOR = "Conveyor"
BARE = "bare"


@dataclass(frozen=True)
class ApiDatabase:
    """A migrated temporary database with an API key, and the settings pointing at it."""

    name: str
    settings: Settings
    key: str
    engine: Engine

    def job_counts(self) -> tuple[int, int]:
        """How many jobs the table holds, and how many of them are unpublished."""
        with self.engine.connect() as connection:
            total, unpublished = connection.execute(
                select(
                    func.count(),
                    func.count().filter(jobs_table.c.published_at.is_(None)),
                ).select_from(jobs_table)
            ).one()
        return int(total), int(unpublished)


@dataclass(frozen=True)
class Target:
    """A server under test and the extra header lines its requests carry."""

    side: str
    port: int
    process: Worker
    headers: dict[str, str]

    @property
    def base(self) -> str:
        """The server's base URL."""
        return f"http://{HOST}:{self.port}"


@contextlib.contextmanager
def api_database(pg_admin_url: str, broker_url: str) -> Iterator[ApiDatabase]:
    """A temporary database, migrated, with a key of every scope for TENANT."""
    with temporary_pg_database(pg_admin_url) as database_url:
        settings = Settings(database_url=database_url, broker_url=broker_url)
        engine = make_engine(settings.database_url, pool_size=1)
        try:
            migrate.upgrade(engine)
            with make_session_factory(engine).begin() as session:
                key, _ = create_key(session, tenant=TENANT)
            name = urlsplit(database_url).path.lstrip("/")
            yield ApiDatabase(name, settings, key, engine)
        finally:
            engine.dispose()


def api_env(settings: Settings, port: int) -> dict[str, str]:
    """The environment of a `conveyor api` (or worker) on these settings, listening on
    `port`, with no rate limit and warnings only."""
    return worker_env(
        {
            "CONVEYOR_DATABASE_URL": settings.database_url,
            "CONVEYOR_BROKER_URL": settings.broker_url,
            "CONVEYOR_API_HOST": HOST,
            "CONVEYOR_API_PORT": str(port),
            "CONVEYOR_API_RATE_PER_SECOND": "0",
            "CONVEYOR_LOG_LEVEL": "WARNING",
        }
    )


@contextlib.contextmanager
def api_servers(
    database: ApiDatabase, logs: Path, boot_timeout: float
) -> Iterator[tuple[Target, Target]]:
    """Conveyor's API and the bare app, both answering; stopped when the block ends."""
    settings = database.settings
    conveyor_port, bare_port = free_port(), free_port()
    conveyor_env = api_env(settings, conveyor_port)
    bare_env = worker_env(
        {"BENCH_API_HOST": HOST, "BENCH_API_PORT": str(bare_port), "BENCH_LOG_LEVEL": "WARNING"}
    )
    conveyor_argv = [sys.executable, "-m", "conveyor", "api"]
    bare_argv = [sys.executable, "-m", "bench.bare_api"]
    print("starting both servers ...", file=sys.stderr, flush=True)
    with (
        running_worker("conveyor-api", conveyor_argv, conveyor_env, logs) as conveyor_process,
        running_worker("bare-api", bare_argv, bare_env, logs) as bare_process,
    ):
        conveyor = Target(
            CONVEYOR, conveyor_port, conveyor_process, {"Authorization": f"Bearer {database.key}"}
        )
        bare = Target(BARE, bare_port, bare_process, {})
        for target in (conveyor, bare):
            wait_ready(target.process, target.base, "/healthz", boot_timeout)
        wait_ready(conveyor_process, conveyor.base, "/readyz", 10.0)
        yield conveyor, bare
