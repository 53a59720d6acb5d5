"""Schemathesis against the live API: every operation of /openapi.json, fuzzed over HTTP.

A real uvicorn server on a free loopback port serves the app over a fresh PostgreSQL
database and Redis; requests carry an API key with every scope. Every response must be
free of server errors and conform to the published schema (status code documented,
content type, headers and body valid), along with the rest of schemathesis' default
checks: schema-violating requests are rejected, schema-valid ones accepted, methods the
schema does not list answer 405 with an exact `Allow`, and auth is enforced.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.schemas import OpenApiSchema
from sqlalchemy import Engine

from conveyor.config import Settings
from tests.integration.conftest import LiveApi, serving

SEED = 20240601
MAX_EXAMPLES = 25
BODY_LIMIT = 4096

# Schemathesis' default expectations, plus 413: the body-size limit is a documented answer
# that no JSON Schema can express, and it is as much a rejection as a 422.
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "413", "429"]

# Where a schema-valid request may still fail validation (422), because what is valid
# depends on state or on rules the published schema cannot state.
SEMANTIC_422 = {
    # The task must be registered and the payload must fit that task's own schema
    # (GET /v1/task-types publishes them); an Idempotency-Key reused with another body;
    # a cron expression or time zone that does not parse.
    "POST /v1/jobs",
    "POST /v1/jobs/batch",
    "POST /v1/schedules",
    "PATCH /v1/schedules/{name}",
    # A workflow's steps must also form a DAG: known keys in `after`, no cycle.
    "POST /v1/workflows",
    # Cursors are opaque: only those the API handed out decode.
    "GET /v1/jobs",
    "GET /v1/workflows",
    # A window is `<n>[smhd]` between one second and 30 days.
    "GET /v1/stats",
}


@pytest.fixture
def live_api(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[LiveApi]:
    """The live API with a small body limit, so that 413 answers are reached."""
    settings = Settings(
        database_url=pg_url,
        broker_url=redis_url,
        max_body_bytes=BODY_LIMIT,
        api_rate_per_second=0,
    )
    with serving(settings, pg_engine, "fuzz") as api:
        yield api


@pytest.fixture
def api_schema(live_api: LiveApi) -> OpenApiSchema:
    """The schema the live API publishes, set up for a short and reproducible run."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": live_api.url,
            "headers": live_api.auth,
            "request-timeout": 10,
            "cache": {"enabled": False},
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                # Shrinking replays against a server whose state has moved on; report as found.
                "no-shrink": True,
            },
            "checks": {
                "negative_data_rejection": {"expected-statuses": REJECTED},
                "positive_data_acceptance": {"expected-statuses": ACCEPTED},
            },
            "operations": [
                {
                    "include-name": sorted(SEMANTIC_422),
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "422"]}
                    },
                }
            ],
        }
    )
    schema = schemathesis.openapi.from_url(f"{live_api.url}/openapi.json", config=config)
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}", "GET /healthz"} <= labels
    return schema


if not hasattr(pytest.Item, "_nodeid"):
    # schemathesis' fixture-loaded schemas rename the running test per operation through
    # `Node._nodeid`, which pytest 9.2 replaced by a structured `_id`; give the old name back.
    from _pytest.nodeid import coerce_node_id

    def _get_nodeid(node: pytest.Item) -> str:
        return node.nodeid

    def _set_nodeid(node: pytest.Item, value: str) -> None:
        node._id = coerce_node_id(value)

    pytest.Item._nodeid = property(_get_nodeid, _set_nodeid)  # type: ignore[attr-defined]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_every_operation_conforms_to_the_schema(case: Case, live_api: LiveApi) -> None:
    """Examples, coverage and fuzzing phases, each operation a subtest."""
    # The key, though configured, is named here too: the auth check then probes each call
    # without it and with a bad one, rather than taking it for a key it generated itself.
    case.call_and_validate(headers=live_api.auth)


def test_sequences_of_calls_conform_to_the_schema(
    api_schema: OpenApiSchema, live_api: LiveApi
) -> None:
    """Stateful: ids from responses (a submitted job) feed the operations that take them."""
    checked: list[str] = []
    failures: list[Exception] = []

    class Machine(api_schema.as_state_machine()):  # type: ignore[misc]
        def validate_response(
            self,
            response: schemathesis.Response,
            case: Case,
            additional_checks: list[schemathesis.CheckFunction] | None = None,
            **kwargs: Any,
        ) -> None:
            checked.append(case.operation.label)
            try:
                # Name the key as the request's own, as in the test above.
                case.validate_response(
                    response,
                    additional_checks=additional_checks,
                    headers=live_api.auth,
                    transport_kwargs=kwargs or None,
                    recorder=self.recorder,
                )
            except Exception as error:
                failures.append(error)
                raise

    try:
        Machine.run(
            settings=hypothesis.settings(
                max_examples=MAX_EXAMPLES,
                stateful_step_count=6,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
        )
    except hypothesis.errors.Flaky:
        # Hypothesis replayed a sequence against a server whose state had moved on (a key
        # used twice, a job since cancelled). As in schemathesis' own runner, that is no
        # failure unless a check failed on the way.
        if failures:
            raise failures[0] from None
    assert failures == []
    assert len(checked) >= MAX_EXAMPLES, checked
    assert "GET /v1/jobs/{job_id}" in checked


# Inputs fuzzing once found answered with a 500, kept as fixed cases: PostgreSQL refuses
# NUL characters in text and JSON, and that is bad input (422), not a server error.
FOUND = [
    pytest.param("GET", "/v1/dead-letters", {"query": {"task": "\x00"}}, id="nul-in-query"),
    pytest.param("GET", "/v1/jobs", {"query": {"tag": "a\x00b"}}, id="nul-in-filter"),
    pytest.param(
        "POST",
        "/v1/jobs",
        {"body": {"task": "demo.echo", "payload": {"text": "a\x00b"}}},
        id="nul-in-payload",
    ),
    pytest.param(
        "POST", "/v1/jobs", {"body": {"task": "demo.echo", "tags": ["a\x00b"]}}, id="nul-in-tag"
    ),
]


@pytest.mark.parametrize(("method", "path", "data"), FOUND)
def test_inputs_once_found_are_problems(
    api_schema: OpenApiSchema, live_api: LiveApi, method: str, path: str, data: dict[str, Any]
) -> None:
    case = api_schema[path][method].Case(**data)
    response = case.call_and_validate(headers=live_api.auth)
    assert response.status_code == 422, response.text


def test_a_repeated_submission_answers_as_documented(
    api_schema: OpenApiSchema, live_api: LiveApi
) -> None:
    """Stateful fuzzing found the replay of an Idempotency-Key (200) undocumented."""
    case = api_schema["/v1/jobs"]["POST"].Case(
        headers={"Idempotency-Key": "order-1"}, body={"task": "demo.echo", "payload": {"n": 1}}
    )
    first, again = (case.call_and_validate(headers=live_api.auth) for _ in range(2))
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
