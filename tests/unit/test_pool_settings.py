"""Per-pool worker settings: prefetch, autoscaling and run-time caps, and the worker's options."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery.concurrency.prefork import TaskPool

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


def _worker(
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    queues: list[str],
    concurrency: int | None = None,
) -> tuple[dict[str, Any], Any]:
    """The options `conveyor worker` built its Celery worker with, and its run task."""
    captured: list[dict[str, Any]] = []

    class Worker:
        exitcode = 0

        def __init__(self, **options: Any) -> None:
            captured.append(options)

        def start(self) -> None:
            pass

    run_task = SimpleNamespace(Request="celery.worker.request:Request")
    celery = SimpleNamespace(tasks={RUN_TASK: run_task}, Worker=Worker)
    monkeypatch.setattr(
        services, "build_platform", lambda _settings: SimpleNamespace(celery=celery)
    )
    # No metrics port: unit tests open no sockets.
    services.worker(settings.model_copy(update={"metrics_port": 0}), queues, concurrency)
    return captured[0], run_task


def test_worker_uses_the_pool_prefetch_and_a_fixed_pool_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(broker_url=REDIS)
    options, run_task = _worker(monkeypatch, settings, ["high"])
    assert options["queues"] == ["high"]
    assert (options["concurrency"], options["prefetch_multiplier"]) == (2, 1)
    assert options["pool_cls"] is TaskPool
    assert options["hostname"].startswith(f"high-{os.getpid()}@")
    assert "%" not in options["hostname"]
    assert options["loglevel"] == logging.INFO
    assert options["without_mingle"] and options["without_gossip"]
    assert "autoscale" not in options and "time_limit" not in options
    assert run_task.Request == "celery.worker.request:Request"
    options, _ = _worker(monkeypatch, settings, ["default"], concurrency=5)
    assert (options["concurrency"], options["prefetch_multiplier"]) == (5, 4)


def test_worker_autoscales_and_caps_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        broker_url=REDIS,
        low_concurrency=8,
        low_autoscale_min=2,
        low_time_limit_seconds=60,
    )
    options, run_task = _worker(monkeypatch, settings, ["low"])
    # Celery's order: the most processes, then the fewest.
    assert options["autoscale"] == (8, 2)
    assert (options["soft_time_limit"], options["time_limit"]) == (60.0, 70.0)
    assert issubclass(run_task.Request, timecap.Request)
    # An explicit --concurrency below the minimum lowers the minimum with it.
    options, _ = _worker(monkeypatch, settings, ["low"], concurrency=1)
    assert options["autoscale"] == (1, 1)


def test_a_worker_that_celery_stops_with_an_error_exits_with_its_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Failing:
        exitcode = 1

        def __init__(self, **options: Any) -> None:
            pass

        def start(self) -> None:
            pass

    celery = SimpleNamespace(tasks={}, Worker=Failing)
    monkeypatch.setattr(
        services, "build_platform", lambda _settings: SimpleNamespace(celery=celery)
    )
    settings = Settings(broker_url=REDIS, metrics_port=0)
    with pytest.raises(SystemExit) as stopped:
        services.worker(settings, ["default"], None)
    assert stopped.value.code == 1


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
