"""A job's `conveyor.run` message, written in Celery's task protocol (version 2) directly.

Celery's `send_task` routes, reprs the arguments, fires signals and wraps every publish
in a retrying `ensure` call: several times the cost of the publish itself. Every
Conveyor message is the same task with one argument, so its headers are filled in here
and handed to kombu as they are; the worker cannot tell them from `send_task`'s. A
failed publish is not retried message by message: the publisher's caller leaves the job
to the relay, and the publisher retries a whole call once on a fresh connection.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu.messaging import Producer

from conveyor import ids
from conveyor.config import RUN_TASK
from conveyor.jobs.models import Job
from conveyor.observability import tracing

# The time limit Celery enforces past a job's own (soft) one.
HARD_LIMIT_GRACE_SECONDS = 10.0
# Protocol 2's third body element: no callbacks, errbacks, chain or chord.
_EMBED: dict[str, None] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# The body `[[job_id], {}, _EMBED]` as kombu's JSON serializer writes it, built as text:
# only the id differs between two messages, so nothing is serialized per message.
_BODY_TAIL = ", {}, " + json.dumps(_EMBED) + "]"
_PERSISTENT = 2
# Every message's properties between its correlation id and its routing key.
_REDIS_PROPERTIES = '"reply_to": "", "delivery_mode": 2, "delivery_info": {"exchange": "", '


def message_headers(job: Job) -> dict[str, str]:
    """Headers of a job's message: what it is, and the trace and request it belongs to."""
    headers = {"conveyor_task": job.task, "conveyor_tenant": job.tenant}
    # Inside the publish span: the run becomes its child. Else the job's own trace.
    traceparent = tracing.current_traceparent() if tracing.enabled() else None
    traceparent = traceparent or job.traceparent
    if traceparent:
        headers["traceparent"] = traceparent
    if job.request_id:
        headers["conveyor_request_id"] = job.request_id
    return headers


# Header names, task types, tenants and queues are few: their JSON is remembered.
_quoted = functools.lru_cache(maxsize=4096)(json.dumps)
_FEW = frozenset({"conveyor_task", "conveyor_tenant"})


def _eta(countdown: float | None) -> str | None:
    """When a message held for `countdown` seconds is due, as Celery writes it."""
    if not countdown:
        return None
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=countdown)).isoformat()


def _body(job: Job) -> str:
    """The message body, `[[job_id], {}, _EMBED]`, as kombu's JSON serializer writes it."""
    return f'[["{job.id}"]{_BODY_TAIL}'


class RunMessages:
    """Publishes `conveyor.run` messages on a kombu producer, one per job."""

    def __init__(self, app: Celery) -> None:
        self._origin = anon_nodename()
        self._ignore_result = bool(app.conf.task_ignore_result)
        self._origin_json = json.dumps(self._origin)
        self._ignore_result_json = json.dumps(self._ignore_result)
        self._queues = app.amqp.queues

    def declare(self, producer: Producer, queue: str) -> None:
        """Make sure the queue exists (once per connection: kombu remembers)."""
        entity = self._queues.get(queue)
        if entity is not None:
            producer.maybe_declare(entity)

    def _headers(self, job: Job, countdown: float | None) -> tuple[str, dict[str, Any]]:
        """The message's task id and its protocol-2 headers."""
        task_id = ids.uuid4_text()
        job_id = str(job.id)
        headers: dict[str, Any] = {
            "lang": "py",
            "task": RUN_TASK,
            "id": task_id,
            "shadow": None,
            "eta": _eta(countdown),
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [job.timeout_seconds + HARD_LIMIT_GRACE_SECONDS, job.timeout_seconds],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr([job_id]),
            "kwargsrepr": "{}",
            "origin": self._origin,
            "ignore_result": self._ignore_result,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        headers.update(message_headers(job))
        return task_id, headers

    def publish(self, producer: Producer, job: Job, countdown: float | None = None) -> None:
        """Write the job's message; with a countdown, the worker holds it until then."""
        task_id, headers = self._headers(job, countdown)
        producer.publish(
            _body(job),
            exchange="",
            routing_key=job.queue,
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
            correlation_id=task_id,
            reply_to="",
            delivery_mode=_PERSISTENT,
            retry=False,
        )

    def redis_message(self, job: Job, countdown: float | None = None) -> str:
        """The job's message as kombu's Redis transport stores it in the queue's list.

        The JSON text `publish` makes kombu write (its envelope: the body in base64, the
        delivery properties, a delivery tag of its own), written directly: a batch's
        thousand messages differ only in a few values, so only those are encoded. The
        headers are `_headers`' in their order (a test compares the two forms).
        """
        task_id = ids.uuid4_text()
        limit = job.timeout_seconds
        eta = _eta(countdown)
        job_id = str(job.id)
        body = base64.b64encode(f'[["{job_id}"]{_BODY_TAIL}'.encode()).decode()
        extra = "".join(
            f", {_quoted(name)}: {_quoted(value) if name in _FEW else json.dumps(value)}"
            for name, value in message_headers(job).items()
        )
        # A job id is hex digits and dashes: its repr and JSON need no escaping. Numbers
        # are written as json.dumps writes them (repr, for the finite values a job has).
        return (
            f'{{"body": "{body}", "content-encoding": "utf-8", '
            f'"content-type": "application/json", "headers": {{"lang": "py", '
            f'"task": "{RUN_TASK}", "id": "{task_id}", "shadow": null, '
            f'"eta": {"null" if eta is None else json.dumps(eta)}, "expires": null, "group": null, '
            f'"group_index": null, "retries": 0, '
            f'"timelimit": [{limit + HARD_LIMIT_GRACE_SECONDS!r}, {limit!r}], '
            f'"root_id": "{task_id}", "parent_id": null, "argsrepr": "[\'{job_id}\']", '
            f'"kwargsrepr": "{{}}", "origin": {self._origin_json}, '
            f'"ignore_result": {self._ignore_result_json}, "replaced_task_nesting": 0, '
            f'"stamped_headers": null, "stamps": {{}}{extra}}}, '
            f'"properties": {{"correlation_id": "{task_id}", {_REDIS_PROPERTIES}'
            f'"routing_key": {_quoted(job.queue)}}}, "priority": 0, '
            f'"body_encoding": "base64", "delivery_tag": "{ids.uuid4_text()}"}}}}'
        )
