"""kombu's Redis transport, keeping one redis-py client per channel for its commands.

kombu makes a new redis-py client for every publish batch and every acknowledgement,
and a client's construction (its table of some 170 response callbacks) costs more than
the command it sends. A redis-py client is safe to share between threads and holds no
connection of its own (they come from the channel's pool), so each channel makes one,
on first use, and keeps it. Consuming (BRPOP) and fan-out keep kombu's own clients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

# For Celery's `broker_transport` setting.
TRANSPORT = "conveyor.worker.redis_transport:Transport"


class Channel(kombu_redis.Channel):
    """A Redis channel whose synchronous commands share one client."""

    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """The given client, else the channel's own (made on first use)."""
        if client:
            yield client
            return
        if self._shared_client is None:
            self._shared_client = self._create_client()
        yield self._shared_client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel
