"""Transaction-scoped locks on names: idempotency keys and concurrency keys.

A name maps to a 64-bit lock key by its SHA-256; the driver takes the lock (an
advisory lock on PostgreSQL; on SQLite the transaction already holds the one write lock).
"""

from __future__ import annotations

import hashlib

from sqlalchemy.orm import Session

from conveyor.jobs.store.driver import driver_for


def lock_key(name: str) -> int:
    """The signed 64-bit lock key of `name`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def try_transaction_lock(session: Session, key: int) -> bool:
    """Take the transaction-scoped lock `key` if free; False when another holds it."""
    return driver_for(session).try_lock(session, key)


def lock_idempotency_key(session: Session, tenant: str, key: str) -> bool:
    """Take the transaction's lock on a tenant's idempotency key; False if another holds it.

    On PostgreSQL an advisory lock held to the end of the transaction; SQLite runs one
    writing transaction at a time, so there the lock is always had.
    """
    return try_transaction_lock(session, lock_key(f"{tenant}\x00{key}"))


def lock_limit_key(session: Session, name: str) -> None:
    """Serialize claims counted against one concurrency key (PostgreSQL; SQLite is serial)."""
    driver_for(session).lock(session, lock_key(name))
