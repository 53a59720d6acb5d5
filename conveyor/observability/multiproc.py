"""prometheus-client's multiprocess mode for worker processes.

The mode is chosen when prometheus_client is first imported, from the environment, so a
worker calls `enable` before anything imports it; prefork children inherit the variable
and write their own files, which the worker's metrics port sums.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable() -> str:
    """Give this process (and its children) a fresh metrics folder; removed at exit."""
    folder = tempfile.mkdtemp(prefix="conveyor-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    owner = os.getpid()

    def _remove() -> None:
        # Forked pool children inherit this hook; only the process that made it cleans up.
        if os.getpid() == owner:
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(_remove)
    return folder


def disable() -> None:
    """Children started from here (the API, beat) keep their metrics in memory."""
    os.environ.pop(MULTIPROC_ENV, None)
