"""Metrics, logs and traces of real API, worker and beat processes.

The counters scraped from the API and from each worker's metrics port add up to what
the job store records; a caller's traceparent and request id reach the worker's log
lines for the job; with an OTLP endpoint set, the request, publish and run spans arrive
at a receiver linked parent to child.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import job_events, jobs
from tests import workers
from tests.acceptance.cluster import FAST
from tests.support import free_port, wait_until

TERMINAL = ("succeeded", "dead", "cancelled")


@dataclass
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint on a free port, keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    with self._lock:
                        self.spans.append(
                            Span(
                                service,
                                span.name,
                                span.kind,
                                span.trace_id.hex(),
                                span.span_id.hex(),
                                span.parent_span_id.hex(),
                            )
                        )

    def of_trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Platform:
    """`conveyor api`, two workers and beat as real processes, each with a metrics port."""

    api_url: str
    key: str
    logs: Path
    metrics_ports: dict[str, int]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def scrape(self, name: str) -> str:
        url = (
            f"{self.api_url}/metrics"
            if name == "api"
            else f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        )
        response = httpx.get(url, timeout=5)
        assert response.status_code == 200
        return response.text

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        lines = []
        for raw in (self.logs / f"{name}.log").read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def platform(
    pg_engine: Engine, pg_url: str, redis_url: str, tmp_path: Path, otlp: OtlpReceiver
) -> Iterator[Platform]:
    with make_session_factory(pg_engine).begin() as session:
        key, _ = keys.create_key(session, tenant="acme")
    api_port = free_port()
    ports = {name: free_port() for name in ("default", "high", "beat")}
    base = workers.service_env(
        pg_url,
        redis_url,
        **FAST,
        CONVEYOR_LOG_LEVEL="INFO",
        CONVEYOR_OTLP_ENDPOINT=otlp.url,
        CONVEYOR_API_PORT=str(api_port),
        CONVEYOR_API_RATE_PER_SECOND="0",
    )
    found = Platform(f"http://127.0.0.1:{api_port}", key, tmp_path, ports)
    commands = {
        "api": ["api"],
        "default": ["worker", "--pool", "default", "--concurrency", "2"],
        "high": ["worker", "--pool", "high", "--concurrency", "1"],
        "beat": ["beat"],
    }
    try:
        for name, args in commands.items():
            env = dict(base)
            if name in ports:
                env["CONVEYOR_METRICS_PORT"] = str(ports[name])
            found.processes[name] = workers.start(args, env, tmp_path / f"{name}.log")
        for name in ("api", "default", "high", "beat"):
            wait_until(lambda n=name: _answers(found, n), timeout=60, what=f"{name} metrics")
        yield found
    finally:
        for process in found.processes.values():
            workers.stop(process)


def _answers(platform: Platform, name: str) -> bool:
    process = platform.processes[name]
    assert process.poll() is None, (platform.logs / f"{name}.log").read_text()[-3000:]
    try:
        return bool(platform.scrape(name))
    except (httpx.HTTPError, AssertionError):
        return False


def samples(text: str, name: str) -> Counter[tuple[tuple[str, str], ...]]:
    """Values of the samples called `name`, by their labels."""
    found: Counter[tuple[tuple[str, str], ...]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] += sample.value
    return found


def summed(platform: Platform, name: str, sources: tuple[str, ...]) -> dict[tuple[str, ...], int]:
    """A counter added up over processes, keyed by its label values (label names sorted)."""
    total: Counter[tuple[str, ...]] = Counter()
    for source in sources:
        for labels, value in samples(platform.scrape(source), name).items():
            total[tuple(v for _, v in labels)] += int(value)
    return {k: v for k, v in total.items() if v}


def store_counts(engine: Engine) -> dict[str, dict[tuple[str, ...], int]]:
    """What the store says, keyed the way `summed` keys each counter."""
    with engine.connect() as conn:
        by_task_queue = conn.execute(
            select(jobs.c.queue, jobs.c.task, func.count()).group_by(jobs.c.queue, jobs.c.task)
        ).all()
        by_state = conn.execute(
            select(jobs.c.queue, jobs.c.state, jobs.c.task, func.count())
            .where(jobs.c.state.in_(TERMINAL))
            .group_by(jobs.c.queue, jobs.c.state, jobs.c.task)
        ).all()
        events = conn.execute(
            select(job_events.c.event, jobs.c.task, jobs.c.queue, func.count())
            .join(jobs, jobs.c.id == job_events.c.job_id)
            .where(job_events.c.event.in_(["claimed", "failed"]))
            .group_by(job_events.c.event, jobs.c.task, jobs.c.queue)
        ).all()
    started = {(q, t): n for e, t, q, n in events if e == "claimed"}
    retried: Counter[tuple[str, ...]] = Counter()
    for event, task, _queue, count in events:
        if event == "failed":
            retried[(task,)] += count
    return {
        "submitted": {(q, t): n for q, t, n in by_task_queue},
        "finished": {(q, s, t): n for q, s, t, n in by_state},
        "started": started,
        "retried": dict(retried),
    }


def test_counters_from_api_and_workers_equal_the_job_store(
    platform: Platform, pg_engine: Engine
) -> None:
    def job(task: str, payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"task": task, "payload": payload, **extra}

    batch = (
        [job("demo.echo", {"n": n}) for n in range(20)]
        + [job("demo.echo", {"n": n}, priority="high") for n in range(5)]
        + [job("demo.fail", {"failures": 2}) for _ in range(6)]
        + [job("demo.fail", {"failures": 1, "retryable": False}) for _ in range(4)]
        + [job("demo.fail", {"failures": 9}, max_attempts=2) for _ in range(3)]
        + [job("demo.sleep", {"seconds": 1}, delay_seconds=3600) for _ in range(2)]
    )
    with httpx.Client(base_url=platform.api_url, headers=platform.headers, timeout=10) as api:
        response = api.post("/v1/jobs/batch", json={"jobs": batch})
        assert response.status_code == 202, response.text
        for single in range(3):
            created = api.post("/v1/jobs", json=job("demo.echo", {"single": single}))
            assert created.status_code == 202, created.text
        waiting = [j["id"] for j in response.json()["jobs"] if j["task"] == "demo.sleep"]
        for job_id in waiting:
            assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    total = len(batch) + 3

    def all_finished() -> bool:
        with pg_engine.connect() as conn:
            done = conn.execute(select(func.count()).where(jobs.c.state.in_(TERMINAL))).scalar_one()
        return done == total

    wait_until(all_finished, timeout=90, interval=0.25, what="every job to finish")
    expected = store_counts(pg_engine)
    assert expected["finished"] == {
        ("default", "succeeded", "demo.echo"): 23,
        ("high", "succeeded", "demo.echo"): 5,
        ("default", "succeeded", "demo.fail"): 6,
        ("default", "dead", "demo.fail"): 7,
        ("default", "cancelled", "demo.sleep"): 2,
    }
    everyone = ("api", "default", "high", "beat")

    def scraped() -> dict[str, dict[tuple[str, ...], int]]:
        return {
            "submitted": summed(platform, "conveyor_jobs_submitted_total", everyone),
            "finished": summed(platform, "conveyor_jobs_finished_total", everyone),
            "started": summed(platform, "conveyor_jobs_started_total", everyone),
            "retried": summed(platform, "conveyor_jobs_retried_total", everyone),
        }

    # A worker counts right after its commit: give the last count a moment to land.
    last: dict[str, Any] = {}

    def matches() -> bool:
        last.update(scraped())
        return last == expected

    try:
        wait_until(matches, timeout=10, interval=0.2, what="counters to equal the store")
    finally:
        print(f"\nstore: {expected}\nscraped: {last}")
    # Submissions are counted by the API alone, outcomes by the process that made them.
    api_text = platform.scrape("api")
    assert sum(samples(api_text, "conveyor_jobs_submitted_total").values()) == total
    assert summed(platform, "conveyor_jobs_finished_total", ("api",)) == {
        ("default", "cancelled", "demo.sleep"): 2
    }
    # Every attempt that ran was timed; every first attempt's wait was measured.
    runs = summed(platform, "conveyor_job_run_seconds_count", ("default", "high"))
    assert sum(runs.values()) == sum(expected["started"].values())
    waits = summed(platform, "conveyor_job_queue_wait_seconds_count", ("default", "high"))
    assert waits == {("default",): total - 5 - 2, ("high",): 5}
    # Gauges read from the store and the broker (kept for a few seconds between reads),
    # and each process's own.
    wait_until(
        lambda: (
            samples(platform.scrape("api"), "conveyor_dead_jobs") == {(("task", "demo.fail"),): 7}
        ),
        timeout=15,
        what="the dead-jobs gauge",
    )
    depths = samples(api_text, "conveyor_queue_depth")
    assert {dict(k)["queue"] for k in depths} == {"high", "default", "low"}
    assert samples(platform.scrape("default"), "conveyor_worker_consuming") == {
        (("queue", "default"),): 1
    }
    wait_until(
        lambda: samples(platform.scrape("beat"), "conveyor_beat_leader") == {(): 1},
        timeout=20,
        what="beat to lead",
    )
    requests = samples(api_text, "conveyor_http_requests_total")
    assert requests[(("method", "POST"), ("route", "/v1/jobs/batch"), ("status", "202"))] == 1


def test_a_callers_trace_reaches_the_worker_logs_and_the_spans_link(
    platform: Platform, otlp: OtlpReceiver
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_span = "00f067aa0ba902b7"
    headers = {
        **platform.headers,
        "traceparent": f"00-{trace_id}-{caller_span}-01",
        "X-Request-ID": "checkout-42",
    }
    with httpx.Client(base_url=platform.api_url, timeout=10) as api:
        response = api.post(
            "/v1/jobs", json={"task": "demo.fail", "payload": {"failures": 1}}, headers=headers
        )
        assert response.status_code == 202, response.text
        assert response.headers["X-Request-ID"] == "checkout-42"
        job_id = response.json()["id"]
        wait_until(
            lambda: (
                api.get(f"/v1/jobs/{job_id}", headers=platform.headers).json()["state"]
                == "succeeded"
            ),
            timeout=30,
            what="the job to succeed after one retry",
        )

    def job_lines() -> list[dict[str, Any]]:
        return [line for line in platform.log_lines("default") if line.get("job_id") == job_id]

    lines = wait_until(
        lambda: [x for x in job_lines() if x["event"] == "job succeeded"] and job_lines(),
        timeout=10,
        what="the worker's log line of the success",
    )
    events = [line["event"] for line in lines]
    # One INFO line per attempt's outcome; "job started" is a DEBUG line.
    assert "job failed; retrying" in events and "job succeeded" in events, events
    for line in lines:
        assert line["trace_id"] == trace_id, line
        assert line["request_id"] == "checkout-42", line
        assert line["task"] == "demo.fail" and line["tenant"] == "acme", line
        assert line["queue"] == "default" and line["attempt"] in (1, 2), line

    # The spans: the caller's span → the API's request → its publish → the run; the retry
    # is published again (by the worker) as a child of the same trace. Each process
    # exports on its own schedule: wait until the API's spans and both runs are in.
    def arrived() -> list[Span] | None:
        found = otlp.of_trace(trace_id)
        names = [s.name for s in found]
        whole = names.count("run demo.fail") >= 2 and names.count("publish demo.fail") >= 2
        return found if whole and "POST /v1/jobs" in names else None

    spans = wait_until(arrived, timeout=20, what="the spans of the trace")
    by_id = {s.span_id: s for s in spans}
    # Exactly one server span for the request, child of the caller's.
    [request] = [s for s in spans if s.service == "conveyor-api" and s.name.startswith("POST")]
    assert request.name == "POST /v1/jobs" and request.parent_id == caller_span
    # Both publishes (the API's, then the worker's for the retry) hang off the request:
    # the job keeps the request's traceparent.
    publishes = {s.service: s for s in spans if s.name == "publish demo.fail"}
    assert set(publishes) == {"conveyor-api", "conveyor-worker"}
    assert all(p.parent_id == request.span_id for p in publishes.values())
    runs = [s for s in spans if s.name == "run demo.fail"]
    assert all(run.service == "conveyor-worker" for run in runs)
    first = next(run for run in runs if run.parent_id == publishes["conveyor-api"].span_id)
    retry = next(run for run in runs if run is not first)
    assert retry.parent_id == publishes["conveyor-worker"].span_id
    assert by_id[retry.parent_id].name == "publish demo.fail"
    print(f"\n{len(spans)} spans in trace {trace_id}: {sorted(s.name for s in spans)}")
