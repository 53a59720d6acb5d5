"""On PostgreSQL: what the store cannot keep as sent is refused (422), and the rest round trips.

Bodies are sent as raw text, since the values under test (1e999999, NaN, `\\u0000`, a
lone `\\ud800`) are exactly what a JSON encoder on the client side would refuse or alter.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import jobs, schedules
from conveyor.tasks.json_values import MAX_DEPTH

PROBLEM = "application/problem+json"


@pytest.fixture
def headers(pg_engine: Engine) -> dict[str, str]:
    """A key with every scope, and a JSON content type for the raw bodies."""
    with make_session_factory(pg_engine).begin() as session:
        key, _ = keys.create_key(session, tenant="acme", scopes=keys.SCOPES)
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def rows(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def assert_refused(response: Any, loc: list[str | int]) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "/problems/unstorable-value", problem
    assert loc in [error["loc"] for error in problem["errors"]], problem


WEBHOOK = '"task": "webhook.deliver", "payload": {"url": "http://example.com/", "body": {}, '

SUBMISSIONS = [
    pytest.param(
        '"task": "demo.echo", "payload": {"x": 1e999999}', ["payload", "x"], id="1e999999"
    ),
    pytest.param(
        '"task": "demo.echo", "payload": {"x": -1e999999}', ["payload", "x"], id="-1e999999"
    ),
    pytest.param('"task": "demo.echo", "payload": {"x": NaN}', ["payload", "x"], id="nan"),
    pytest.param(
        '"task": "demo.echo", "payload": {"x": Infinity}', ["payload", "x"], id="infinity"
    ),
    pytest.param(
        '"task": "demo.echo", "payload": {"x": -Infinity}', ["payload", "x"], id="-infinity"
    ),
    pytest.param(
        '"task": "demo.echo", "payload": {"a": [0, {"b": 1e400}]}',
        ["payload", "a", 1, "b"],
        id="inside-an-array",
    ),
    pytest.param(
        '"task": "demo.sleep", "payload": {"seconds": NaN}',
        ["payload", "seconds"],
        id="nan-in-a-typed-field",
    ),
    pytest.param(
        '"task": "demo.echo", "payload": {"x": "a\\u0000b"}', ["payload", "x"], id="nul-in-text"
    ),
    pytest.param(
        '"task": "demo.echo", "payload": {"a\\u0000b": 1}', ["payload", "a\x00b"], id="nul-in-a-key"
    ),
    pytest.param(
        '"task": "demo.echo", "payload": {"x": "\\ud800"}', ["payload", "x"], id="surrogate-in-text"
    ),
    # The key comes back as its escape: it has no UTF-8 form to show.
    pytest.param(
        '"task": "demo.echo", "payload": {"\\udc00": 1}',
        ["payload", "\\udc00"],
        id="surrogate-in-a-key",
    ),
    pytest.param('"task": "demo.echo", "tags": ["a\\u0000"]', ["tags", 0], id="nul-in-a-tag"),
    pytest.param(
        '"task": "demo.echo", "tags": ["ok", "\\udfff"]', ["tags", 1], id="surrogate-in-a-tag"
    ),
    pytest.param(
        WEBHOOK + '"headers": {"X-A": "a\\u0000"}}',
        ["payload", "headers", "X-A"],
        id="nul-in-a-header",
    ),
    pytest.param(
        WEBHOOK + '"headers": {"X-A": "\\ud800"}}',
        ["payload", "headers", "X-A"],
        id="surrogate-in-a-header",
    ),
    pytest.param(
        WEBHOOK + '"headers": {"\\ud800": "x"}}',
        ["payload", "headers", "\\ud800"],
        id="surrogate-in-a-header-name",
    ),
    pytest.param('"task": "demo.echo\\u0000"', ["task"], id="nul-in-the-task"),
    pytest.param(
        '"task": "demo.echo", "payload": {"x": ' + "[" * 200 + "]" * 200 + "}",
        # The first array past the limit; the body and the payload are two of its levels.
        ["payload", "x", *[0] * (MAX_DEPTH - 2)],
        id="nested-too-deep",
    ),
]


@pytest.mark.parametrize(("fields", "loc"), SUBMISSIONS)
def test_a_submission_the_store_cannot_keep_is_refused_and_not_recorded(
    client: TestClient,
    pg_engine: Engine,
    headers: dict[str, str],
    fields: str,
    loc: list[str | int],
) -> None:
    response = client.post("/v1/jobs", content=f"{{{fields}}}", headers=headers)
    assert_refused(response, ["body", *loc])
    assert rows(pg_engine, jobs) == 0


def test_a_batch_names_the_job_and_records_none(
    client: TestClient, pg_engine: Engine, headers: dict[str, str]
) -> None:
    body = (
        '{"jobs": [{"task": "demo.echo", "payload": {"x": 1}},'
        ' {"task": "demo.echo", "payload": {"x": 1e999999}},'
        ' {"task": "demo.echo", "payload": {"y": "\\u0000"}, "tags": ["\\ud800"]}]}'
    )
    response = client.post("/v1/jobs/batch", content=body, headers=headers)
    assert_refused(response, ["body", "jobs", 1, "payload", "x"])
    assert [e["loc"] for e in response.json()["errors"]] == [
        ["body", "jobs", 1, "payload", "x"],
        ["body", "jobs", 2, "payload", "y"],
        ["body", "jobs", 2, "tags", 0],
    ]
    assert rows(pg_engine, jobs) == 0


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        pytest.param('"payload": {"x": 1e999999}', ["payload", "x"], id="not-finite"),
        pytest.param('"payload": {"x": ["\\u0000"]}', ["payload", "x", 0], id="nul"),
        pytest.param('"payload": {"x": "\\ud800"}', ["payload", "x"], id="surrogate"),
        pytest.param('"payload": {}, "timezone": "UTC\\u0000"', ["timezone"], id="nul-in-zone"),
    ],
)
def test_a_schedule_the_store_cannot_keep_is_refused_and_not_created(
    client: TestClient,
    pg_engine: Engine,
    headers: dict[str, str],
    fields: str,
    loc: list[str | int],
) -> None:
    body = f'{{"name": "nightly", "task": "demo.echo", "interval_seconds": 60, {fields}}}'
    response = client.post("/v1/schedules", content=body, headers=headers)
    assert_refused(response, ["body", *loc])
    assert rows(pg_engine, schedules) == 0
    assert rows(pg_engine, jobs) == 0


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        pytest.param('{"payload": {"x": NaN}}', ["payload", "x"], id="not-finite"),
        pytest.param('{"payload": {"x": "\\u0000"}}', ["payload", "x"], id="nul"),
        pytest.param('{"payload": {"\\udfff": 1}}', ["payload", "\\udfff"], id="surrogate-key"),
    ],
)
def test_a_schedule_change_the_store_cannot_keep_is_refused_and_not_applied(
    client: TestClient, headers: dict[str, str], body: str, loc: list[str | int]
) -> None:
    created = client.post(
        "/v1/schedules",
        json={"name": "nightly", "task": "demo.echo", "payload": {"n": 1}, "interval_seconds": 60},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    response = client.patch("/v1/schedules/nightly", content=body, headers=headers)
    assert_refused(response, ["body", *loc])
    assert client.get("/v1/schedules/nightly", headers=headers).json()["payload"] == {"n": 1}


# What JSON can hold comes back as it was sent: large integers stay exact integers, text
# keeps every character (control characters and those beyond the BMP included).
ROUND_TRIP = (
    '{"big": 12345678901234567890123, "negative": -98765432109876543210987654321,'
    ' "u64": 18446744073709551616, "small": -1, "zero": 0, "half": 0.5, "tenth": 0.1,'
    ' "tiny": 1e-7, "one": 1.0, "max": 9007199254740993,'
    ' "text": "é ключ 😀 \\ud83d\\ude00 \\uffff \\t\\n\\u0001 \\"quoted\\" \\\\",'
    ' "😀 key": [true, false, null, [], {}, [[["deep"]]]],'
    ' "nested": {"list": [1, 2.25, "three", {"four": 4}]}}'
)


def same(sent: Any, returned: Any) -> bool:
    """Equal, and of the same JSON type all the way down (no 1 for 1.0, no 1.0 for 1)."""
    if type(sent) is not type(returned):
        return False
    if isinstance(sent, dict):
        return sent.keys() == returned.keys() and all(same(v, returned[k]) for k, v in sent.items())
    if isinstance(sent, list):
        return len(sent) == len(returned) and all(map(same, sent, returned))
    return bool(sent == returned)


def test_what_is_accepted_is_returned_exactly(
    client: TestClient, pg_engine: Engine, headers: dict[str, str]
) -> None:
    sent = json.loads(ROUND_TRIP)
    body = f'{{"task": "demo.echo", "payload": {ROUND_TRIP}, "tags": ["é", "😀", "a b"]}}'
    submitted = client.post("/v1/jobs", content=body, headers=headers)
    assert submitted.status_code == 202, submitted.text
    assert same(sent, submitted.json()["payload"])
    read = client.get(submitted.headers["location"], headers=headers)
    assert read.status_code == 200
    assert same(sent, read.json()["payload"]), read.text
    assert read.json()["tags"] == ["é", "😀", "a b"]
    assert read.json()["payload"]["big"] == 12345678901234567890123

    batch = client.post(
        "/v1/jobs/batch",
        content=f'{{"jobs": [{{"task": "demo.echo", "payload": {ROUND_TRIP}}}]}}',
        headers=headers,
    )
    assert batch.status_code == 202, batch.text
    job_id = batch.json()["jobs"][0]["id"]
    assert same(sent, client.get(f"/v1/jobs/{job_id}", headers=headers).json()["payload"])

    schedule = (
        f'{{"name": "exact", "task": "demo.echo", "interval_seconds": 60, "payload": {ROUND_TRIP}}}'
    )
    assert client.post("/v1/schedules", content=schedule, headers=headers).status_code == 201
    assert same(sent, client.get("/v1/schedules/exact", headers=headers).json()["payload"])
    assert rows(pg_engine, jobs) == 2
