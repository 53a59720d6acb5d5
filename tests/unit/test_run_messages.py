"""The Redis form of a run message, written as text, against the headers kombu is given."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest

from conveyor.config import Settings
from conveyor.jobs import bulk_insert
from conveyor.jobs.models import Job, NewJob
from conveyor.worker.app import create_celery
from conveyor.worker.messages import RunMessages


def job(**given: Any) -> Job:
    values: dict[str, Any] = {
        "tenant": "t",
        "task": "demo.echo",
        "payload": {},
        "priority": "default",
        "queue": "default",
        "max_attempts": 3,
        "timeout_seconds": 30.0,
    }
    values.update(given)
    [made] = bulk_insert.recorded([NewJob(**values)], [("queued", dt.datetime.now(dt.UTC))])
    return made


@pytest.fixture(scope="module")
def messages() -> RunMessages:
    settings = Settings(database_url="sqlite:///unused.db", broker_url="redis://127.0.0.1:1/0")
    return RunMessages(create_celery(settings))


@pytest.mark.parametrize(
    "given",
    [
        {},
        {"timeout_seconds": 60},
        {"timeout_seconds": 2.5, "queue": "critical"},
        {"tenant": 'a "quoted"\\ténant\n', "request_id": 'req-\u2603-"1"'},
        {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "request_id": "r1"},
    ],
)
@pytest.mark.parametrize("countdown", [None, 0, 2.5])
def test_redis_text_is_the_envelope_of_the_headers_kombu_is_given(
    messages: RunMessages, given: dict[str, Any], countdown: float | None
) -> None:
    made = job(**given)
    text = messages.redis_message(made, countdown)
    written = json.loads(text)
    _, headers = messages._headers(made, countdown)
    # New for every message: the task id, the delivery tag, and the due time.
    ours_id = written["headers"]["id"]
    assert written["headers"]["root_id"] == written["properties"]["correlation_id"] == ours_id
    headers["id"] = headers["root_id"] = ours_id
    if countdown:
        due = dt.datetime.fromisoformat(written["headers"]["eta"])
        assert dt.timedelta(0) < due - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=countdown)
        headers["eta"] = written["headers"]["eta"]
    assert list(written["headers"].items()) == list(headers.items())
    assert written == {
        "body": base64.b64encode(
            f'[["{made.id}"], {{}}, {{"callbacks": null, "errbacks": null, "chain": null, '
            f'"chord": null}}]'.encode()
        ).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": ours_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": made.queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": written["properties"]["delivery_tag"],
        },
    }
    assert written["properties"]["delivery_tag"] != ours_id
    # Numbers exactly as json.dumps writes them (60 stays 60, 70.0 stays 70.0).
    assert json.dumps(headers["timelimit"]) in text
