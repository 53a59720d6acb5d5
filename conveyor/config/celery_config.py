"""The Celery configuration derived from Settings: JSON only, one queue per pool."""

from __future__ import annotations

from typing import Any

from kombu.entity import Exchange, Queue

from conveyor.config.settings import POOLS, Settings

RUN_TASK = "conveyor.run"
# A schedule whose task is this fires a workflow: its payload is POST /v1/workflows' body.
WORKFLOW_TASK = "conveyor.workflow"
DEAD_LETTER_EXCHANGE = "conveyor.dlx"
DEAD_LETTER_QUEUE = "conveyor.dead-letters"


def is_amqp(broker_url: str) -> bool:
    """Whether the broker is RabbitMQ."""
    return broker_url.startswith(("amqp://", "amqps://"))


def pool_queues(settings: Settings) -> list[Queue]:
    """One durable queue per pool; on RabbitMQ, replicated and with a dead-letter exchange."""
    exchange = Exchange("conveyor", type="direct")
    if not is_amqp(settings.broker_url):
        return [Queue(name, exchange, routing_key=name) for name in POOLS]
    arguments = {
        # Quorum queues are replicated and count deliveries, so a poison message ends.
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.rabbitmq_delivery_limit,
        # What RabbitMQ rejects or drops outside our code lands where we record it.
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }
    return [
        Queue(name, exchange, routing_key=name, queue_arguments=dict(arguments)) for name in POOLS
    ]


def dead_letter_queue() -> Queue:
    """The RabbitMQ queue collecting messages the broker dead-lettered."""
    return Queue(
        DEAD_LETTER_QUEUE,
        Exchange(DEAD_LETTER_EXCHANGE, type="fanout"),
        routing_key="#",
        queue_arguments={"x-queue-type": "quorum"},
    )


MAINTENANCE_QUEUE = "high"

# How long the API and the relay wait on any one reply from the broker. A frozen broker or
# a partition closes no socket, so without a bound a publish or a probe waits forever.
BROKER_CALL_TIMEOUT_SECONDS = 1.0


def bounded_transport_options(
    broker_url: str, timeout: float = BROKER_CALL_TIMEOUT_SECONDS
) -> dict[str, Any]:
    """Transport options, on top of the shared ones, for publishing and probing connections.

    Every socket wait gives up after `timeout`. Not for the workers' consumers: there a
    slow reply would count as a lost connection, and losing it cancels running jobs.
    """
    if broker_url.startswith(("redis://", "rediss://")):
        # redis-py's own timeouts, per read and per connect (kombu passes them through).
        return {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if is_amqp(broker_url):
        # py-amqp sets these as SO_RCVTIMEO/SO_SNDTIMEO; a publisher confirm waits as long.
        return {"read_timeout": timeout, "write_timeout": timeout}
    return {}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for a Conveyor app; every choice carries its reason."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        # Pickle on the wire is remote code execution: JSON only, both ways.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Job state lives in the database, never in a result backend.
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_queues": pool_queues(settings),
        "task_default_queue": "default",
        "task_default_exchange": "conveyor",
        "task_default_routing_key": "default",
        "task_create_missing_queues": False,
        # Acknowledge after the run so a killed worker's message comes back.
        "task_acks_late": True,
        # A pool child killed mid-run must not ack its message as failed.
        "task_reject_on_worker_lost": True,
        # Short jobs must not wait behind long ones held in a prefetch buffer.
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "worker_send_task_events": settings.task_events,
        # A task still running after its connection dropped would run twice.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        # Workers keep trying to reach a restarted broker instead of giving up.
        "broker_connection_max_retries": None,
        "broker_connection_timeout": 2.0,
        # A publish that cannot reach the broker fails fast; the outbox relay retries it.
        "task_publish_retry_policy": {
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        # Warm shutdown gives running jobs this long, then hands the rest back. Not for
        # the embedded workers: with it set, a worker run in a thread never consumes.
        "worker_soft_shutdown_timeout": 0.0
        if settings.embedded
        else settings.shutdown_grace_seconds,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
    }
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # An unacknowledged message comes back after this; a claim drops it if its job
        # is still running under a live lease, so a short timeout only speeds recovery.
        config["broker_transport_options"] = {
            "visibility_timeout": settings.redis_visibility_timeout,
        }
        # kombu's transport, minus a new redis-py client for every publish and ack.
        config["broker_transport"] = "conveyor.worker.redis_transport:Transport"
    elif settings.broker_url.startswith(("amqp://", "amqps://")):
        # A publish counts only once the broker has confirmed it.
        config["broker_transport_options"] = {"confirm_publish": True}
        # Quorum queues have no global QoS; Celery detects them and uses per-consumer QoS.
        config["worker_detect_quorum_queues"] = True
    else:
        # The in-process broker is polled; a short interval keeps latency low.
        config["broker_transport_options"] = {"polling_interval": 0.01}
        config["result_backend"] = "cache+memory://"
    return config
