"""Each request's id, trace span, metrics and log line; and `GET /metrics`.

A request keeps the caller's `X-Request-ID` when it is a short token (else gets a new
one) and answers with it; jobs it submits carry it into the workers' log lines. The
caller's W3C `traceparent` is continued; without one the request starts a new trace.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from opentelemetry.trace import SpanKind
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.state import ApiState
from conveyor.jobs import anomalies, store
from conveyor.jobs.store import workflows as flows
from conveyor.observability import logs, metrics, tracing

REQUEST_ID = "x-request-id"
_READ = frozenset({REQUEST_ID.encode(), b"traceparent", b"tracestate"})
_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,100}")

log = logs.get("conveyor.api.access")
_access = logging.getLogger("conveyor.api.access")
router = APIRouter(tags=["operations"])


def request_id_of(headers: dict[str, str]) -> str:
    """The caller's request id when it is a plain token of at most 100 characters."""
    given = headers.get(REQUEST_ID, "")
    return given if _TOKEN.fullmatch(given) else os.urandom(16).hex()


def route_of(scope: Scope) -> str:
    """The matched route's template (bounded label values), or `unmatched`."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class Telemetry:
    """ASGI middleware wrapping every HTTP request in its id, span, metrics and log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Only the three headers read here are decoded (ASGI names are lower case).
        wanted: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _READ:
                wanted[name.decode("latin-1")] = value.decode("latin-1")
        request_id = request_id_of(wanted)
        parent = tracing.extract(wanted) if "traceparent" in wanted else None
        if parent is None and not tracing.enabled():
            parent = tracing.new_context()
        method = scope["method"]
        status = 500
        began = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID.encode(), request_id.encode()),
                ]
            await send(message)

        # The log fields are bound inside the span: its trace id is the one they name.
        with (
            tracing.span(f"HTTP {method}", kind=SpanKind.SERVER, parent=parent) as span,
            logs.bound(request_id=request_id, trace_id=tracing.trace_id_of()),
        ):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                route = route_of(scope)
                elapsed = time.perf_counter() - began
                if span.is_recording():
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.request.method", method)
                    span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                metrics.labelled(metrics.HTTP_REQUESTS, method, route, str(status)).inc()
                metrics.labelled(metrics.HTTP_REQUEST_SECONDS, method, route).observe(elapsed)
                if _access.isEnabledFor(logging.DEBUG):  # a line not written costs nothing
                    log.debug(
                        "request",
                        method=method,
                        route=route,
                        status=status,
                        seconds=round(elapsed, 6),
                    )


class ReadsCollector(Collector):
    """`conveyor_db_reads_total{database}`: read sessions served by the primary and by
    the replica, in this API process."""

    def __init__(self, state: ApiState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        """Yield the counter."""
        family = CounterMetricFamily(
            "conveyor_db_reads",
            "Read sessions by the database that served them.",
            labels=["database"],
        )
        for database, count in sorted(self._state.read_sessions.served.items()):
            family.add_metric([database], count)
        yield family


def state_reader(state: ApiState) -> metrics.StateReading:
    """Read the gauges' state from the broker and the store."""
    depths = state.queue_depths() if state.queue_depths is not None else {}
    now = store.utcnow()
    with state.read_sessions() as session:
        waiting = store.counts_by_queue(session)
        dead = store.dead_counts_by_task(session)
        oldest = store.oldest_queued_by_queue(session)
        flagged = anomalies.open_anomalies(session)
        workflow_states = flows.workflow_counts(session)
    for states in waiting.values():
        states.pop("rate_limited", None)
    return metrics.StateReading(
        depths=depths,
        waiting=waiting,
        dead=dead,
        oldest_queued={q: max(0.0, (now - at).total_seconds()) for q, at in oldest.items()},
        anomalies=flagged,
        workflows=workflow_states,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def scrape(request: Request) -> Response:
    """Prometheus metrics of this process, and gauges of the store and the broker."""
    app_state: Any = request.app.state
    body, content_type = metrics.render(metrics.registry_for_scrape())
    gauges, _ = metrics.render(app_state.conveyor_gauges)
    return Response(body + gauges, media_type=content_type)
