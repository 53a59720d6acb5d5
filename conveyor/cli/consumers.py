"""Whether anything consumes a queue: what `--wait` checks before waiting long."""

from __future__ import annotations

import time

from conveyor.cli.errors import CommandError
from conveyor.cli.handover import platform_pools
from conveyor.cli.wiring import Platform

# A job not started after this long makes `--wait` look for a consumer of its queue,
# and then again this often while it waits.
CHECK_AFTER_SECONDS = 2.0
CHECK_EVERY_SECONDS = 10.0
INSPECT_SECONDS = 1.5


def consuming_queues(platform: Platform) -> set[str] | None:
    """The queues some worker consumes now; None when that cannot be told."""
    settings = platform.settings
    if settings.embedded:
        pools = platform_pools(settings.database_url)
        return set() if pools is None else set(pools)
    try:
        found = platform.celery.control.inspect(timeout=INSPECT_SECONDS).active_queues()
    except Exception:  # the broker did not answer: say nothing rather than guess
        return None
    return {queue["name"] for queues in (found or {}).values() for queue in queues}


def how_to_start(settings_embedded: bool, queue: str) -> str:
    """The commands that start a consumer of `queue`."""
    if settings_embedded:
        return "start the platform with `make run` (or `conveyor up`) in another terminal"
    return (
        f"start the platform with `conveyor up`, or a worker with `conveyor worker --pool {queue}`"
    )


class ConsumerWatch:
    """Checks, while a command waits on a job, that something consumes its queue."""

    def __init__(self, platform: Platform, queue: str, what: str) -> None:
        self._platform = platform
        self._queue = queue
        self._what = what
        self._next = time.monotonic() + CHECK_AFTER_SECONDS

    def check(self, started: bool) -> None:
        """Raise a CommandError naming how to start a worker when nothing consumes."""
        now = time.monotonic()
        if started or now < self._next:
            return
        self._next = now + CHECK_EVERY_SECONDS
        queues = consuming_queues(self._platform)
        if queues is None or self._queue in queues:
            return
        raise CommandError(
            f"{self._what} is recorded, but nothing is consuming queue {self._queue!r}: "
            f"{how_to_start(self._platform.settings.embedded, self._queue)}; "
            "it runs once a worker starts"
        )
