"""The Celery configuration: JSON only, one queue per pool, no lost or doubled runs."""

from __future__ import annotations

import os
from typing import Any

import pytest
from kombu.entity import Queue

from conveyor.config.celery_config import (
    BROKER_CALL_TIMEOUT_SECONDS,
    bounded_transport_options,
    celery_config,
)
from conveyor.config.settings import Settings

REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
ALL_BROKERS = [REDIS, "rediss://h:6380/0", AMQP, "amqps://h//", "memory://"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CONVEYOR_"):
            monkeypatch.delenv(name)


def config_for(broker_url: str, **values: Any) -> dict[str, Any]:
    settings = Settings(_env_file=None, broker_url=broker_url, **values)  # type: ignore[call-arg]
    return celery_config(settings)


@pytest.mark.parametrize("broker", ALL_BROKERS)
def test_json_only(broker: str) -> None:
    config = config_for(broker)
    assert config["accept_content"] == ["json"]
    assert config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == "json"
    assert config["result_serializer"] == "json"
    assert config["broker_url"] == broker


@pytest.mark.parametrize("broker", ALL_BROKERS)
def test_one_queue_per_pool(broker: str) -> None:
    config = config_for(broker)
    queues: list[Queue] = config["task_queues"]
    assert [q.name for q in queues] == ["high", "default", "low"]
    for queue in queues:
        assert queue.routing_key == queue.name
        assert queue.exchange.name == "conveyor"
        assert queue.exchange.type == "direct"
    assert config["task_default_queue"] == "default"
    assert config["task_default_exchange"] == "conveyor"
    assert config["task_default_routing_key"] == "default"
    assert config["task_create_missing_queues"] is False


@pytest.mark.parametrize("broker", ALL_BROKERS)
def test_delivery_safety(broker: str) -> None:
    config = config_for(broker)
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_cancel_long_running_tasks_on_connection_loss"] is True
    assert config["task_ignore_result"] is True
    assert config["enable_utc"] is True


@pytest.mark.parametrize("broker", [AMQP, "amqps://h//"])
def test_amqp_confirms_publishes(broker: str) -> None:
    options = config_for(broker)["broker_transport_options"]
    assert options["confirm_publish"] is True
    assert "visibility_timeout" not in options


@pytest.mark.parametrize("broker", [REDIS, "rediss://h:6380/0"])
def test_redis_sets_a_visibility_timeout(broker: str) -> None:
    options = config_for(broker)["broker_transport_options"]
    assert "confirm_publish" not in options
    timeout = options["visibility_timeout"]
    assert isinstance(timeout, int)
    assert timeout > 0
    # It follows the setting.
    longer = config_for(broker, redis_visibility_timeout=timeout + 100)
    assert longer["broker_transport_options"]["visibility_timeout"] == timeout + 100


def test_memory_broker_has_neither_redis_nor_amqp_options() -> None:
    options = config_for("memory://")["broker_transport_options"]
    assert "confirm_publish" not in options
    assert "visibility_timeout" not in options


@pytest.mark.parametrize("broker", ALL_BROKERS)
def test_consumers_keep_blocking_reads(broker: str) -> None:
    # The workers' connections take the shared options: no socket timeout there, since a
    # slow reply would count as a lost connection and cancel running jobs.
    options = config_for(broker)["broker_transport_options"]
    for key in ("socket_timeout", "socket_connect_timeout", "read_timeout", "write_timeout"):
        assert key not in options


@pytest.mark.parametrize("broker", [REDIS, "rediss://h:6380/0"])
def test_redis_publishing_connections_time_out(broker: str) -> None:
    options = bounded_transport_options(broker)
    assert options == {
        "socket_timeout": BROKER_CALL_TIMEOUT_SECONDS,
        "socket_connect_timeout": BROKER_CALL_TIMEOUT_SECONDS,
    }
    assert 0 < BROKER_CALL_TIMEOUT_SECONDS <= 1.0
    assert bounded_transport_options(broker, 0.5)["socket_timeout"] == 0.5


@pytest.mark.parametrize("broker", [AMQP, "amqps://h//"])
def test_amqp_publishing_connections_time_out(broker: str) -> None:
    options = bounded_transport_options(broker)
    assert options == {
        "read_timeout": BROKER_CALL_TIMEOUT_SECONDS,
        "write_timeout": BROKER_CALL_TIMEOUT_SECONDS,
    }
    # Laid over the shared options, confirms stay on.
    merged = {**config_for(broker)["broker_transport_options"], **options}
    assert merged["confirm_publish"] is True


def test_memory_broker_needs_no_timeouts() -> None:
    assert bounded_transport_options("memory://") == {}


def test_prefetch_follows_the_settings() -> None:
    assert config_for(REDIS, prefetch_multiplier=1)["worker_prefetch_multiplier"] == 1
    assert config_for(REDIS, prefetch_multiplier=9)["worker_prefetch_multiplier"] == 9


def test_a_celery_app_takes_the_config() -> None:
    from celery import Celery

    app = Celery("conveyor-test", set_as_current=False)
    app.conf.update(config_for(AMQP))
    assert list(app.conf.accept_content) == ["json"]
    assert app.conf.task_acks_late is True
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    assert {q.name for q in app.conf.task_queues} == {"high", "default", "low"}
