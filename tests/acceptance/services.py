"""Stopping and starting the real brokers and database during acceptance tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kombu import Connection

from tests.support import require_port, wait_until


def _port_open(port: int) -> bool:
    try:
        require_port("service", "127.0.0.1", port)
    except RuntimeError:
        return False
    return True


def stop_redis() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True)
    wait_until(lambda: not _port_open(6379), timeout=20, what="Redis to stop")


def start_redis() -> None:
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ],
        check=True,
        capture_output=True,
    )
    wait_until(lambda: _port_open(6379), timeout=20, what="Redis to start")


def stop_rabbitmq() -> None:
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
    wait_until(lambda: not _port_open(5672), timeout=60, what="RabbitMQ to stop")


def start_rabbitmq() -> None:
    subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    wait_until(lambda: _port_open(5672), timeout=60, what="RabbitMQ to start")


def stop_broker(url: str) -> None:
    (stop_redis if url.startswith("redis") else stop_rabbitmq)()


def start_broker(url: str) -> None:
    (start_redis if url.startswith("redis") else start_rabbitmq)()


def restart_postgres() -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    wait_until(lambda: _port_open(5432), timeout=60, what="PostgreSQL to restart")


def reset_rabbitmq_queues(url: str) -> None:
    """Delete Conveyor's queues so each test declares them afresh."""
    with Connection(url) as connection:
        channel = connection.default_channel
        for name in ("high", "default", "low", "conveyor.dead-letters"):
            channel.queue_delete(name)
