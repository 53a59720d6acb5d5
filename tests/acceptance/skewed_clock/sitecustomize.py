"""Loaded by a test's Conveyor process: its wall clock runs CONVEYOR_TEST_CLOCK_SKEW s off.

The process's `time.time()` and `datetime.now()`/`utcnow()` are moved, as on a host whose
clock is wrong; the monotonic clock, which sleeps and timeouts use, is left alone.
"""

from __future__ import annotations

import datetime
import os
import time

_SKEW = float(os.environ.get("CONVEYOR_TEST_CLOCK_SKEW", "0") or 0)

if _SKEW:
    _real_time = time.time
    _Base = datetime.datetime

    def _skewed_time() -> float:
        return _real_time() + _SKEW

    class _AnyDateTime(type):
        """Every datetime counts as one, as it did before the class was replaced."""

        def __instancecheck__(cls, instance: object) -> bool:
            return isinstance(instance, _Base)

        def __subclasscheck__(cls, subclass: type) -> bool:
            return issubclass(subclass, _Base)

    class _SkewedDateTime(_Base, metaclass=_AnyDateTime):
        __slots__ = ()

        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> _SkewedDateTime:
            return cls.fromtimestamp(_skewed_time(), tz)

        @classmethod
        def utcnow(cls) -> _SkewedDateTime:
            return cls.fromtimestamp(_skewed_time(), datetime.UTC).replace(tzinfo=None)

    time.time = _skewed_time
    datetime.datetime = _SkewedDateTime  # type: ignore[misc]
