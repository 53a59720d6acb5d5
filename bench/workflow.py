"""A fan-out/fan-in workflow against the same jobs submitted as a batch and awaited by
polling, on one API process and one `conveyor worker --pool default` (two children).

(a) Conveyor: one `POST /v1/workflows` of N `demo.echo` steps and a `demo.collect` step
after all of them; the time from the request to the fan-in step's `started_at`.
(b) Without workflows: one `POST /v1/jobs/batch` of the same N jobs, the client polling
`GET /v1/jobs/{id}` for each unfinished job every 50 ms (what a client without fan-in
does), then `POST /v1/jobs` of the collecting job once all have finished; the time from
the batch request to that job's `started_at`. Both on the same database, broker and
worker, one after the other, each run `--runs` times (the median is printed).

    uv run python -m bench.workflow [--steps 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import httpx
from sqlalchemy import text

from bench.api_servers import ApiDatabase, api_database, api_env
from bench.brokers import BenchBroker
from bench.processes import HOST, BenchError, free_port, running_worker, wait_ready

POLL_SECONDS = 0.05
TIMEOUT = 300.0


def started_at(database: ApiDatabase, job_id: str) -> float | None:
    """The job's start, as seconds since the epoch (None until it has started)."""
    with database.engine.connect() as conn:
        value = conn.execute(
            text("SELECT extract(epoch FROM started_at) FROM jobs WHERE id = :id"),
            {"id": uuid.UUID(job_id)},
        ).scalar_one()
    return None if value is None else float(value)


def ran_for(database: ApiDatabase, job_ids: Sequence[str]) -> float:
    """Seconds from the first of these jobs' start to the last one's end."""
    with database.engine.connect() as conn:
        value = conn.execute(
            text(
                "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs"
                " WHERE id = ANY(:ids)"
            ),
            {"ids": [uuid.UUID(i) for i in job_ids]},
        ).scalar_one()
    return float(value)


def wait_started(database: ApiDatabase, job_id: str) -> float:
    deadline = time.monotonic() + TIMEOUT
    while (at := started_at(database, job_id)) is None:
        if time.monotonic() > deadline:
            raise BenchError(f"job {job_id} did not start within {TIMEOUT:.0f} s")
        time.sleep(0.005)
    return at


def as_workflow(client: httpx.Client, database: ApiDatabase, steps: int) -> tuple[float, float]:
    """Seconds from the workflow's submission to its fan-in step's start, and the seconds
    its parts took to run (first start to last end)."""
    parts = [{"key": f"part-{i}", "task": "demo.echo", "payload": {"i": i}} for i in range(steps)]
    body = {
        "name": "fan-out-fan-in",
        "steps": [
            *parts,
            {"key": "join", "task": "demo.collect", "after": [p["key"] for p in parts]},
        ],
    }
    sent = time.time()
    answer = client.post("/v1/workflows", json=body)
    if answer.status_code != 202:
        raise BenchError(f"POST /v1/workflows: {answer.status_code} {answer.text[:200]}")
    made = answer.json()["steps"]
    join = next(s["job_id"] for s in made if s["key"] == "join")
    waited = wait_started(database, join) - sent
    return waited, ran_for(database, [s["job_id"] for s in made if s["key"] != "join"])


def as_batch_and_polling(
    client: httpx.Client, database: ApiDatabase, steps: int
) -> tuple[float, float]:
    """Seconds from the batch's submission to the collecting job's start, and the seconds
    its jobs took to run."""
    jobs = [{"task": "demo.echo", "payload": {"i": i}} for i in range(steps)]
    sent = time.time()
    answer = client.post("/v1/jobs/batch", json={"jobs": jobs})
    if answer.status_code != 202:
        raise BenchError(f"POST /v1/jobs/batch: {answer.status_code} {answer.text[:200]}")
    waiting = [job["id"] for job in answer.json()["jobs"]]
    parts = list(waiting)
    results: dict[str, object] = {}
    deadline = time.monotonic() + TIMEOUT
    while waiting:
        if time.monotonic() > deadline:
            raise BenchError(f"{len(waiting)} jobs unfinished after {TIMEOUT:.0f} s")
        time.sleep(POLL_SECONDS)
        still = []
        for job_id in waiting:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("succeeded", "dead", "cancelled"):
                results[job_id] = job["result"]
            else:
                still.append(job_id)
        waiting = still
    collect = client.post("/v1/jobs", json={"task": "demo.echo", "payload": {"n": len(results)}})
    waited = wait_started(database, collect.json()["id"]) - sent
    return waited, ran_for(database, parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="fan-out width (1 to 999)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= 999:
        parser.error("--steps must be 1 to 999 (a workflow holds at most 1,000 steps)")
    logs = Path(tempfile.mkdtemp(prefix="conveyor-bench-workflow-"))
    broker = BenchBroker(args.broker)
    broker.empty()
    timings: dict[str, list[float]] = {"workflow": [], "batch + polling": []}
    running: dict[str, list[float]] = {"workflow": [], "batch + polling": []}
    with api_database(args.pg_admin_url, args.broker) as database:
        port = free_port()
        env = api_env(database.settings, port)
        api = [sys.executable, "-m", "conveyor", "api"]
        worker = [sys.executable, "-m", "conveyor", "worker", "--pool", "default"]
        with (
            running_worker("conveyor-api", api, env, logs) as api_process,
            running_worker("conveyor-worker", worker, env, logs),
        ):
            base = f"http://{HOST}:{port}"
            wait_ready(api_process, base, "/readyz", 30.0)
            headers = {"Authorization": f"Bearer {database.key}"}
            with httpx.Client(base_url=base, headers=headers, timeout=60.0) as client:
                as_workflow(client, database, 10)  # warm-up: both processes
                for _ in range(args.runs):
                    for name, way in (
                        ("workflow", as_workflow),
                        ("batch + polling", as_batch_and_polling),
                    ):
                        waited, ran = way(client, database, args.steps)
                        timings[name].append(waited)
                        running[name].append(ran)
    broker.empty()
    print(f"{args.steps} parts and one fan-in, {args.runs} runs, one worker (-c 2)")
    print(f"{'':18}{'to fan-in start, median s':>27}{'runs s':>22}{'parts ran, median s':>22}")
    for name, values in timings.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        ran = statistics.median(running[name])
        print(f"{name:18}{statistics.median(values):27.2f}{shown:>22}{ran:22.2f}")
    ratio = statistics.median(timings["batch + polling"]) / statistics.median(timings["workflow"])
    print(f"batch + polling / workflow: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
