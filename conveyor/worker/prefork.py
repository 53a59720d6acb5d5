"""Keeping a prefork worker's heap shared with its pool children.

A pool child is a fork of the worker and shares every page of the parent's heap until one
of them writes to it. CPython's cyclic garbage collector writes into the header of every
object it examines, so the first collections in a child would copy most of the inherited
heap, page by page, into the child's own memory. Objects moved to the permanent generation
(`gc.freeze`) are never examined again, so their pages stay shared: the modules, the
Celery app and the settings, loaded once in the parent, are held once for the whole pool.
"""

from __future__ import annotations

import gc
from typing import Any

from celery.signals import worker_init


def freeze_heap_before_fork() -> None:
    """Freeze this process's heap when the worker starts, just before its pool forks."""
    worker_init.connect(_freeze, weak=False, dispatch_uid="conveyor.prefork.freeze")


def _freeze(**_kwargs: Any) -> None:
    # Garbage found now is freed rather than kept for the life of the process.
    gc.collect()
    gc.freeze()
