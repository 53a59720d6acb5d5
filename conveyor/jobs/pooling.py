"""Whether this process's PostgreSQL connections go through a transaction pooler.

Set once at start from the settings (`conveyor.cli.wiring`); read when engines and the
fast path's connections are made. A pooler in transaction mode (PgBouncer's
`pool_mode = transaction`) hands each transaction to any server connection: a statement
prepared on one is unknown on the next, and a session setting stays behind on a
connection another client gets. PgBouncer carries the time zone along with each client,
so that one setting remains.
"""

from __future__ import annotations


class Pooling:
    """The process's one switch: True behind a transaction pooler."""

    transaction = False


def use_transaction_pooler(enabled: bool) -> None:
    """Connect for a pooler in transaction mode (or not) from now on."""
    Pooling.transaction = enabled
