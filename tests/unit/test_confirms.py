"""Publisher confirms read once per batch: acks one by one or many at once, and nacks."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from conveyor.worker.confirms import Confirms, MessagesRefused


class FakeChannel:
    """Answers each wait with the next scripted (kind, tag, multiple) frame."""

    def __init__(self, frames: list[tuple[str, int, bool]]) -> None:
        self.frames = frames
        self.selected = False
        self.waits = 0
        self.events: defaultdict[str, set[Callable[..., None]]] = defaultdict(set)

    def confirm_select(self) -> None:
        self.selected = True

    def wait(self, methods: Any, timeout: float | None = None) -> None:
        self.waits += 1
        if not self.frames:
            raise TimeoutError("no answer")
        kind, tag, multiple = self.frames.pop(0)
        for callback in self.events[f"basic_{kind}"]:
            callback(tag, multiple)


def published(confirms: Confirms, count: int, seen: list[uuid.UUID]) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    for job_id in ids:
        confirms.expect(job_id, seen.append)
    return ids


def test_one_multiple_ack_settles_the_whole_batch() -> None:
    channel = FakeChannel([("ack", 5, True)])
    confirms = Confirms(channel)
    seen: list[uuid.UUID] = []
    ids = published(confirms, 5, seen)
    confirms.wait(1.0)
    assert channel.selected
    assert seen == ids
    assert channel.waits == 1


def test_acks_one_by_one_and_tags_go_on_across_batches() -> None:
    channel = FakeChannel([("ack", 2, False), ("ack", 1, False), ("ack", 3, False)])
    confirms = Confirms(channel)
    seen: list[uuid.UUID] = []
    first = published(confirms, 2, seen)
    confirms.wait(1.0)
    assert seen == [first[1], first[0]]
    [second] = published(confirms, 1, seen)
    confirms.wait(1.0)
    assert seen[-1] == second


def test_acks_read_while_publishing_still_count() -> None:
    channel = FakeChannel([])
    confirms = Confirms(channel)
    seen: list[uuid.UUID] = []
    ids = published(confirms, 2, seen)
    # py-amqp reads frames that arrived before each publish, outside `wait`.
    for callback in channel.events["basic_ack"]:
        callback(2, True)
    confirms.wait(1.0)
    assert seen == ids
    assert channel.waits == 0


def test_nacked_messages_are_not_confirmed() -> None:
    channel = FakeChannel([("nack", 2, True), ("ack", 3, False)])
    confirms = Confirms(channel)
    seen: list[uuid.UUID] = []
    ids = published(confirms, 3, seen)
    with pytest.raises(MessagesRefused, match="2 message"):
        confirms.wait(1.0)
    assert seen == [ids[2]]


def test_a_silent_broker_leaves_the_rest_unconfirmed() -> None:
    channel = FakeChannel([("ack", 1, False)])
    confirms = Confirms(channel)
    seen: list[uuid.UUID] = []
    ids = published(confirms, 3, seen)
    with pytest.raises(TimeoutError):
        confirms.wait(1.0)
    assert seen == ids[:1]
