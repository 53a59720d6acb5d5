"""Console sessions, tokens, forms and redirects, without I/O."""

from __future__ import annotations

import uuid

import pytest

from conveyor.api.console.actions import safe_next
from conveyor.api.console.sessions import FormError, Signer, parse_form, tokens_match

SECRET = "s" * 64


def test_a_session_reads_back_until_it_expires() -> None:
    signer = Signer(SECRET, session_seconds=60)
    key_id = uuid.uuid4()
    cookie, session = signer.issue(key_id, now=1000.0)
    read = signer.read(cookie, now=1059.0)
    assert read == session and read.key_id == key_id
    assert signer.read(cookie, now=1061.0) is None


def test_a_cookie_altered_or_signed_with_another_secret_is_refused() -> None:
    signer = Signer(SECRET, session_seconds=60)
    cookie, _ = signer.issue(uuid.uuid4(), now=1000.0)
    body, mac = cookie.split(".")
    assert signer.read(body + "." + mac[::-1], now=1001.0) is None
    other_body, _ = Signer(SECRET, 60).issue(uuid.uuid4(), now=1000.0)[0].split(".")
    assert signer.read(other_body + "." + mac, now=1001.0) is None
    assert Signer("t" * 64, 60).read(cookie, now=1001.0) is None
    for junk in ("", "no-dot", "a.b.c", None):
        assert signer.read(junk, now=1001.0) is None


def test_csrf_tokens_belong_to_their_session() -> None:
    signer = Signer(SECRET, session_seconds=60)
    _, first = signer.issue(uuid.uuid4())
    _, second = signer.issue(first.key_id)
    assert signer.csrf_token(first) != signer.csrf_token(second)
    assert tokens_match(signer.csrf_token(first), signer.csrf_token(first))
    assert not tokens_match(signer.csrf_token(first), signer.csrf_token(second))
    assert not tokens_match(signer.csrf_token(first), None)


def test_the_login_form_token_is_tied_to_its_cookie_and_expires() -> None:
    signer = Signer(SECRET, session_seconds=60)
    cookie, token = signer.login_cookie(now=1000.0)
    nonce = signer.login_nonce(cookie, now=1001.0)
    assert nonce is not None and tokens_match(signer.login_token(nonce), token)
    assert signer.login_nonce(cookie, now=1000.0 + 3601) is None
    assert signer.login_nonce(cookie.replace(".", "x.", 1), now=1001.0) is None


def test_forms_are_parsed_and_junk_refused() -> None:
    assert parse_form(b"csrf_token=a%2Bb&key=cvk_1&empty=") == {
        "csrf_token": "a+b",
        "key": "cvk_1",
        "empty": "",
    }
    assert parse_form(b"") == {}
    with pytest.raises(FormError):
        parse_form(b"\xff\xfe")
    with pytest.raises(FormError):
        parse_form(b"x=" + b"a" * 70_000)


def test_after_sign_in_only_console_paths_are_followed() -> None:
    assert safe_next("/ui/jobs?state=dead") == "/ui/jobs?state=dead"
    for elsewhere in (None, "", "https://evil.example/", "//evil.example/ui", "/v1/jobs", "/ui\\x"):
        assert safe_next(elsewhere) == "/ui/"
