"""The walk that finds what the job store cannot keep as sent, and where it is wired in."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from conveyor.api.schemas import BatchIn, JobIn
from conveyor.tasks import registry
from conveyor.tasks.json_values import (
    ERROR_TYPE,
    INT_TOO_LONG,
    KEY_NOT_TEXT,
    MAX_DEPTH,
    NOT_FINITE,
    TOO_DEEP,
    Unstorable,
    find_unstorable,
    require_storable,
)
from conveyor.tasks.submission import build_new_job

NUL_TEXT = "text may not contain the NUL character (\\u0000)"
NUL_KEY = "object keys may not contain the NUL character (\\u0000)"
SURROGATE_TEXT = "text may not contain a lone surrogate such as \\ud800, which has no UTF-8 form"
SURROGATE_KEY = (
    "object keys may not contain a lone surrogate such as \\ud800, which has no UTF-8 form"
)


def paths(value: Any) -> list[tuple[str | int, ...]]:
    return [where.path for where in find_unstorable(value)]


def nested(depth: int) -> Any:
    """`depth` arrays, one inside the other."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -0.0,
        1.5e308,
        5e-324,
        12345678901234567890123,
        -(2**200),
        "",
        "plain",
        "é 😀 \uffff \t\n\x01",
        [],
        {},
        {"a": [1, 2.5, {"b": None, "c": [True, "x"]}], "ключ": {"😀": 12345678901234567890123}},
    ],
)
def test_storable_values_have_nothing_to_report(value: Any) -> None:
    assert find_unstorable(value) == []


@pytest.mark.parametrize("literal", ["1e999999", "-1e999999", "NaN", "Infinity", "-Infinity"])
def test_numbers_python_json_reads_as_not_finite_are_found(literal: str) -> None:
    parsed = json.loads(f'{{"payload": {{"x": {literal}}}}}')
    assert find_unstorable(parsed) == [Unstorable(("payload", "x"), NOT_FINITE)]


def test_nul_and_lone_surrogates_are_found_in_text_and_in_keys() -> None:
    parsed = json.loads(
        '{"a": "x\\u0000y", "b\\u0000": 1, "c": "\\ud800", "\\udc00": 2, "ok": "\\ud83d\\ude00"}'
    )
    assert find_unstorable(parsed) == [
        Unstorable(("a",), NUL_TEXT),
        Unstorable(("b\x00",), NUL_KEY),
        Unstorable(("c",), SURROGATE_TEXT),
        Unstorable(("\udc00",), SURROGATE_KEY),
    ]


def test_a_value_that_is_not_a_container_is_checked_itself() -> None:
    assert find_unstorable(float("nan")) == [Unstorable((), NOT_FINITE)]
    assert find_unstorable("\x00") == [Unstorable((), NUL_TEXT)]
    assert find_unstorable(("ok", float("inf"))) == [Unstorable((1,), NOT_FINITE)]


def test_paths_run_through_arrays_and_objects_in_document_order() -> None:
    parsed = json.loads(
        '{"jobs": [{"payload": {"x": 1}},'
        ' {"payload": {"x": NaN, "list": [0, "\\u0000", [Infinity]]}}],'
        ' "tags": ["ok", "\\udfff"]}'
    )
    assert paths(parsed) == [
        ("jobs", 1, "payload", "x"),
        ("jobs", 1, "payload", "list", 1),
        ("jobs", 1, "payload", "list", 2, 0),
        ("tags", 1),
    ]


def test_a_bad_key_is_reported_where_it_stands_and_its_value_is_not_walked() -> None:
    value = {"a": float("nan"), "b\x00": [float("inf")], "c": float("-inf")}
    assert paths(value) == [("a",), ("b\x00",), ("c",)]


def test_nesting_up_to_the_limit_is_kept_and_one_level_more_is_refused() -> None:
    assert find_unstorable(nested(MAX_DEPTH)) == []
    assert find_unstorable(nested(MAX_DEPTH + 1)) == [Unstorable((0,) * MAX_DEPTH, TOO_DEEP)]


def test_nesting_far_past_the_recursion_limit_is_walked_without_recursion() -> None:
    deep = nested(sys.getrecursionlimit() * 5)
    assert [where.reason for where in find_unstorable(deep)] == [TOO_DEEP]


def test_integers_too_long_to_write_as_text_are_found() -> None:
    digits = sys.get_int_max_str_digits()
    if digits == 0:
        pytest.skip("this interpreter converts integers of any length")
    assert find_unstorable({"n": 10 ** (digits - 1)}) == []
    assert find_unstorable({"n": 10**digits}) == [Unstorable(("n",), INT_TOO_LONG)]


def test_keys_that_are_not_text_are_found() -> None:
    assert find_unstorable({1: "a", None: "b"}) == [
        Unstorable(("1",), KEY_NOT_TEXT),
        Unstorable(("None",), KEY_NOT_TEXT),
    ]


def test_objects_of_other_types_are_left_to_the_model() -> None:
    assert find_unstorable({"at": dt.datetime.now(dt.UTC), "raw": b"\x00", "set": {1.0}}) == []


def test_at_most_limit_places_are_reported() -> None:
    assert len(find_unstorable([float("nan")] * 500)) == 100
    assert len(find_unstorable([float("nan")] * 5, limit=2)) == 2


def test_require_storable_raises_one_pydantic_error_per_place() -> None:
    with pytest.raises(ValidationError) as raised:
        require_storable({"x": float("inf"), "\ud800": 1}, "Payload")
    assert [(e["type"], e["loc"], e["msg"]) for e in raised.value.errors()] == [
        (ERROR_TYPE, ("x",), NOT_FINITE),
        # The key as an escape: pydantic would show a lone surrogate as U+FFFD.
        (ERROR_TYPE, ("\\ud800",), SURROGATE_KEY),
    ]


def test_require_storable_accepts_what_can_be_stored() -> None:
    require_storable({"n": 12345678901234567890123, "s": "😀"}, "Payload")


def test_a_job_body_names_the_field() -> None:
    body = json.loads('{"task": "demo.echo", "payload": {"x": 1e999999}, "tags": ["a\\u0000"]}')
    with pytest.raises(ValidationError) as raised:
        JobIn.model_validate(body)
    assert [(e["type"], e["loc"]) for e in raised.value.errors()] == [
        (ERROR_TYPE, ("payload", "x")),
        (ERROR_TYPE, ("tags", 0)),
    ]


def test_a_batch_names_the_job_and_the_field() -> None:
    body = json.loads(
        '{"jobs": [{"task": "demo.echo", "payload": {"x": 1}},'
        ' {"task": "demo.echo", "payload": {"x": -Infinity}}]}'
    )
    with pytest.raises(ValidationError) as raised:
        BatchIn.model_validate(body)
    assert [e["loc"] for e in raised.value.errors()] == [("jobs", 1, "payload", "x")]


@pytest.mark.parametrize(
    ("task", "payload", "loc"),
    [
        ("demo.echo", '{"x": 1e999999}', ("x",)),
        ("demo.echo", '{"x": ["\\ud800"]}', ("x", 0)),
        ("demo.sleep", '{"seconds": NaN}', ("seconds",)),
        (
            "webhook.deliver",
            '{"url": "http://example.com/", "body": {}, "headers": {"h": "a\\u0000"}}',
            ("headers", "h"),
        ),
    ],
)
def test_every_submission_refuses_a_payload_the_store_cannot_keep(
    task: str, payload: str, loc: tuple[str | int, ...]
) -> None:
    """The CLI, enqueue() and beat build their jobs here, not through the API's models."""
    with pytest.raises(ValidationError) as raised:
        build_new_job(registry, tenant="acme", task=task, payload=json.loads(payload))
    assert [(e["type"], e["loc"]) for e in raised.value.errors()] == [(ERROR_TYPE, loc)]


def test_a_submission_keeps_large_integers_exactly() -> None:
    payload = {"n": 12345678901234567890123, "m": [-(2**100)]}
    new = build_new_job(registry, tenant="acme", task="demo.echo", payload=payload)
    assert new.payload == payload
    assert type(new.payload["n"]) is int
