"""Prometheus metrics of every process, named `conveyor_*`.

Counters and histograms are counted where the thing happens: submissions and API
cancellations in the API, starts, retries and outcomes in the worker that ran the job,
fired schedules in beat. Worker processes run in prometheus-client's multiprocess mode
(see `multiproc`), so the runs of every prefork child are summed on the worker's port.
Gauges of shared state (queue depths, waiting and dead jobs, anomalies) are read from the
broker and the store when the API is scraped, by `StateCollector`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from conveyor.jobs.models import Job
from conveyor.observability.multiproc import MULTIPROC_ENV

log = logging.getLogger(__name__)

# Seconds: from a millisecond to an hour, so both echo jobs and long exports land in range.
DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)

WORKFLOWS_SUBMITTED = Counter(
    "conveyor_workflows_submitted_total", "Workflows accepted into the store."
)
JOBS_SUBMITTED = Counter(
    "conveyor_jobs_submitted_total", "Jobs accepted into the store.", ["task", "queue"]
)
JOBS_STARTED = Counter(
    "conveyor_jobs_started_total", "Attempts claimed by a worker.", ["task", "queue"]
)
JOBS_FINISHED = Counter(
    "conveyor_jobs_finished_total",
    "Jobs that reached a terminal state, by that state.",
    ["task", "queue", "state"],
)
JOBS_RETRIED = Counter(
    "conveyor_jobs_retried_total", "Failed attempts that will be tried again.", ["task"]
)
JOBS_DEFERRED = Counter(
    "conveyor_jobs_deferred_total",
    "Deliveries put back to wait by a flow-control limit.",
    ["task", "reason"],
)
JOB_RUN_SECONDS = Histogram(
    "conveyor_job_run_seconds",
    "Run time of attempts, by task type.",
    ["task"],
    buckets=DURATION_BUCKETS,
)
JOB_QUEUE_WAIT_SECONDS = Histogram(
    "conveyor_job_queue_wait_seconds",
    "Time from a job's due time to the start of its attempt.",
    ["queue"],
    buckets=DURATION_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "conveyor_http_requests_total", "API requests answered.", ["method", "route", "status"]
)
HTTP_REQUEST_SECONDS = Histogram(
    "conveyor_http_request_seconds",
    "API request latency.",
    ["method", "route"],
    buckets=DURATION_BUCKETS,
)
WORKER_CONSUMING = Gauge(
    "conveyor_worker_consuming",
    "1 for each live worker process consuming the queue.",
    ["queue"],
    multiprocess_mode="livemax",
)
BEAT_LEADER = Gauge(
    "conveyor_beat_leader",
    "1 while this beat holds the leader lease, 0 on a standby.",
    multiprocess_mode="livemax",
)
BEAT_TICKS = Counter("conveyor_beat_ticks_total", "Scheduler ticks of this beat.")
SCHEDULE_FIRED = Counter(
    "conveyor_schedule_fired_total", "Jobs created by users' schedules.", ["schedule"]
)


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def labelled(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, kept: the per-job metrics skip the label checks and lock
    of prometheus-client's lookup after the first time (a pool child forked with some
    keeps them; their values notice the new process themselves)."""
    key = (id(metric), values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def count_submitted(jobs: Iterable[Job]) -> None:
    """Count newly recorded jobs."""
    for job in jobs:
        labelled(JOBS_SUBMITTED, job.task, job.queue).inc()


def count_finished(job: Job, state: str) -> None:
    """Count a job that reached the terminal `state` in this process."""
    labelled(JOBS_FINISHED, job.task, job.queue, state).inc()


def registry_for_scrape() -> CollectorRegistry:
    """This process's registry; in multiprocess mode, one that sums every process's files."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, with its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


_served_lock = threading.Lock()
_served_port: int | None = None


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` once per process; 0 serves nothing."""
    global _served_port
    if port == 0:
        return
    with _served_lock:
        if _served_port is not None:
            return
        start_http_server(port, addr=host, registry=registry_for_scrape())
        _served_port = port


@dataclass
class StateReading:
    """What the store and the broker say, read at one scrape."""

    depths: dict[str, int]
    waiting: dict[str, dict[str, int]]
    dead: dict[str, int]
    oldest_queued: dict[str, float]
    anomalies: list[tuple[str, str]]
    workflows: dict[str, int] = field(default_factory=dict)


class StateCollector(Collector):
    """Gauges of shared state, read at scrape time and kept for `max_age` seconds."""

    def __init__(self, read: Callable[[], StateReading], max_age: float = 5.0) -> None:
        self._read = read
        self._max_age = max_age
        self._lock = threading.Lock()
        self._cached: tuple[float, StateReading] | None = None

    def _reading(self) -> StateReading | None:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self._max_age:
                return self._cached[1]
            try:
                reading = self._read()
            except Exception as error:
                # The store or the broker is away: /readyz says which; skip these gauges.
                log.warning("metrics: cannot read the store or the broker: %s", error)
                return None
            self._cached = (now, reading)
            return reading

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges (nothing when the state cannot be read)."""
        reading = self._reading()
        if reading is None:
            return
        yield _gauge(
            "conveyor_queue_depth",
            "Messages waiting in the broker's queue.",
            ["queue"],
            (([queue], count) for queue, count in reading.depths.items()),
        )
        yield _gauge(
            "conveyor_jobs_waiting",
            "Unfinished jobs in the store by queue and state.",
            ["queue", "state"],
            (
                ([queue, state], count)
                for queue, states in reading.waiting.items()
                for state, count in states.items()
            ),
        )
        yield _gauge(
            "conveyor_dead_jobs",
            "Dead jobs kept in the store, by task.",
            ["task"],
            (([task], count) for task, count in reading.dead.items()),
        )
        yield _gauge(
            "conveyor_oldest_queued_seconds",
            "Age of the oldest queued job, by queue.",
            ["queue"],
            (([queue], age) for queue, age in reading.oldest_queued.items()),
        )
        yield _gauge(
            "conveyor_anomaly",
            "1 while a task type's signal departs from its own baseline.",
            ["task", "signal"],
            (([task, signal], 1) for task, signal in set(reading.anomalies)),
        )
        yield _gauge(
            "conveyor_workflows",
            "Workflows in the store, by state (running, succeeded, failed, cancelled).",
            ["state"],
            (([state], count) for state, count in reading.workflows.items()),
        )


def _gauge(
    name: str,
    documentation: str,
    labels: list[str],
    values: Iterable[tuple[list[str], float]],
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label_values, value in sorted(values):
        family.add_metric(label_values, value)
    return family
