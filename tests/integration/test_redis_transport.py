"""Conveyor's Redis transport on a real Redis: fewer round trips, the same ack emulation."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue

from conveyor.config import Settings
from conveyor.jobs import bulk_insert
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job
from conveyor.worker.app import create_celery
from conveyor.worker.messages import RunMessages
from conveyor.worker.redis_transport import TAKE_GAP_SECONDS, TRANSPORT, Channel
from tests.support import wait_until

QUEUE = Queue("transport-test", Exchange("transport-test", type="direct"), "transport-test")


@pytest.fixture
def connection(redis_url: str) -> Iterator[Connection]:
    with Connection(redis_url, transport=TRANSPORT) as conn:
        yield conn


def publish(conn: Connection, count: int) -> None:
    producer = Producer(conn.default_channel, exchange=QUEUE.exchange, routing_key="transport-test")
    QUEUE(conn.default_channel).declare()
    for n in range(count):
        producer.publish({"n": n}, serializer="json")


def queued_n(item: bytes) -> int:
    """The `n` of a message as the Redis transport stores it (body in base64)."""
    body = json.loads(base64.b64decode(json.loads(item)["body"]))
    return int(body["n"])


def unacked(client: redis.Redis) -> tuple[int, int]:
    return client.hlen("unacked"), client.zcard("unacked_index")


def consuming(conn: Connection, prefetch: int = 0) -> tuple[Channel, list[Message]]:
    """A channel consuming QUEUE with this prefetch limit, and the messages it gets."""
    got: list[Message] = []
    channel = conn.channel()
    assert isinstance(channel, Channel)
    consumer = Consumer(channel, [QUEUE], callbacks=[lambda _body, m: got.append(m)])
    if prefetch:
        consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    return channel, got


def test_one_turn_takes_what_is_waiting_up_to_the_prefetch_limit(
    connection: Connection, redis_url: str
) -> None:
    publish(connection, 20)
    channel, got = consuming(connection, prefetch=6)
    # The first message after a quiet spell is handed over alone (no script call to
    # delay it); the second comes at once, and the four others waiting come with it.
    connection.drain_events(timeout=5)
    assert [m.payload["n"] for m in got] == [0]
    connection.drain_events(timeout=5)
    assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4, 5]
    client = redis.Redis.from_url(redis_url)
    assert client.llen("transport-test") == 14
    # The deliveries' entries are held, then written together in one round trip.
    channel.flush_acks()
    assert unacked(client) == (6, 6)
    for message in got:
        message.ack()
    channel.flush_acks()
    assert unacked(client) == (0, 0)
    # Within a burst every turn takes what waits: one BRPOP and one script call.
    connection.drain_events(timeout=5)
    assert [m.payload["n"] for m in got[6:]] == [6, 7, 8, 9, 10, 11]


def test_a_lone_message_is_handed_over_without_a_script_call(
    connection: Connection, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = Channel._take_waiting

    def counted(self: Channel) -> bool:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(Channel, "_take_waiting", counted)
    channel, got = consuming(connection, prefetch=8)
    for n in range(3):
        publish(connection, 1)
        connection.drain_events(timeout=5)
        assert len(got) == n + 1
        got[-1].ack()
        # A quiet spell as long as the gap: the next one comes alone again.
        channel._delivered_at -= TAKE_GAP_SECONDS
    assert calls == []
    # Two at once: the first is handed over alone, the second takes what waits.
    publish(connection, 6)
    connection.drain_events(timeout=5)
    connection.drain_events(timeout=5)
    assert len(got) == 9
    assert calls == [1]


def test_what_a_consumer_held_unacked_goes_back_on_close(
    connection: Connection, redis_url: str
) -> None:
    publish(connection, 10)
    channel, got = consuming(connection, prefetch=6)
    connection.drain_events(timeout=5)
    connection.drain_events(timeout=5)
    assert len(got) == 6
    got[0].ack()
    # Nothing was written yet for these six: closing writes it, then restores the rest.
    channel.close()
    client = redis.Redis.from_url(redis_url)
    assert client.llen("transport-test") == 9
    assert unacked(client) == (0, 0)
    waiting = sorted(queued_n(item) for item in client.lrange("transport-test", 0, -1))
    assert waiting == list(range(1, 10))


def test_an_unacked_delivery_is_restored_after_the_visibility_timeout(
    redis_url: str,
) -> None:
    with Connection(
        redis_url, transport=TRANSPORT, transport_options={"visibility_timeout": 1}
    ) as conn:
        publish(conn, 1)
        channel, got = consuming(conn)
        conn.drain_events(timeout=5)
        assert len(got) == 1
        client = redis.Redis.from_url(redis_url)
        channel.flush_acks()
        assert unacked(client) == (1, 1)
        # As if this consumer had died holding it: the entry is older than the timeout.
        client.zadd("unacked_index", {got[0].delivery_tag: 0})
        channel.qos.restore_visible(num=10, interval=1)
        assert client.llen("transport-test") == 1
        assert unacked(client) == (0, 0)


def test_prepared_messages_are_the_ones_kombu_writes(redis_url: str) -> None:
    settings = Settings(database_url="sqlite:///unused.db", broker_url=redis_url)
    app = create_celery(settings)
    messages = RunMessages(app)
    [job] = bulk_insert.recorded(
        [build_new_job(registry, tenant="t", task="demo.echo", payload={"n": 1})],
        [("queued", dt.datetime.now(dt.UTC))],
    )
    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport=TRANSPORT) as conn:
        producer = Producer(conn)
        messages.publish(producer, job, countdown=2.5)
        channel = producer.channel
        assert isinstance(channel, Channel)
        channel.put_many([(job.queue, messages.redis_message(job, countdown=2.5))])
        kombus, ours = (json.loads(item) for item in client.lrange(job.queue, 0, -1))
        # Only what is new for every message differs: its ids, its tag, its due time.
        for written in (kombus, ours):
            written["headers"].pop("eta")
            for key in ("id", "root_id"):
                assert written["headers"].pop(key) == written["properties"]["correlation_id"]
            written["properties"].pop("correlation_id")
            written["properties"].pop("delivery_tag")
        assert ours == kombus
        assert base64.b64decode(ours["body"]) == f'[["{job.id}"], {{}}, '.encode() + (
            b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
        )
        # And a consumer reads it as it reads kombu's.
        received: list[Message] = []
        with Consumer(
            conn,
            [Queue(job.queue)],
            callbacks=[lambda body, message: received.append(message)],
        ):
            while len(received) < 2:
                conn.drain_events(timeout=5)
        assert [m.decode() for m in received] == [m.decode() for m in received[:1]] * 2
        for message in received:
            message.ack()


def test_prepared_messages_are_consumed_in_the_order_given_each_queue(redis_url: str) -> None:
    settings = Settings(database_url="sqlite:///unused.db", broker_url=redis_url)
    messages = RunMessages(create_celery(settings))
    queues = ("order-a", "order-b")
    jobs = bulk_insert.recorded(
        [
            build_new_job(registry, tenant="t", task="demo.echo", payload={"n": n}, priority=None)
            for n in range(7)
        ],
        [("queued", dt.datetime.now(dt.UTC))] * 7,
    )
    given = [(queues[n % 2], messages.redis_message(job)) for n, job in enumerate(jobs)]
    client = redis.Redis.from_url(redis_url)
    client.delete(*queues)
    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        channel.put_many(given)
    for queue in queues:
        # A consumer takes from the list's right end (BRPOP): the first given comes first.
        taken = []
        while (item := client.rpop(queue)) is not None:
            taken.append(item.decode())
        assert taken == [text for q, text in given if q == queue]


def test_the_ack_emulation_is_written_by_the_consumers_own_thread(
    connection: Connection, redis_url: str
) -> None:
    publish(connection, 3)
    channel, got = consuming(connection, prefetch=8)
    while len(got) < 3:
        connection.drain_events(timeout=5)
    client = redis.Redis.from_url(redis_url)
    # No turn of the consumer's loop is needed for the entries to be written...
    wait_until(lambda: unacked(client) == (3, 3), timeout=5, what="the entries written")
    got[0].ack()
    got[1].ack()
    # ...nor for the acks to remove them.
    wait_until(lambda: unacked(client) == (1, 1), timeout=5, what="the acks written")
    writer = channel.qos._writer
    assert writer is not None and writer.is_alive()
    channel.close()
    writer.join(timeout=5)
    assert not writer.is_alive()
    # The one still held went back to its queue on close.
    assert unacked(client) == (0, 0)
    assert [queued_n(item) for item in client.lrange("transport-test", 0, -1)] == [2]
