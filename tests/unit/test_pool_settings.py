"""Per-pool worker settings: prefetch, autoscaling and run-time caps, and the worker's argv."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conveyor.cli import services
from conveyor.config import RUN_TASK
from conveyor.config.settings import Settings, SettingsError, load_settings
from conveyor.worker import timecap

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CONVEYOR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_prefetch_defaults_per_pool() -> None:
    settings = load_settings()
    assert [settings.pool_prefetch(p) for p in ("high", "default", "low")] == [1, 4, 1]
    assert settings.pool_autoscale_min("high") is None
    assert settings.pool_time_limit("low") is None


def test_global_prefetch_still_applies_unless_a_pool_sets_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVEYOR_PREFETCH_MULTIPLIER", "7")
    monkeypatch.setenv("CONVEYOR_HIGH_PREFETCH", "2")
    settings = load_settings()
    assert [settings.pool_prefetch(p) for p in ("high", "default", "low")] == [2, 7, 7]


def test_autoscale_min_above_concurrency_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVEYOR_LOW_CONCURRENCY", "2")
    monkeypatch.setenv("CONVEYOR_LOW_AUTOSCALE_MIN", "3")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("invalid setting CONVEYOR_LOW_AUTOSCALE_MIN:")
    assert "CONVEYOR_LOW_CONCURRENCY" in message
    assert "\n" not in message


def test_autoscale_needs_prefork(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_WORKER_POOL_CLASS", "threads")
    monkeypatch.setenv("CONVEYOR_HIGH_AUTOSCALE_MIN", "1")
    with pytest.raises(SettingsError, match=r"CONVEYOR_HIGH_AUTOSCALE_MIN.*prefork"):
        load_settings()


def _worker_argv(
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    queues: list[str],
    concurrency: int | None = None,
) -> tuple[list[str], Any]:
    captured: list[list[str]] = []
    run_task = SimpleNamespace(Request="celery.worker.request:Request")
    celery = SimpleNamespace(tasks={RUN_TASK: run_task}, worker_main=captured.append)
    monkeypatch.setattr(
        services, "build_platform", lambda _settings: SimpleNamespace(celery=celery)
    )
    # No metrics port: unit tests open no sockets.
    services.worker(settings.model_copy(update={"metrics_port": 0}), queues, concurrency)
    return captured[0], run_task


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def test_worker_uses_the_pool_prefetch_and_a_fixed_pool_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(broker_url=REDIS)
    argv, run_task = _worker_argv(monkeypatch, settings, ["high"])
    assert _flag(argv, "--concurrency") == "2"
    assert _flag(argv, "--prefetch-multiplier") == "1"
    assert _flag(argv, "--autoscale") is None
    assert _flag(argv, "--time-limit") is None
    assert run_task.Request == "celery.worker.request:Request"
    argv, _ = _worker_argv(monkeypatch, settings, ["default"], concurrency=5)
    assert (_flag(argv, "--concurrency"), _flag(argv, "--prefetch-multiplier")) == ("5", "4")


def test_worker_autoscales_and_caps_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        broker_url=REDIS,
        low_concurrency=8,
        low_autoscale_min=2,
        low_time_limit_seconds=60,
    )
    argv, run_task = _worker_argv(monkeypatch, settings, ["low"])
    assert _flag(argv, "--autoscale") == "8,2"
    assert _flag(argv, "--soft-time-limit") == "60.0"
    assert _flag(argv, "--time-limit") == "70.0"
    assert issubclass(run_task.Request, timecap.Request)
    # An explicit --concurrency below the minimum lowers the minimum with it.
    argv, _ = _worker_argv(monkeypatch, settings, ["low"], concurrency=1)
    assert _flag(argv, "--autoscale") == "1,1"


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (None, (70.0, 60.0)),
        ((None, None), (70.0, 60.0)),
        ([310.0, 300.0], (70.0, 60.0)),
        ([15.0, 5.0], (15.0, 5.0)),
        ([None, 30.0], (70.0, 30.0)),
    ],
)
def test_capped_limits(limits: Any, expected: tuple[float, float]) -> None:
    assert timecap.capped_limits(limits, 60.0) == expected
