"""API keys: created once, shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from conveyor.jobs.tables import api_keys, console_secrets

SCOPES = ("submit", "read", "admin")
KEY_PREFIX = "cvk_"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: who it speaks for and what it may do; never the key itself."""

    id: uuid.UUID
    tenant: str
    prefix: str
    scopes: frozenset[str]
    revoked: bool


def hash_key(key: str) -> str:
    """The stored form of a key; keys carry 256 random bits, so a plain hash suffices."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    session: Session, *, tenant: str, scopes: tuple[str, ...] = SCOPES
) -> tuple[str, ApiKey]:
    """Make a new key for a tenant; returns the key (shown once) and its record."""
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scope {sorted(unknown)[0]!r}; known: {', '.join(SCOPES)}")
    if not tenant or len(tenant) > 100:
        raise ValueError("tenant must be 1 to 100 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(uuid.uuid4(), tenant, key[:12], frozenset(scopes), False)
    session.execute(
        insert(api_keys),
        {
            "id": record.id,
            "tenant": tenant,
            "prefix": record.prefix,
            "key_hash": hash_key(key),
            "scopes": sorted(scopes),
            "created_at": dt.datetime.now(dt.UTC),
            "revoked_at": None,
        },
    )
    return key, record


def find_key(session: Session, key: str) -> ApiKey | None:
    """The live record of a presented key, or None when unknown or revoked."""
    digest = hash_key(key)
    row = session.execute(select(api_keys).where(api_keys.c.key_hash == digest)).mappings().first()
    if row is None or not hmac.compare_digest(row["key_hash"], digest):
        return None
    if row["revoked_at"] is not None:
        return None
    return ApiKey(row["id"], row["tenant"], row["prefix"], frozenset(row["scopes"]), False)


def revoke_key(session: Session, key_id: uuid.UUID) -> bool:
    """Revoke a key by id; True when a live key was revoked."""
    result = session.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=dt.datetime.now(dt.UTC))
        .returning(api_keys.c.id)
    )
    return result.first() is not None


def list_keys(session: Session, *, tenant: str | None = None) -> list[ApiKey]:
    """Stored keys, oldest first: who they speak for and what they may do."""
    statement = select(api_keys).order_by(api_keys.c.created_at)
    if tenant is not None:
        statement = statement.where(api_keys.c.tenant == tenant)
    return [
        ApiKey(
            r["id"], r["tenant"], r["prefix"], frozenset(r["scopes"]), r["revoked_at"] is not None
        )
        for r in session.execute(statement).mappings()
    ]


def get_key(session: Session, key_id: uuid.UUID) -> ApiKey | None:
    """The live record of a key by its id, or None when unknown or revoked."""
    row = session.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
    if row is None or row["revoked_at"] is not None:
        return None
    return ApiKey(row["id"], row["tenant"], row["prefix"], frozenset(row["scopes"]), False)


def console_secret(session: Session) -> str:
    """The stored key that signs console sessions; the first caller makes it.

    Two processes making it at once: one insert wins and both read the winner's.
    """
    found = session.execute(select(console_secrets.c.secret)).scalar()
    if found is not None:
        return str(found)
    try:
        with session.begin_nested():
            session.execute(
                insert(console_secrets),
                {"id": 1, "secret": secrets.token_hex(32), "created_at": dt.datetime.now(dt.UTC)},
            )
    except IntegrityError:
        pass
    return str(session.execute(select(console_secrets.c.secret)).scalar_one())
