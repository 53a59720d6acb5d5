"""The bare-Celery side of `bench.throughput`: a no-op task on Conveyor's own Celery settings.

The app takes its whole configuration from `conveyor.config.celery_config`, so JSON-only
serialization, the `default` queue on the `conveyor` direct exchange, acks_late,
reject-on-worker-lost, ignored results, the prefetch multiplier and the Redis visibility
timeout are exactly the ones a Conveyor worker runs with. What it lacks is everything
Conveyor adds per job: the database claim, the payload validation, the outcome transaction.

Each run of the task counts itself in Redis with one round trip (a Lua script): a counter,
and the earliest and latest completion times, which the benchmark reads to time the drain.

A worker process is started as `python -m celery -A bench.bare_app worker ...` with
BENCH_BROKER_URL and BENCH_PREFETCH in its environment.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
from celery import Celery

from conveyor.config import Settings, celery_config

NOOP_TASK = "bench.noop"
DONE_KEY = "bench:bare:done"
FIRST_KEY = "bench:bare:first"
LAST_KEY = "bench:bare:last"
DEFAULT_BROKER = "redis://127.0.0.1:6379/9"

# INCR the counter and keep the min/max completion time, atomically and in one round trip.
_RECORD = """
redis.call('INCR', KEYS[1])
local now = tonumber(ARGV[1])
local first = redis.call('GET', KEYS[2])
if (not first) or now < tonumber(first) then redis.call('SET', KEYS[2], ARGV[1]) end
local last = redis.call('GET', KEYS[3])
if (not last) or now > tonumber(last) then redis.call('SET', KEYS[3], ARGV[1]) end
return 1
"""


def make_app(broker_url: str, prefetch_multiplier: int) -> Celery:
    """A Celery app with Conveyor's configuration and one no-op task."""
    app = Celery("bare", set_as_current=False)
    settings = Settings(broker_url=broker_url, prefetch_multiplier=prefetch_multiplier)
    app.conf.update(celery_config(settings))
    recorder = _Recorder(broker_url)

    @app.task(name=NOOP_TASK, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def noop(job_id: str) -> None:
        recorder.record(time.time())

    return app


class _Recorder:
    """A Redis client per process (pool children must not share their parent's sockets)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._pid = -1
        self._script: Any = None
        self._lock = threading.Lock()

    def record(self, now: float) -> None:
        with self._lock:
            if self._script is None or self._pid != os.getpid():
                client = redis.Redis.from_url(self._url, socket_timeout=10)
                self._script = client.register_script(_RECORD)
                self._pid = os.getpid()
            script = self._script
        script(keys=[DONE_KEY, FIRST_KEY, LAST_KEY], args=[repr(now)])


app = make_app(
    os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER),
    int(os.environ.get("BENCH_PREFETCH", "4")),
)
