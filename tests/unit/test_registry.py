"""The built-in task types and the payloads each accepts."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from conveyor.jobs.states import Priority
from conveyor.tasks import registry
from conveyor.tasks.registry import Registry, TaskType, UnknownTask

BUILT_IN = ("demo.echo", "demo.fail", "demo.sleep", "webhook.deliver")


def test_built_in_task_types_are_registered() -> None:
    names = [t.name for t in registry.all()]
    assert set(BUILT_IN) <= set(names)
    assert names == sorted(names)
    for name in BUILT_IN:
        assert name in registry
        task_type = registry.get(name)
        assert isinstance(task_type, TaskType)
        assert task_type.name == name
        assert callable(task_type.handler)
        assert task_type.description  # taken from the handler's docstring
        assert isinstance(task_type.priority, Priority)
        assert task_type.max_attempts >= 1
        assert task_type.timeout_seconds > 0


def test_unknown_task_raises() -> None:
    assert "no.such.task" not in registry
    with pytest.raises(UnknownTask) as caught:
        registry.get("no.such.task")
    assert isinstance(caught.value, LookupError)
    assert "no.such.task" in str(caught.value)


@pytest.mark.parametrize("name", BUILT_IN)
def test_json_schema_is_a_dict(name: str) -> None:
    schema = registry.get(name).json_schema()
    assert isinstance(schema, dict)
    assert schema["type"] == "object"


def test_schemas_describe_the_fields() -> None:
    sleep = registry.get("demo.sleep").json_schema()
    assert sleep["required"] == ["seconds"]
    assert sleep["properties"]["seconds"]["minimum"] == 0
    assert sleep["properties"]["seconds"]["maximum"] == 3600
    fail = registry.get("demo.fail").json_schema()
    assert fail["required"] == ["failures"]
    assert fail["properties"]["retryable"]["default"] is True
    webhook = registry.get("webhook.deliver").json_schema()
    assert set(webhook["required"]) == {"url", "body"}
    assert "headers" in webhook["properties"]


def dump(name: str, payload: Any) -> Any:
    model = registry.get(name).validate(payload)
    assert isinstance(model, BaseModel)
    return model.model_dump(mode="json")


@pytest.mark.parametrize(
    "payload", [{}, {"a": 1}, {"nested": {"list": [1, "two", None]}, "flag": True}]
)
def test_echo_accepts_any_object(payload: dict[str, Any]) -> None:
    assert dump("demo.echo", payload) == payload


@pytest.mark.parametrize("payload", [[1, 2], "text", 5, None, True])
def test_echo_refuses_anything_but_an_object(payload: Any) -> None:
    with pytest.raises(ValidationError):
        registry.get("demo.echo").validate(payload)


@pytest.mark.parametrize("seconds", [0, 0.25, 1, 3600])
def test_sleep_accepts_seconds_in_range(seconds: float) -> None:
    assert dump("demo.sleep", {"seconds": seconds}) == {"seconds": seconds}


@pytest.mark.parametrize(
    "payload",
    [
        {"seconds": -0.001},
        {"seconds": 3600.5},
        {"seconds": "soon"},
        {},
        {"seconds": 1, "extra": True},
        [],
    ],
)
def test_sleep_refuses_bad_payloads(payload: Any) -> None:
    with pytest.raises(ValidationError):
        registry.get("demo.sleep").validate(payload)


def test_fail_payload() -> None:
    assert dump("demo.fail", {"failures": 2}) == {"failures": 2, "retryable": True}
    assert dump("demo.fail", {"failures": 0, "retryable": False}) == {
        "failures": 0,
        "retryable": False,
    }


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"retryable": True},
        {"failures": -1},
        {"failures": "many"},
        {"failures": 1, "retryable": "perhaps"},
        {"failures": 1, "other": 1},
    ],
)
def test_fail_refuses_bad_payloads(payload: Any) -> None:
    with pytest.raises(ValidationError):
        registry.get("demo.fail").validate(payload)


def test_webhook_payload() -> None:
    assert dump("webhook.deliver", {"url": "https://example.com/hook", "body": {"a": 1}}) == {
        "url": "https://example.com/hook",
        "body": {"a": 1},
        "headers": {},
    }
    with_headers = dump(
        "webhook.deliver",
        {"url": "http://127.0.0.1:9/x", "body": [1, 2], "headers": {"X-Token": "t"}},
    )
    assert with_headers["headers"] == {"X-Token": "t"}
    assert with_headers["body"] == [1, 2]
    # Any JSON value is a body, null included.
    assert dump("webhook.deliver", {"url": "https://e.com", "body": None})["body"] is None


@pytest.mark.parametrize(
    "payload",
    [
        {"body": {}},
        {"url": "https://example.com"},
        {"url": "not a url", "body": {}},
        {"url": "ftp://example.com/x", "body": {}},
        {"url": "https://example.com", "body": {}, "headers": {"X-N": 1}},
        {"url": "https://example.com", "body": {}, "headers": ["X-N"]},
        {"url": "https://example.com", "body": {}, "method": "PUT"},
    ],
)
def test_webhook_refuses_bad_payloads(payload: Any) -> None:
    with pytest.raises(ValidationError):
        registry.get("webhook.deliver").validate(payload)


def test_a_registry_refuses_duplicate_names() -> None:
    local = Registry()

    class Payload(BaseModel):
        x: int

    @local.task("t.one", Payload, max_attempts=7)
    def one(payload: Payload, ctx: Any) -> Any:
        """First line.

        More detail.
        """
        return payload.x

    task_type = local.get("t.one")
    assert (task_type.max_attempts, task_type.description) == (7, "First line.")
    assert task_type.handler is one
    with pytest.raises(ValueError, match="registered twice"):
        local.add(task_type)
    assert [t.name for t in local.all()] == ["t.one"]
    assert "t.one" not in registry
