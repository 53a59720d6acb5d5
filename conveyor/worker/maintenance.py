"""Bodies of the periodic maintenance tasks: stats rollups, anomaly detection, retention."""

from __future__ import annotations

import logging

from conveyor.config import Settings
from conveyor.jobs import anomalies, retention, rollups, store
from conveyor.worker.runtime import StoreHandle

log = logging.getLogger(__name__)


def aggregate_once(handle: StoreHandle) -> int:
    """Roll up the complete minutes finished since the last run, then look for anomalies.

    Returns the rollup rows written. Detection has a transaction of its own, after the
    rollups are committed.
    """
    with handle.sessions().begin() as session:
        written = rollups.aggregate(session, now=store.utcnow())
    with handle.sessions().begin() as session:
        anomalies.detect(session, now=store.utcnow())
    return written


def cleanup_once(handle: StoreHandle, settings: Settings) -> dict[str, int]:
    """Delete finished jobs, dead jobs and rollups past their retention, in batches."""
    deleted = retention.cleanup(
        handle.sessions(),
        now=store.utcnow(),
        finished_days=settings.retention_finished_days,
        dead_days=settings.retention_dead_days,
        rollup_days=settings.retention_rollup_days,
    )
    if any(deleted.values()):
        log.info("retention deleted %s", deleted)
    return deleted
