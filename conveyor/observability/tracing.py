"""Traces from the HTTP request to the run, linked by W3C `traceparent`.

Every job carries a traceparent: the request's (the caller's, or a new one) when it was
submitted over HTTP, a new one otherwise. It is kept on the job's row, so a message the
relay publishes later still carries it, and it travels in the message's headers. With
CONVEYOR_OTLP_ENDPOINT set, the API records a span per request, the publisher one per
message and the worker one per run, exported over OTLP/HTTP; without it no span is
recorded, but the trace id still reaches every log line about the job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT = "traceparent"
_provider: Any = None


def setup(endpoint: str | None, service: str) -> None:
    """Export spans to `endpoint` (OTLP over HTTP) from this process; nothing when unset."""
    global _provider
    if not endpoint or _provider is not None:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=5)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider


def enabled() -> bool:
    """Whether this process records and exports spans."""
    return _provider is not None


def flush() -> None:
    """Send the spans still buffered (a prefork child about to end calls this)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=2000)


def tracer() -> trace.Tracer:
    """The tracer of Conveyor's spans (a no-op one unless `setup` exported)."""
    return trace.get_tracer("conveyor")


def _new_ids() -> tuple[int, int]:
    """A random trace id and span id, neither all zeros."""
    while True:
        ids = int.from_bytes(os.urandom(24), "big")
        trace_id, span_id = ids >> 64, ids & (2**64 - 1)
        if trace_id and span_id:
            return trace_id, span_id


def new_context() -> Context:
    """A context holding a new trace (no span is recorded for it by itself)."""
    trace_id, span_id = _new_ids()
    span = SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(span))


def _traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """W3C Trace Context's `traceparent`, version 00, as the propagator writes it."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def new_traceparent() -> str:
    """The traceparent of a new, sampled trace (random ids, never all zeros).

    Written directly: every job of a batch gets one, and the propagator's round through
    a context and a carrier cost several times the formatting.
    """
    return _traceparent(*_new_ids(), TraceFlags.SAMPLED)


def extract(carrier: Mapping[str, Any]) -> Context | None:
    """The trace context a request or message carries; None when it has no valid one."""
    found = PROPAGATOR.extract({k.lower(): str(v) for k, v in carrier.items() if v})
    if not trace.get_current_span(found).get_span_context().is_valid:
        return None
    return found


def from_traceparent(traceparent: str | None) -> Context | None:
    """The context of a stored traceparent."""
    return extract({TRACEPARENT: traceparent}) if traceparent else None


def current_traceparent() -> str | None:
    """The traceparent of the current span, or None outside any trace."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return _traceparent(span_context.trace_id, span_context.span_id, span_context.trace_flags)


def trace_id_of(context: Context | None = None) -> str | None:
    """The 32-hex-digit trace id of `context` (default: the current one)."""
    span_context = trace.get_current_span(context).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def trace_id_in(traceparent: str | None) -> str | None:
    """The trace id inside a traceparent string."""
    context = from_traceparent(traceparent)
    return None if context is None else trace_id_of(context)


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Context | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Iterator[Span]:
    """A span made current, child of `parent` (default: the current context).

    Without export no span is made (it would record nothing): the parent is made current,
    so its trace id still reaches the log lines, and the span given is the parent's own
    non-recording one.
    """
    token = otel_context.attach(parent) if parent is not None else None
    try:
        if _provider is None:
            yield trace.get_current_span()
            return
        with tracer().start_as_current_span(
            name, kind=kind, attributes=dict(attributes or {})
        ) as current:
            yield current
    finally:
        if token is not None:
            otel_context.detach(token)
