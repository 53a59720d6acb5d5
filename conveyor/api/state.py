"""What the API's routes share: settings, the job store, the publisher, probes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from conveyor.api.ratelimit import RateLimiter
from conveyor.config import Settings
from conveyor.jobs import keys
from conveyor.jobs.outbox import Publisher

KEY_CACHE_SECONDS = 10.0


@dataclass
class KeyCache:
    """Recently seen keys by hash: most requests skip the lookup; revocations show in seconds."""

    ttl: float = KEY_CACHE_SECONDS
    _entries: dict[str, tuple[float, keys.ApiKey | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def lookup(self, sessions: sessionmaker[Session], presented: str) -> keys.ApiKey | None:
        """The live key for a presented secret, or None."""
        digest = keys.hash_key(presented)
        now = time.monotonic()
        with self._lock:
            cached = self._entries.get(digest)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        with sessions() as session:
            found = keys.find_key(session, presented)
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[digest] = (now, found)
        return found


@dataclass
class ApiState:
    """Dependencies of the API, built once by whoever starts it."""

    settings: Settings
    sessions: sessionmaker[Session]
    publisher: Publisher
    broker_check: Callable[[], None]
    queue_depths: Callable[[], dict[str, int]] | None = None
    key_cache: KeyCache = field(default_factory=KeyCache)
    limiter: RateLimiter | None = None

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = RateLimiter(
                self.settings.api_rate_per_second, float(self.settings.api_rate_burst)
            )
