"""What every benchmark's `main` shares: argument types and the guarded run."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import redis
from kombu.exceptions import KombuError

from bench.brokers import BenchBroker
from bench.processes import BenchError, raise_interrupt


def positive_int(value: str) -> int:
    """An argparse type: a whole number of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def run_guarded(
    broker_url: str,
    *,
    prefix: str,
    keep_logs: bool,
    kept: str,
    body: Callable[[BenchBroker, Path], bool],
) -> int:
    """Run a benchmark body with its broker emptied before and after, and its logs in a
    temporary folder kept on failure; every failure is one line. 0 on success, else 1."""
    signal.signal(signal.SIGTERM, raise_interrupt)
    logs = Path(tempfile.mkdtemp(prefix=prefix))
    broker = BenchBroker(broker_url)
    ok = False
    try:
        broker.empty()
        ok = body(broker, logs)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
    except Exception as error:  # a service failed under us: one line, not a traceback
        print(f"bench: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
    finally:
        with contextlib.suppress(redis.RedisError, KombuError, OSError):
            broker.empty()
        broker.close()
        if ok and not keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            print(f"bench: {kept} logs kept in {logs}", file=sys.stderr)
    return 0 if ok else 1
