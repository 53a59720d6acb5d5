"""Log format and context, request ids, and trace context helpers."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from conveyor.api.telemetry import request_id_of
from conveyor.observability import logs, tracing


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level


def test_json_lines_carry_the_bound_job_context(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("INFO", "json", "conveyor-worker")
    log = logs.get("conveyor.test")
    with logs.bound(job_id="j-1", task="demo.echo", attempt=2, trace_id="ab" * 16):
        log.info("job started")
        logging.getLogger("celery.any").warning("from %s", "a library")
    log.info("after", detail=3)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == ["job started", "from a library", "after"]
    for line in lines[:2]:
        assert line["job_id"] == "j-1" and line["attempt"] == 2 and line["task"] == "demo.echo"
        assert line["service"] == "conveyor-worker"
    assert "job_id" not in lines[2] and lines[2]["detail"] == 3
    assert lines[1]["level"] == "warning" and lines[1]["logger"] == "celery.any"


def test_console_format_is_readable_lines(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("INFO", "console")
    with logs.bound(job_id="j-2"):
        logs.get("conveyor.test").info("job succeeded")
    err = capsys.readouterr().err
    assert "job succeeded" in err and "job_id=j-2" in err
    with pytest.raises(ValueError):
        json.loads(err)


def test_a_request_id_is_kept_only_when_it_is_a_short_token() -> None:
    assert request_id_of({"x-request-id": "checkout-42"}) == "checkout-42"
    for bad in ("", "has space", "x" * 101, "semi;colon"):
        made = request_id_of({"x-request-id": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", made), bad


def test_trace_context_round_trips_through_a_traceparent() -> None:
    made = tracing.new_traceparent()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", made)
    assert tracing.trace_id_in(made) == made.split("-")[1]
    assert tracing.trace_id_in("00-" + "0" * 32 + "-" + "1" * 16 + "-01") is None
    assert tracing.extract({"traceparent": "garbage"}) is None
    assert tracing.trace_id_in(None) is None
    # Without export, a span keeps its parent's trace id current.
    with tracing.span("run", parent=tracing.from_traceparent(made)):
        assert tracing.trace_id_of() == made.split("-")[1]
        assert tracing.current_traceparent() is not None
    assert tracing.current_traceparent() is None  # outside any trace


def test_traceparents_are_written_as_the_propagator_writes_them() -> None:
    made = {tracing.new_traceparent() for _ in range(100)}
    assert len(made) == 100  # new ids every time
    for traceparent in made:
        carrier: dict[str, str] = {}
        tracing.PROPAGATOR.inject(carrier, context=tracing.from_traceparent(traceparent))
        assert carrier["traceparent"] == traceparent
    with tracing.span("run", parent=tracing.from_traceparent(made.pop())):
        carrier = {}
        tracing.PROPAGATOR.inject(carrier)
        assert tracing.current_traceparent() == carrier["traceparent"]


def test_celery_per_task_and_startup_lines_are_kept_for_debug() -> None:
    logs.setup("INFO", "json")
    quiet = [*logs.PER_TASK_LOGGERS, *logs.QUIET_LOGGERS]
    assert all(not logging.getLogger(name).isEnabledFor(logging.INFO) for name in quiet)
    # What goes wrong is still shown: a consumer that loses its broker, say.
    assert logging.getLogger("celery.worker.consumer.consumer").isEnabledFor(logging.WARNING)
    assert logging.getLogger("conveyor.worker.execute").isEnabledFor(logging.INFO)
    logs.setup("DEBUG", "json")
    assert all(logging.getLogger(name).isEnabledFor(logging.DEBUG) for name in quiet)
    logs.setup("INFO", "json")
