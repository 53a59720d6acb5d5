"""Named leases in the database: one holder at a time, taken over when it lapses."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from conveyor.jobs.db import db_now
from conveyor.jobs.tables import leases


def hold(
    session: Session, name: str, holder: str, ttl_seconds: float, *, now: dt.datetime | None = None
) -> bool:
    """Take or renew the lease `name` for `holder`; False while someone else holds it.

    Timed by the database's clock, so a holder whose clock runs ahead or behind neither
    keeps the lease too long nor takes it while it is held.
    """
    now = now or db_now(session)
    expires = now + dt.timedelta(seconds=ttl_seconds)
    taken = session.execute(
        update(leases)
        .where(leases.c.name == name, or_(leases.c.holder == holder, leases.c.expires_at < now))
        .values(holder=holder, expires_at=expires)
        .returning(leases.c.name)
    ).first()
    if taken is not None:
        return True
    try:
        with session.begin_nested():
            session.execute(insert(leases), {"name": name, "holder": holder, "expires_at": expires})
    except IntegrityError:
        return False
    return True


def release(session: Session, name: str, holder: str) -> None:
    """Give the lease up at once, so a standby need not wait for it to lapse."""
    session.execute(
        update(leases)
        .where(leases.c.name == name, leases.c.holder == holder)
        .values(expires_at=db_now(session) - dt.timedelta(seconds=1))
    )
