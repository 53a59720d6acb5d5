"""kombu's Redis transport, with fewer round trips per message on the consuming side.

Three changes, each on kombu's own classes:

- One redis-py client per channel for its commands. kombu makes a new client for every
  publish batch and every acknowledgement, and a client's construction (its table of
  some 170 response callbacks) costs more than the command it sends. A redis-py client
  is safe to share between threads and holds no connection of its own (they come from
  the channel's pool), so each channel makes one, on first use, and keeps it.
- The bookkeeping of unacknowledged messages (kombu's ack emulation: a hash of the
  messages a consumer holds and a sorted set of when it took them) is written by a
  thread of the consumer's, FLUSH_SECONDS after the first entry held, for everything
  delivered and acknowledged since, instead of one MULTI/EXEC round trip on the event
  loop per delivery and another per ack. A message taken but not yet
  entered there when the worker dies is not restored by Redis: its job is still `queued`
  in the store, and the sweep of lost messages has the relay publish it again (or it was
  claimed, and rescue takes it back when the lease lapses). An ack not yet written leaves
  an entry that is restored after the visibility timeout; the store then drops the second
  delivery of a finished job.
- When BRPOP hands over a message and the consumer may hold several more (its prefetch
  limit), the messages already waiting are taken in the same turn, by one script, in
  BRPOP's order of queues and priorities, instead of one BRPOP round trip each. Not after
  a message that came alone (the previous one TAKE_GAP_SECONDS or more before, and none
  found waiting then): the script would find nothing, and its round trip would delay the
  message's hand-over to the pool, which Celery writes on the loop's next turn. A burst
  pays one BRPOP more: its second message comes at once, and the take follows it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

# For Celery's `broker_transport` setting.
TRANSPORT = "conveyor.worker.redis_transport:Transport"

# At most this many messages are taken by one script call after a BRPOP, and only when
# at least MIN_TAKE may be: a call for fewer costs about what the BRPOPs it saves do.
MAX_TAKE = 64
MIN_TAKE = 4
TAKE_GAP_SECONDS = 0.05
# Held ack-emulation entries are written this often, or once this many are held.
FLUSH_SECONDS = 0.01
FLUSH_HELD = 256
# After a failed write, the writer tries again this much later.
WRITE_RETRY_SECONDS = 0.5

# Pop up to ARGV[1] messages from KEYS in order; the key and the message of each.
TAKE_SCRIPT = """
local taken = {}
local want = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
    if want <= 0 then break end
    local items = redis.call('RPOP', key, want)
    if items then
        for _, item in ipairs(items) do
            taken[#taken + 1] = key
            taken[#taken + 1] = item
        end
        want = want - #items
    end
end
return taken
"""


class QoS(kombu_redis.QoS):
    """Ack emulation whose Redis writes are held and written together, off the loop.

    A thread of the consumer's own writes the held entries once the oldest is
    FLUSH_SECONDS old (or FLUSH_HELD are held). Written on the event loop, they cost a
    round trip on the turn after each delivery: before Celery writes the message to a
    pool child, so into every job's enqueue-to-start.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending = threading.Condition()
        self._writing = threading.Lock()  # one write at a time, in the order taken
        self._appended: dict[str, str] = {}
        self._acked: list[str] = []
        self._held_since = 0.0
        self._writer: threading.Thread | None = None
        self._closed = False

    def _hold(self) -> None:
        """Note a new held entry (called with `_pending` held). The writer is woken only
        when it waits for a first entry or when FLUSH_HELD are held; otherwise its timed
        wait ends when the oldest is due (a wake-up per delivery and per ack would take
        the GIL from the event loop twice a job)."""
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_when_due, name="conveyor-ack-emulation", daemon=True
            )
            self._writer.start()
        if not self._held_since:
            self._held_since = time.monotonic()
            self._pending.notify()
        elif len(self._appended) + len(self._acked) == FLUSH_HELD:
            self._pending.notify()

    def append(self, message: Any, delivery_tag: str) -> None:
        """Hold the message as delivered; its entry is written by the writer."""
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self._pending:
            self._appended[delivery_tag] = entry
            self._hold()
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Release the message now; its entry is removed by the writer."""
        with self._pending:
            self._acked.append(delivery_tag)
            self._hold()
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """As kombu's, once the entries it works on are written."""
        self.flush()
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> None:
        """As kombu's, once the entries it works on are written."""
        self.flush()
        super().restore_unacked(client)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """As kombu's, with this consumer's entries written first."""
        self.flush()
        super().restore_visible(*args, **kwargs)

    def close(self) -> None:
        """Stop the writer; what is held is written by the restore that follows."""
        with self._pending:
            self._closed = True
            self._pending.notify()

    def _write_when_due(self) -> None:
        while True:
            with self._pending:
                while not self._closed and not (self._appended or self._acked):
                    self._pending.wait()
                if self._closed:
                    return
                held = len(self._appended) + len(self._acked)
                due = self._held_since + FLUSH_SECONDS - time.monotonic()
                if held < FLUSH_HELD and due > 0:
                    self._pending.wait(due)
                    continue
            try:
                self.flush()
            except Exception as error:  # held again by flush; tried again in a while
                log.warning("could not write the ack emulation's entries: %s", error)
                with self._pending:
                    if not self._closed:
                        self._pending.wait(WRITE_RETRY_SECONDS)

    def flush(self) -> None:
        """Write the held deliveries and acks in one round trip (entries first)."""
        with self._writing:
            with self._pending:
                self._held_since = 0.0
                if not self._appended and not self._acked:
                    return
                appended, acked = self._appended, self._acked
                self._appended, self._acked = {}, []
            try:
                with self.pipe_or_acquire() as pipe:
                    if appended:
                        now = time.time()
                        pipe.zadd(self.unacked_index_key, dict.fromkeys(appended, now))
                        pipe.hset(self.unacked_key, mapping=appended)
                    if acked:
                        pipe.zrem(self.unacked_index_key, *acked)
                        pipe.hdel(self.unacked_key, *acked)
                    pipe.execute()
            except BaseException:
                # Held again, before anything held since: the next write has them all.
                with self._pending:
                    self._appended = {**appended, **self._appended}
                    self._acked = acked + self._acked
                    self._held_since = self._held_since or time.monotonic()
                raise


class Channel(kombu_redis.Channel):
    """A Redis channel whose synchronous commands share one client."""

    QoS = QoS
    _shared_client: Any = None
    _take: Any = None
    _delivered_at = 0.0
    _took_some = False

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """The given client, else the channel's own (made on first use)."""
        if client:
            yield client
            return
        if self._shared_client is None:
            self._shared_client = self._create_client()
        yield self._shared_client

    def put_many(self, messages: Sequence[tuple[str, str]]) -> None:
        """LPUSH prepared messages, each `(queue, text)` with the JSON text `_put` writes
        for a message of priority 0: one LPUSH of many values a queue, in one pipeline
        (one round trip). The list holds them as one LPUSH each would have left them, the
        first given nearest the consumer's end. On an error none is known to have arrived."""
        by_queue: dict[str, list[str]] = {}
        for queue, message in messages:
            by_queue.setdefault(queue, []).append(message)
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for queue, texts in by_queue.items():
                pipe.lpush(self._q_for_pri(queue, 0), *texts)
                if self._expires and queue in self._expires:
                    for step in self.priority_steps:
                        pipe.pexpire(self._q_for_pri(queue, step), self._expires[queue])
            pipe.execute()

    def flush_acks(self) -> None:
        """Write the ack emulation's held entries now."""
        qos = self._qos  # kombu's, made on first use of `qos`
        if isinstance(qos, QoS):
            qos.flush()

    def close(self) -> None:
        """As kombu's (which restores what this consumer holds), its writer stopped."""
        qos = self._qos
        if isinstance(qos, QoS):
            qos.close()
        super().close()

    def _brpop_read(self, **options: Any) -> bool:
        delivered: bool = super()._brpop_read(**options)
        if delivered:
            now = time.monotonic()
            alone = not self._took_some and now - self._delivered_at >= TAKE_GAP_SECONDS
            self._delivered_at = now
            self._took_some = False if alone else self._take_waiting()
        return delivered

    def _take_waiting(self) -> bool:
        """Take the messages already queued, up to what the prefetch limit allows; whether
        any was taken."""
        room = self.qos.can_consume_max_estimate()
        want = MAX_TAKE if room is None else min(room, MAX_TAKE)
        if want < MIN_TAKE or self.global_keyprefix:
            return False
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return False
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        with self.conn_or_acquire() as client:
            if self._take is None:
                self._take = client.register_script(TAKE_SCRIPT)
            taken = self._take(keys=keys, args=[want], client=client)
        for key, item in zip(taken[::2], taken[1::2], strict=True):
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self.connection._deliver(loads(bytes_to_str(item)), queue)
        return bool(taken)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel
