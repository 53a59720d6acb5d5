"""Flow control at delivery: global and per-key rate limits, per-key concurrency limits.

Rate limits are GCRA reservations: each start reserves the next free slot of its limit,
so starts are spaced exactly 1/rate apart across every worker and machine. A slot is
taken only when it lies within a short horizon; the worker that took it waits for it
and then starts the job, so starts keep the limit's pace to the millisecond. When every
slot within the horizon is taken, the job is deferred (`scheduled`) to when the limit
will have room again, without a slot; it neither fails nor uses an attempt. Slots live
in Redis (one atomic script) or, without Redis, in a row of the job store updated under
a row lock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from conveyor.config import Settings, TaskLimits
from conveyor.jobs.db import db_now
from conveyor.jobs.tables import rate_limits

RESERVE = """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local interval = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
if tat < now then tat = now end
if tat - now > horizon then return {0, tostring(tat - horizon), tostring(now)} end
local ttl = math.ceil((tat + interval - now) * 1000) + 60000
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', ttl)
return {1, tostring(tat), tostring(now)}
"""


@dataclass(frozen=True)
class Reservation:
    """A rate limit's answer: a slot at `at` (taken), or no slot before `at`.

    Both times are on the clock the slots are kept by (Redis's, or the database's),
    given as `now` at the moment of the answer: a worker waits `at - now`, never
    comparing `at` with its own clock.
    """

    taken: bool
    at: dt.datetime
    now: dt.datetime

    @property
    def wait_seconds(self) -> float:
        """How long from the answer until `at`."""
        return max(0.0, (self.at - self.now).total_seconds())


class Limiter(Protocol):
    """Reserves the next start slot of a named rate limit."""

    def reserve(self, session: Session, name: str, interval: float, horizon: float) -> Reservation:
        """The next slot if it lies within `horizon` seconds, else when to ask again."""
        ...


class RedisLimiter:
    """GCRA slots in Redis, reserved by one Lua script call."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2)
        self._script = self._client.register_script(RESERVE)

    def reserve(self, session: Session, name: str, interval: float, horizon: float) -> Reservation:
        """Reserve in Redis; the session is not used."""
        # Redis's own clock: one for every worker, whatever each host's clock says.
        taken, at, now = self._script(keys=[f"conveyor:rate:{name}"], args=[interval, horizon])
        return Reservation(
            bool(int(taken)),
            dt.datetime.fromtimestamp(float(at), dt.UTC),
            dt.datetime.fromtimestamp(float(now), dt.UTC),
        )


class StoreLimiter:
    """GCRA slots in the job store, under a row lock held until the reservation commits."""

    def reserve(self, session: Session, name: str, interval: float, horizon: float) -> Reservation:
        """Reserve in the caller's transaction."""
        now = db_now(session)
        step = dt.timedelta(seconds=interval)
        ahead = dt.timedelta(seconds=horizon)
        for _ in range(3):
            row = session.execute(
                select(rate_limits.c.tat).where(rate_limits.c.name == name).with_for_update()
            ).first()
            if row is not None:
                start: dt.datetime = max(row.tat, now)
                if start - now > ahead:
                    return Reservation(False, start - ahead, now)
                session.execute(
                    update(rate_limits).where(rate_limits.c.name == name).values(tat=start + step)
                )
                return Reservation(True, start, now)
            try:
                with session.begin_nested():
                    session.execute(insert(rate_limits), {"name": name, "tat": now + step})
                return Reservation(True, now, now)
            except IntegrityError:
                continue
        raise RuntimeError(f"could not reserve a slot of {name}")


def limiter_for(settings: Settings) -> Limiter:
    """Redis when one is configured (or is the broker), else the job store."""
    url = settings.limiter_url
    if url is None and settings.broker_url.startswith(("redis://", "rediss://")):
        url = settings.broker_url
    return RedisLimiter(url) if url else StoreLimiter()


def limit_key(spec: TaskLimits, payload: Any, tags: list[str]) -> str | None:
    """The value a job's per-key limits count by, or None when it has none."""
    if spec.key is None:
        return None
    if spec.key.startswith("payload."):
        field = spec.key.removeprefix("payload.")
        value = payload.get(field) if isinstance(payload, dict) else None
        return None if value is None else str(value)[:200]
    prefix = spec.key.removeprefix("tag:")
    return next((tag[:200] for tag in tags if tag.startswith(prefix)), None)
