"""Deferred marks of publication: gathered, written together, never raised."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

import pytest

from conveyor.jobs.marks import DeferredMarks
from tests.support import wait_until


class Writes:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[float, list[uuid.UUID]]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, job_ids: Sequence[uuid.UUID]) -> None:
        with self.lock:
            self.calls.append((time.monotonic(), list(job_ids)))
        if self.fail:
            raise RuntimeError("the store is away")


def test_marks_made_within_the_delay_are_written_together_after_it() -> None:
    writes = Writes()
    marks = DeferredMarks(writes, delay=0.2)
    first, second = [uuid.uuid4()], [uuid.uuid4(), uuid.uuid4()]
    started = time.monotonic()
    marks.add(first)
    marks.add(second)
    assert writes.calls == []  # nothing is written at once
    wait_until(lambda: writes.calls, timeout=5, what="the write")
    [(at, ids)] = writes.calls
    assert ids == first + second
    assert at - started >= 0.2
    # The next marks wait their own delay.
    third = [uuid.uuid4()]
    marks.add(third)
    wait_until(lambda: len(writes.calls) == 2, timeout=5, what="the second write")
    assert writes.calls[1][1] == third


def test_flush_writes_what_is_held_at_once_and_nothing_twice() -> None:
    writes = Writes()
    marks = DeferredMarks(writes, delay=60.0)
    held = [uuid.uuid4() for _ in range(3)]
    marks.add(held)
    marks.add([])
    marks.flush()
    assert [ids for _, ids in writes.calls] == [held]
    marks.flush()
    assert len(writes.calls) == 1


def test_a_failed_write_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    writes = Writes(fail=True)
    marks = DeferredMarks(writes, delay=0.01)
    marks.add([uuid.uuid4()])
    wait_until(
        lambda: "could not mark 1 jobs published" in caplog.text, timeout=5, what="the warning"
    )
    marks.flush()  # nothing held any more
    assert len(writes.calls) == 1


def test_an_idle_writer_ends_closing_its_connection_and_the_next_mark_starts_one() -> None:
    writes = Writes()
    closed: list[str] = []
    marks = DeferredMarks(
        writes,
        delay=0.01,
        on_idle=lambda: closed.append(threading.current_thread().name),
        idle_seconds=0.1,
    )
    marks.add([uuid.uuid4()])
    wait_until(lambda: closed, timeout=5, what="the idle writer to end")
    assert closed == ["conveyor-marks"] and len(writes.calls) == 1
    later = [uuid.uuid4()]
    marks.add(later)
    wait_until(lambda: len(writes.calls) == 2, timeout=5, what="a new writer's write")
    assert writes.calls[1][1] == later
    wait_until(lambda: len(closed) == 2, timeout=5, what="the second writer to end")
