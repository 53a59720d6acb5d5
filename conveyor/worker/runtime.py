"""Per-process resources of a worker: settings, the job store, the Celery app."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conveyor.config import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker


@dataclass
class StoreHandle:
    """An engine that is rebuilt after a fork, since connections must not cross one.

    Made on first use, and SQLAlchemy loaded with it (see conveyor.lazy).
    """

    url: str
    pool_size: int = 5
    _pid: int = field(default=-1, init=False)
    _engine: Engine | None = field(default=None, init=False)
    _sessions: sessionmaker[Session] | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def sessions(self) -> sessionmaker[Session]:
        """The session factory of this process."""
        with self._lock:
            if self._sessions is None or self._pid != os.getpid():
                from conveyor.jobs.db import make_engine, make_session_factory

                if self._engine is not None and self._pid != os.getpid():
                    # Inherited from the parent: drop without closing its sockets.
                    self._engine.dispose(close=False)
                self._engine = make_engine(self.url, pool_size=self.pool_size)
                self._sessions = make_session_factory(self._engine)
                self._pid = os.getpid()
            return self._sessions

    def dispose(self) -> None:
        """Close this process's connections."""
        with self._lock:
            if self._engine is not None and self._pid == os.getpid():
                self._engine.dispose()
            self._engine = None
            self._sessions = None


def worker_name(hostname: str | None = None) -> str:
    """This process's identity in claims: host and pid."""
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


@dataclass
class Runtime:
    """What the task bodies of one process share."""

    settings: Settings
    store: StoreHandle
