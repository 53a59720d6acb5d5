"""Keeping the OpenTelemetry SDK out of a process that exports no traces.

Conveyor loads the SDK only in `tracing.setup`, when CONVEYOR_OTLP_ENDPOINT is set. redis-py
loads the SDK's metrics package (and psutil with it) on its own import whenever the SDK is
installed, for an opt-in feature of its own that Conveyor never turns on: in a worker that
is about 7 MB in the main process and again in every pool child, which inherits it. So a
process without tracing imports redis-py once with the SDK hidden; redis-py then records
that the SDK is unavailable and goes on as it does where the SDK is not installed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

SDK = "opentelemetry.sdk"


class _HideSdk(importlib.abc.MetaPathFinder):
    """A finder that answers every import of the SDK with ModuleNotFoundError."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        """Refuse the SDK and its submodules; leave every other import to the next finder."""
        if fullname == SDK or fullname.startswith(f"{SDK}."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def import_redis_without_sdk() -> None:
    """Import redis-py with the OpenTelemetry SDK hidden from it.

    Does nothing once redis-py or the SDK is loaded; the SDK stays importable afterwards,
    for `tracing.setup` and for any other caller.
    """
    if "redis" in sys.modules or SDK in sys.modules:
        return
    finder = _HideSdk()
    sys.meta_path.insert(0, finder)
    try:
        importlib.import_module("redis")
    finally:
        sys.meta_path.remove(finder)
