"""Requests waiting for jobs: one shared poll answers them all (the store is stood in for)."""

from __future__ import annotations

import asyncio
import threading
import uuid

from conveyor.api.waiting import Waiters


class Store:
    """Which jobs have finished, and every question asked of it."""

    def __init__(self) -> None:
        self.done: set[uuid.UUID] = set()
        self.asked: list[list[uuid.UUID]] = []
        self.lock = threading.Lock()

    def finished(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        with self.lock:
            self.asked.append(list(job_ids))
            return {job_id: f"done {job_id}" for job_id in job_ids if job_id in self.done}


async def until(condition: object, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not callable(condition) or not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def test_two_hundred_waiters_cost_one_question_per_poll() -> None:
    store = Store()
    waiters: Waiters[str] = Waiters(store.finished, interval=0.01)
    ids = [uuid.uuid4() for _ in range(200)]

    async def scenario() -> list[str | None]:
        waiting = [asyncio.ensure_future(waiters.wait(job_id, 10)) for job_id in ids]
        await until(lambda: waiters.count() == 200, "200 waiters")
        await until(lambda: any(len(q) == 200 for q in store.asked), "a poll of all 200")
        with store.lock:
            store.done.update(ids[:150])
        await until(lambda: sum(w.done() for w in waiting) == 150, "150 answers")
        with store.lock:
            store.done.update(ids[150:])
        return await asyncio.gather(*waiting)

    # Each request is handed what the poll read for its own job.
    assert asyncio.run(scenario()) == [f"done {job_id}" for job_id in ids]
    waiters.close()
    # One question per poll, each naming every job still awaited, never one per waiter.
    assert len(store.asked) == waiters.polls
    assert all(len(set(q)) == len(q) for q in store.asked)
    assert max(len(q) for q in store.asked) == 200
    assert waiters.count() == 0


def test_a_wait_runs_out_and_nobody_is_asked_about_it_afterwards() -> None:
    store = Store()
    waiters: Waiters[str] = Waiters(store.finished, interval=0.01)
    job_id = uuid.uuid4()

    async def scenario() -> str | None:
        return await waiters.wait(job_id, 0.1)

    assert asyncio.run(scenario()) is None
    assert waiters.count() == 0
    polls = waiters.polls
    # With no one waiting the thread sleeps: no more questions.
    asyncio.run(asyncio.sleep(0.1))
    assert waiters.polls - polls <= 1
    waiters.close()


def test_no_wait_asks_nothing() -> None:
    store = Store()
    waiters: Waiters[str] = Waiters(store.finished)
    assert asyncio.run(waiters.wait(uuid.uuid4(), 0)) is None
    assert store.asked == []
