"""RabbitMQ publisher confirms waited for once per batch instead of once per message.

py-amqp, given `confirm_publish`, waits for the broker's ack after every message: a
round trip each. The publisher's own connections leave that off; this tracker puts
their channel in confirm mode, numbers the messages as the broker does (delivery tags
1, 2, … from `confirm.select`), and after a batch reads acks until every message is
settled. An ack may cover many messages at once (`multiple`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from amqp import spec


class MessagesRefused(ConnectionError):
    """The broker nacked messages: they are not queued; the relay publishes them later."""


class Confirms:
    """Publisher confirms of one channel: which messages the broker has settled."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_select()
        self._last_tag = 0
        self._pending: dict[int, tuple[uuid.UUID, Callable[[uuid.UUID], None]]] = {}
        self._refused: list[uuid.UUID] = []
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)

    def expect(self, job_id: uuid.UUID, on_confirmed: Callable[[uuid.UUID], None]) -> None:
        """Note a message just published on the channel; its tag is the next number.

        `on_confirmed` is called with `job_id` when the broker acks it, which may happen
        while later messages are published (py-amqp reads what arrived before each one).
        """
        self._last_tag += 1
        self._pending[self._last_tag] = (job_id, on_confirmed)

    def forget(self) -> None:
        """Stop tracking the messages written so far (their caller gave up on them)."""
        self._pending.clear()

    def wait(self, timeout: float) -> None:
        """Read the broker's answers until no message is unsettled.

        Raises what the socket raises when no answer comes within `timeout`, and
        MessagesRefused once all are settled if the broker nacked any.
        """
        while self._pending:
            self.channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=timeout)
        if self._refused:
            count, self._refused = len(self._refused), []
            raise MessagesRefused(f"the broker refused {count} message(s)")

    def _settled(
        self, tag: int, multiple: bool
    ) -> list[tuple[uuid.UUID, Callable[[uuid.UUID], None]]]:
        tags = [t for t in self._pending if t <= tag] if multiple else [tag]
        return [self._pending.pop(t) for t in tags if t in self._pending]

    def _ack(self, tag: int, multiple: bool) -> None:
        for job_id, on_confirmed in self._settled(tag, multiple):
            on_confirmed(job_id)

    def _nack(self, tag: int, multiple: bool) -> None:
        self._refused.extend(job_id for job_id, _ in self._settled(tag, multiple))
