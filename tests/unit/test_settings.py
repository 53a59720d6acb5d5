"""Settings: the defaults of the contract and one-line errors naming the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from conveyor.config.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CONVEYOR_* variable from outside, and an empty cwd so no .env is read."""
    for name in list(os.environ):
        if name.upper().startswith("CONVEYOR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_the_contract() -> None:
    settings = load_settings()
    assert settings.database_url == "sqlite:///./var/conveyor.db"
    assert settings.is_sqlite
    assert settings.api_host == "127.0.0.1"
    assert settings.api_port == 8000
    assert settings.flower_port == 5555
    assert settings.flower_user is None
    assert settings.flower_password is None
    assert settings.broker_url == "memory://"
    assert settings.embedded


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.api_port = 9000  # type: ignore[misc]


def test_variables_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_API_PORT", "9001")
    monkeypatch.setenv("CONVEYOR_API_HOST", "0.0.0.0")
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("CONVEYOR_FLOWER_USER", "ops")
    monkeypatch.setenv("CONVEYOR_FLOWER_PASSWORD", "s3cret")
    settings = load_settings()
    assert (settings.api_host, settings.api_port) == ("0.0.0.0", 9001)
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert not settings.embedded
    assert (settings.flower_user, settings.flower_password) == ("ops", "s3cret")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/conveyor", "postgresql+psycopg://u:p@db:5432/conveyor"),
        ("postgresql://localhost/x", "postgresql+psycopg://localhost/x"),
        ("postgresql+psycopg://localhost/x", "postgresql+psycopg://localhost/x"),
        ("sqlite:////tmp/jobs.db", "sqlite:////tmp/jobs.db"),
    ],
)
def test_database_url_gets_the_psycopg_driver(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", given)
    settings = load_settings()
    assert settings.database_url == expected
    assert settings.is_sqlite is expected.startswith("sqlite")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONVEYOR_API_PORT", "abc"),
        ("CONVEYOR_API_PORT", "0"),
        ("CONVEYOR_API_PORT", "70000"),
        ("CONVEYOR_FLOWER_PORT", "-1"),
        ("CONVEYOR_BROKER_URL", "ftp://x"),
        ("CONVEYOR_DATABASE_URL", "mysql://localhost/x"),
        ("CONVEYOR_LOG_LEVEL", "LOUD"),
        ("CONVEYOR_LEASE_SECONDS", "0"),
        ("CONVEYOR_DEFAULT_MAX_ATTEMPTS", "0"),
        ("CONVEYOR_WORKER_POOL_CLASS", "gevent"),
    ],
)
def test_invalid_value_raises_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert variable in message
    assert "\n" not in message
    assert message.strip() == message and message
    # The cause is not chained in: the one line is the whole story.
    assert caught.value.__cause__ is None


def test_broker_message_says_what_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "ftp://x")
    with pytest.raises(SettingsError, match=r"CONVEYOR_BROKER_URL.*redis://"):
        load_settings()


def test_accepted_broker_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("redis://h:1/0", "rediss://h:1/0", "amqp://g:g@h//", "amqps://h//", "memory://"):
        monkeypatch.setenv("CONVEYOR_BROKER_URL", url)
        assert load_settings().broker_url == url


def test_pool_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_HIGH_CONCURRENCY", "8")
    settings = load_settings()
    assert settings.pool_concurrency("high") == 8
    assert settings.pool_concurrency("default") == settings.default_concurrency
    assert settings.pool_concurrency("low") == settings.low_concurrency


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, api_port=0)  # type: ignore[call-arg]
