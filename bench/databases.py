"""Temporary PostgreSQL databases for the benchmarks: created, migrated, dropped."""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg

PG_ADMIN_URL = os.environ.get("CONVEYOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def temporary_pg_database(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for the duration; yields its SQLAlchemy URL."""
    name = f"conveyor_bench_{uuid.uuid4().hex[:12]}"
    admin = urlsplit(admin_url)
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin._replace(scheme="postgresql+psycopg", path=f"/{name}").geturl()
    finally:
        try:
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error as error:
            print(f"bench: could not drop database {name}: {error}", file=sys.stderr)
