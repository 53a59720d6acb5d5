"""The bare-Celery side of `bench.priority`: every task in ONE queue, no priorities.

The app takes its configuration from `conveyor.config.celery_config` (JSON only, acks_late,
reject-on-worker-lost, ignored results, the Redis visibility timeout), like
`bench.bare_app`, and sends every task to the one queue `default`. Two tasks:

- `bench.prio.low(seconds)`: the backlog; sleeps `seconds` (like `demo.sleep`; 0 does
  nothing, like `demo.echo`) and counts itself in Redis.
- `bench.prio.high(sent_at)`: first thing, appends `time.time() - sent_at` (its queue
  wait, in seconds) to a Redis list the benchmark reads.

A worker process is started as `python -m celery -A bench.priority_bare worker ...` with
BENCH_BROKER_URL and BENCH_PREFETCH in its environment.
"""

from __future__ import annotations

import os
import threading
import time

import redis
from celery import Celery

from conveyor.config import Settings, celery_config

QUEUE = "default"
LOW_TASK = "bench.prio.low"
HIGH_TASK = "bench.prio.high"
WAITS_KEY = "bench:prio:waits"
LOW_DONE_KEY = "bench:prio:low-done"
DEFAULT_BROKER = "redis://127.0.0.1:6379/11"


class _Client:
    """A Redis client per process (pool children must not share their parent's sockets)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._pid = -1
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def get(self) -> redis.Redis:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = redis.Redis.from_url(self._url, socket_timeout=10)
                self._pid = os.getpid()
            return self._client


def make_app(broker_url: str, prefetch_multiplier: int) -> Celery:
    """A Celery app with Conveyor's configuration, one queue and the two tasks."""
    app = Celery("bare-priority", set_as_current=False)
    settings = Settings(broker_url=broker_url, prefetch_multiplier=prefetch_multiplier)
    app.conf.update(celery_config(settings))
    client = _Client(broker_url)

    @app.task(name=LOW_TASK, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def low(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)
        client.get().incr(LOW_DONE_KEY)

    @app.task(name=HIGH_TASK, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def high(sent_at: float) -> None:
        waited = time.time() - sent_at
        client.get().rpush(WAITS_KEY, repr(waited))

    return app


app = make_app(
    os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER),
    int(os.environ.get("BENCH_PREFETCH", "1")),
)
