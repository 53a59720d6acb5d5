"""Reads from a read replica, with the primary behind it.

What only reads (listings, stats, the console, the shared poll of `?wait=`) takes its
sessions here; everything that decides (claims, transitions, idempotency, keys) keeps
the primary's. A replica that does not answer is left alone for `RETRY_SECONDS` and its
reads go to the primary meanwhile, so a lost replica costs one slow checkout, not an
outage. A read of one row by id that the replica does not have yet (a job submitted a
moment ago, still in flight to a lagging replica) is read again on the primary
(`first_found`): a client always finds what it has just written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from conveyor.observability import logs

log = logs.get(__name__)

T = TypeVar("T")

RETRY_SECONDS = 5.0
# How far the replica's replay is behind what it has received: 0 when it has replayed
# everything (an idle primary sends nothing, and is not lag), else the age of the last
# transaction it replayed.
LAG_SQL = """
SELECT CASE
    WHEN NOT pg_is_in_recovery() THEN 0
    WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0
    ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)
END
"""
PRIMARY = "primary"
REPLICA = "replica"


class ReadSessions:
    """Sessions for reads: the replica's while it answers, else the primary's."""

    def __init__(
        self, primary: sessionmaker[Session], replica: sessionmaker[Session] | None = None
    ) -> None:
        self.primary = primary
        self.replica = replica
        self._down_until = 0.0
        self._down_reason = ""
        self._lock = threading.Lock()
        # Reads served by each database, for /metrics and the tests.
        self.served = {PRIMARY: 0, REPLICA: 0}

    def _count(self, which: str) -> None:
        with self._lock:
            self.served[which] += 1

    def __call__(self) -> Session:
        """A session on the replica when it is up (its connection already checked out),
        else on the primary."""
        return self.session()[0]

    def session(self) -> tuple[Session, str]:
        """A read session and which database it reads."""
        if self.replica is not None and time.monotonic() >= self._down_until:
            session = self.replica()
            try:
                session.connection()
            except DBAPIError as error:
                session.close()
                self._mark_down(error)
            else:
                self._count(REPLICA)
                return session, REPLICA
        self._count(PRIMARY)
        return self.primary(), PRIMARY

    def _mark_down(self, error: Exception) -> None:
        with self._lock:
            first = time.monotonic() >= self._down_until
            self._down_until = time.monotonic() + RETRY_SECONDS
            self._down_reason = type(error).__name__
        if first:
            log.warning("the read replica does not answer; reads go to the primary: %s", error)

    def first_found(self, read: Callable[[Session], T | None]) -> T | None:
        """`read` on a read session; when the replica has nothing, again on the primary."""
        session, which = self.session()
        try:
            with session:
                found = read(session)
        except DBAPIError as error:
            if which != REPLICA:
                raise
            self._mark_down(error)
            found = None
        if found is not None or which == PRIMARY:
            return found
        self._count(PRIMARY)
        with self.primary() as session:
            return read(session)

    def status(self) -> str | None:
        """The replica's health as /readyz tells it; None without a replica."""
        if self.replica is None:
            return None
        if time.monotonic() < self._down_until:
            return f"unavailable ({self._down_reason}): reads go to the primary"
        try:
            with self.replica() as session:
                lag = session.execute(text(LAG_SQL)).scalar_one()
        except DBAPIError as error:
            self._mark_down(error)
            return f"unavailable ({type(error).__name__}): reads go to the primary"
        return f"ok, {float(lag):.1f} s behind"
