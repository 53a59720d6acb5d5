"""Waiting for jobs: `GET /v1/jobs/{id}?wait=` against clients that poll, on one API process.

For 1 and for 200 clients, each waiting for a job of its own: (a) every client sends one
`?wait=30` request; (b) every client polls `GET /v1/jobs/{id}` every 50 ms, the usual way
to wait without `?wait=`. While the clients wait (jobs queued, nothing finishing) the
database's transaction counter of the bench database (`pg_stat_database`) is read over a
window: the store's cost of waiting, per second. Then all the jobs are finished by one
UPDATE at a known instant, and each client's answer is timed from it: how soon a waiter
learns that its job has finished.

    uv run python -m bench.wait [--waiters 1,200] [--window 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from bench.api_servers import ApiDatabase, api_database, api_env
from bench.processes import HOST, free_port, running_worker, wait_ready
from conveyor.jobs import store
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.fastpath import libpq_url
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Row:
    """One way of waiting, for some number of clients."""

    mode: str
    clients: int
    transactions_per_second: float
    answer_ms: list[float]


def queued_jobs(database: ApiDatabase, count: int) -> list[uuid.UUID]:
    """`count` queued jobs of the bench tenant (never published: no worker runs them)."""
    with make_session_factory(database.engine).begin() as session:
        made = store.create_jobs(
            session,
            [
                build_new_job(registry, tenant="bench", task="demo.echo", payload={})
                for _ in range(count)
            ],
        )
    return [job.id for job in made]


def transactions(database: ApiDatabase) -> int:
    """The bench database's committed and rolled-back transactions so far."""
    with psycopg.connect(libpq_url(database.settings.database_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (database.name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def finish(database: ApiDatabase, job_ids: Sequence[uuid.UUID]) -> float:
    """Mark the jobs succeeded in one statement; the monotonic time it committed."""
    with psycopg.connect(libpq_url(database.settings.database_url), autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs SET state = 'succeeded', finished_at = now(), updated_at = now()"
            " WHERE id = ANY(%s)",
            (list(job_ids),),
        )
        return time.monotonic()


async def one_client(
    client: httpx.AsyncClient, job_id: uuid.UUID, mode: str, headers: dict[str, str]
) -> float:
    """Wait for the job as `mode` says; the monotonic time its end was seen."""
    while True:
        if mode == "wait":
            answer = await client.get(f"/v1/jobs/{job_id}", params={"wait": 30}, headers=headers)
        else:
            answer = await client.get(f"/v1/jobs/{job_id}", headers=headers)
        answer.raise_for_status()
        if answer.json()["state"] == "succeeded":
            return time.monotonic()
        if mode != "wait":
            await asyncio.sleep(POLL_SECONDS)


async def measure(database: ApiDatabase, base: str, mode: str, clients: int, window: float) -> Row:
    job_ids = await asyncio.to_thread(queued_jobs, database, clients)
    headers = {"Authorization": f"Bearer {database.key}"}
    limits = httpx.Limits(max_connections=clients + 5, max_keepalive_connections=clients + 5)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        waiting = [asyncio.ensure_future(one_client(client, j, mode, headers)) for j in job_ids]
        await asyncio.sleep(2.0)  # every client has sent its first request and waits
        before = await asyncio.to_thread(transactions, database)
        started = time.monotonic()
        await asyncio.sleep(window)
        after = await asyncio.to_thread(transactions, database)
        elapsed = time.monotonic() - started
        done_at = await asyncio.to_thread(finish, database, job_ids)
        seen = await asyncio.wait_for(asyncio.gather(*waiting), timeout=60)
    # The counter's own two reads are transactions too.
    rate = max(0, after - before - 1) / elapsed
    return Row(mode, clients, rate, [max(0.0, (t - done_at) * 1000) for t in seen])


def print_rows(rows: Sequence[Row]) -> None:
    print(
        f"{'mode':28s} {'clients':>8s} {'db xact/s while waiting':>24s} "
        f"{'answer after finish p50 / p99 / max ms':>40s}"
    )
    for row in rows:
        ms = sorted(row.answer_ms)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        label = "?wait=30" if row.mode == "wait" else f"poll every {POLL_SECONDS * 1000:g} ms"
        print(
            f"{label:28s} {row.clients:8d} {row.transactions_per_second:24.1f} "
            f"{statistics.median(ms):20.1f} / {p99:6.1f} / {ms[-1]:6.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", default="1,200", help="client counts, comma-separated")
    parser.add_argument("--window", type=float, default=3.0, help="seconds counted")
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.waiters.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="conveyor-bench-wait-"))
    rows: list[Row] = []
    with api_database(args.pg_admin_url, args.broker) as database:
        port = free_port()
        env = api_env(database.settings, port)
        argv_api = [sys.executable, "-m", "conveyor", "api"]
        with running_worker("conveyor-api", argv_api, env, logs) as process:
            base = f"http://{HOST}:{port}"
            wait_ready(process, base, "/readyz", 30.0)
            for clients in counts:
                for mode in ("wait", "poll"):
                    rows.append(asyncio.run(measure(database, base, mode, clients, args.window)))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
