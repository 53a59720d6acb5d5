"""The bare-Celery side of `bench.throughput` and `bench.table`: no-op tasks, nothing else.

Two configurations (BENCH_BARE_CONFIG):

- `conveyor` (the default): the whole configuration comes from
  `conveyor.config.celery_config`, so JSON-only serialization, the `default` queue on the
  `conveyor` direct exchange, acks_late, reject-on-worker-lost, ignored results, the
  prefetch multiplier and the Redis visibility timeout are exactly the ones a Conveyor
  worker runs with. What it lacks is everything Conveyor adds per job: the database
  claim, the payload validation, the outcome transaction.
- `celery`: Celery's own defaults and nothing but the broker URL: the `celery` queue,
  early acknowledgement, prefetch 4, no publisher confirms on RabbitMQ, no result backend.

Tasks (results ignored):

- `bench.noop(job_id)`: counts itself with one round trip to the recorder's Redis (a Lua
  script): a counter, and the earliest and latest completion times, which the benchmark
  reads to time a drain.
- `bench.started(sample)`: first thing, appends `time.time()` to a Redis list; the
  benchmark compares it with the time it sent the message (enqueue-to-start).

The recorder's Redis is BENCH_RECORD_URL, by default the broker itself when that is Redis,
else RECORD_URL. A worker process is started as
`python -m celery -A bench.bare_app worker ...` with BENCH_BROKER_URL, BENCH_PREFETCH,
BENCH_BARE_CONFIG and BENCH_RECORD_URL in its environment.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
from celery import Celery

from conveyor.config import Settings, celery_config
from conveyor.config.celery_config import is_amqp

NOOP_TASK = "bench.noop"
STARTED_TASK = "bench.started"
DONE_KEY = "bench:bare:done"
FIRST_KEY = "bench:bare:first"
LAST_KEY = "bench:bare:last"
STARTS_KEY = "bench:bare:starts"
DEFAULT_BROKER = "redis://127.0.0.1:6379/9"
# Where the tasks record themselves when the broker is not Redis.
RECORD_URL = "redis://127.0.0.1:6379/13"
CONFIGS = ("conveyor", "celery")

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


def record_url_for(broker_url: str) -> str:
    """The Redis the bare tasks record into, for this broker."""
    return RECORD_URL if is_amqp(broker_url) else broker_url


def make_app(
    broker_url: str,
    prefetch_multiplier: int,
    *,
    config: str = "conveyor",
    record_url: str | None = None,
) -> Celery:
    """A Celery app with Conveyor's configuration or Celery's defaults, and the bench tasks."""
    app = Celery("bare", set_as_current=False)
    if config == "conveyor":
        settings = Settings(broker_url=broker_url, prefetch_multiplier=prefetch_multiplier)
        app.conf.update(celery_config(settings))
    elif config == "celery":
        app.conf.broker_url = broker_url
    else:
        raise ValueError(f"config must be one of {CONFIGS}, not {config!r}")
    recorder = _Recorder(record_url or record_url_for(broker_url))

    @app.task(name=NOOP_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def noop(job_id: str) -> None:
        recorder.done(time.time())

    @app.task(name=STARTED_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def started(sample: int) -> None:
        recorder.started(time.time())

    return app


class _Recorder:
    """A Redis client per process (pool children must not share their parent's sockets)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._pid = -1
        self._client: redis.Redis | None = None
        self._script: Any = None
        self._lock = threading.Lock()

    def _connected(self) -> tuple[redis.Redis, Any]:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = redis.Redis.from_url(self._url, socket_timeout=10)
                self._script = self._client.register_script(_RECORD)
                self._pid = os.getpid()
            return self._client, self._script

    def done(self, now: float) -> None:
        """Count one completion at `now`."""
        _, script = self._connected()
        script(keys=[DONE_KEY, FIRST_KEY, LAST_KEY], args=[repr(now)])

    def started(self, now: float) -> None:
        """Record one start at `now`."""
        client, _ = self._connected()
        client.rpush(STARTS_KEY, repr(now))


app = make_app(
    os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER),
    int(os.environ.get("BENCH_PREFETCH", "4")),
    config=os.environ.get("BENCH_BARE_CONFIG", "conveyor"),
    record_url=os.environ.get("BENCH_RECORD_URL") or None,
)
