"""The benchmarks' broker, Redis or RabbitMQ: counting the messages a queue holds, emptying it.

On Redis a benchmark owns a database number and empties it with FLUSHDB (messages, unacked
messages, bindings and the bare side's counters). On RabbitMQ it purges the queues it
knows by name (Conveyor's pools and dead letters, bare Celery's `celery` queue) on the
given virtual host; a queue nobody declared yet holds nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from urllib.parse import urlsplit

import redis
from kombu.connection import Connection

from conveyor.config import POOLS
from conveyor.config.celery_config import DEAD_LETTER_QUEUE, is_amqp

BARE_QUEUE = "celery"  # bare Celery's default queue
KNOWN_QUEUES = (*POOLS, DEAD_LETTER_QUEUE, BARE_QUEUE)
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


class BenchBroker:
    """One broker URL: queue depths and emptying, the same calls for Redis and RabbitMQ."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_amqp = is_amqp(url)
        self._redis = (
            None
            if self.is_amqp
            else redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        )

    @property
    def redis(self) -> redis.Redis:
        """The Redis client of a Redis broker."""
        if self._redis is None:
            raise TypeError(f"{self.url} is not a Redis broker")
        return self._redis

    @property
    def kind(self) -> str:
        """`amqp` or `redis`."""
        return "amqp" if self.is_amqp else "redis"

    def depth(self, queues: str | Iterable[str]) -> int:
        """Ready (undelivered) messages in the named queue or queues, summed."""
        names = [queues] if isinstance(queues, str) else list(queues)
        if self._redis is not None:
            return sum(int(self._redis.llen(name)) for name in names)
        total = 0
        with Connection(self.url, connect_timeout=5) as connection:  # type: ignore[no-untyped-call]
            for name in names:
                channel = connection.channel()
                try:
                    _, count, _ = channel.queue_declare(queue=name, passive=True)
                    total += int(count)
                except connection.channel_errors:
                    pass  # not declared yet: RabbitMQ closed that channel
                finally:
                    channel.close()
        return total

    def empty(self) -> None:
        """Remove every message the benchmarks may have left on this broker."""
        if self._redis is not None:
            self._redis.flushdb()
            return
        with Connection(self.url, connect_timeout=5) as connection:  # type: ignore[no-untyped-call]
            for name in KNOWN_QUEUES:
                channel = connection.channel()
                try:
                    channel.queue_purge(name)
                except connection.channel_errors:
                    pass
                finally:
                    channel.close()

    def close(self) -> None:
        """Close the Redis client."""
        if self._redis is not None:
            self._redis.close()


def check_bench_broker(parser: argparse.ArgumentParser, url: str, *, amqp: bool) -> None:
    """Exit with a usage error unless `url` is one a benchmark may empty."""
    if amqp and is_amqp(url):
        return
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss") and parts.path.strip("/") not in ("", "0"):
        return
    parser.error(
        "--broker must be a redis:// URL naming a database other than 0 (it is flushed)"
        + (" or an amqp:// URL (its queues are purged)" if amqp else "")
    )
