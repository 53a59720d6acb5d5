"""Reading the broker: how many messages wait in each pool's queue."""

from __future__ import annotations

from celery import Celery

from conveyor.config import POOLS


def queue_depths(app: Celery) -> dict[str, int]:
    """Ready (undelivered) messages per pool queue, on Redis, RabbitMQ or in memory."""
    depths: dict[str, int] = {}
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in POOLS:
            try:
                _, count, _ = channel.queue_declare(queue=name, passive=True)
            except Exception:
                # A queue nobody declared yet holds nothing.
                connection.close()
                connection.ensure_connection(max_retries=1)
                channel = connection.default_channel
                count = 0
            depths[name] = int(count)
    return depths
