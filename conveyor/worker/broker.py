"""Short calls to the broker that give up in time: connections for publishing, queue depths."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.connection import Connection

from conveyor.config import POOLS
from conveyor.config.celery_config import BROKER_CALL_TIMEOUT_SECONDS, bounded_transport_options


def bounded_connection(
    app: Celery, timeout: float = BROKER_CALL_TIMEOUT_SECONDS, **transport_options: Any
) -> Connection:
    """A connection whose connect and every read and write give up after `timeout` seconds.

    `transport_options` go on top of the app's and the bounded ones.
    """
    url = app.conf.broker_write_url or app.conf.broker_url or ""
    connection: Connection = app.connection_for_write(
        # Also the total kombu spends reconnecting before a call: it retries until then.
        connect_timeout=timeout,
        transport_options={**bounded_transport_options(url, timeout), **transport_options},
    )
    return connection


def queue_depths(app: Celery) -> dict[str, int]:
    """Ready (undelivered) messages per pool queue; raises when the broker does not answer."""
    depths: dict[str, int] = {}
    with bounded_connection(app) as connection:
        channel = connection.default_channel
        for name in POOLS:
            try:
                _, count, _ = channel.queue_declare(queue=name, passive=True)
            except connection.channel_errors:
                # A queue nobody declared yet holds nothing. RabbitMQ closes the channel
                # that asked; a broker that does not answer raises a connection error.
                count = 0
                channel = connection.channel()
            depths[name] = int(count)
    return depths
