"""Long-running services: the API, a worker, beat, Flower, and migrations."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from conveyor.cli.errors import CommandError, fail
from conveyor.cli.wiring import build_platform, run_migrations
from conveyor.config import RUN_TASK, Settings
from conveyor.observability import logs, metrics, tracing
from conveyor.worker import prefork, timecap

log = logs.get(__name__)


def api(settings: Settings) -> None:
    """Serve the HTTP API."""
    # Here and not at the top: a worker, which imports this module too, serves no HTTP.
    import uvicorn

    from conveyor.api.app import create_app

    platform = build_platform(settings, pool_size=20)
    tracing.setup(settings.otlp_endpoint, "conveyor-api")
    uvicorn.run(
        create_app(platform.api_state()),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        # Conveyor's own logging (JSON lines) carries uvicorn's records too.
        log_config=None,
    )


def worker(settings: Settings, queues: list[str], concurrency: int | None) -> None:
    """A Celery worker consuming `queues`, with Celery's own signal handling.

    The worker is built directly, not through Celery's command line: that would load
    click, its REPL and every installed plugin command (Flower's among them), some 11 MB
    that the main process and each pool child forked from it would hold for nothing.
    """
    if settings.embedded:
        fail(
            "a separate worker needs CONVEYOR_BROKER_URL (redis:// or amqp://); "
            "without one, `conveyor up` runs everything in one process"
        )
    platform = build_platform(settings)
    options = worker_options(settings, queues, concurrency)
    cap = options.get("soft_time_limit")
    if cap is not None:
        platform.celery.tasks[RUN_TASK].Request = timecap.capped_request_class(cap)
    tracing.setup(settings.otlp_endpoint, "conveyor-worker")
    serve_metrics(settings)
    for queue in queues:
        metrics.WORKER_CONSUMING.labels(queue).set(1)
    if settings.worker_pool_class == "prefork":
        prefork.freeze_heap_before_fork()
    celery_worker = platform.celery.Worker(**options)
    celery_worker.start()
    if celery_worker.exitcode:
        raise SystemExit(celery_worker.exitcode)


def worker_options(
    settings: Settings, queues: list[str], concurrency: int | None
) -> dict[str, Any]:
    """The keyword arguments of Celery's worker, as `celery worker` would build them."""
    from celery import concurrency as pools
    from celery.utils.log import mlevel
    from celery.utils.nodenames import default_nodename, host_format

    name = "-".join(queues)
    # Several queues share one worker: the first one's pool settings apply.
    pool = queues[0]
    processes = concurrency or settings.pool_concurrency(pool)
    options: dict[str, Any] = {
        "queues": list(queues),
        "concurrency": processes,
        "prefetch_multiplier": settings.pool_prefetch(pool),
        "pool_cls": pools.get_implementation(settings.worker_pool_class),
        # Unique per process: two workers of one pool on a host must not share a node name.
        "hostname": host_format(default_nodename(f"{name}-{os.getpid()}@%h")),
        "loglevel": mlevel(settings.log_level.upper()),
        "without_mingle": True,
        "without_gossip": True,
    }
    autoscale_min = settings.pool_autoscale_min(pool)
    if autoscale_min is not None:
        # Between min and max processes; a --concurrency below the minimum becomes it.
        options["autoscale"] = (processes, min(autoscale_min, processes))
    cap = settings.pool_time_limit(pool)
    if cap is not None:
        # Tasks without limits of their own take the worker's; job messages carry theirs.
        options["soft_time_limit"] = cap
        options["time_limit"] = cap + timecap.HARD_LIMIT_GRACE_SECONDS
    return options


def beat(settings: Settings) -> None:
    """The scheduler: the relay and, later, periodic work and user schedules."""
    if settings.embedded:
        fail("a separate beat needs CONVEYOR_BROKER_URL; `conveyor up` runs it embedded")
    platform = build_platform(settings)
    tracing.setup(settings.otlp_endpoint, "conveyor-beat")
    serve_metrics(settings)
    metrics.BEAT_LEADER.set(0)
    platform.celery.Beat(loglevel=settings.log_level, max_interval=1).run()


def serve_metrics(settings: Settings) -> None:
    """This process's Prometheus port; a port in use costs the metrics, not the process."""
    try:
        metrics.serve(settings.metrics_port, settings.metrics_host)
    except OSError as error:
        log.warning(
            "metrics port %s:%s unavailable (%s); set CONVEYOR_METRICS_PORT to another "
            "port, or 0 for none",
            settings.metrics_host,
            settings.metrics_port,
            error.strerror,
        )


def flower(settings: Settings) -> None:
    """Flower on the same broker; refuses to start without both credentials."""
    if not settings.flower_user or not settings.flower_password:
        fail(
            "Flower needs CONVEYOR_FLOWER_USER and CONVEYOR_FLOWER_PASSWORD; "
            "it never runs without authentication"
        )
    if settings.embedded:
        fail("Flower needs CONVEYOR_BROKER_URL; it cannot see an in-process broker")
    if ":" in settings.flower_user:
        fail("invalid setting CONVEYOR_FLOWER_USER: must not contain ':'")
    platform = build_platform(settings)
    _pin_flower_auth(settings.flower_user, settings.flower_password)
    platform.celery.start(
        [
            "flower",
            f"--port={settings.flower_port}",
            f"--address={settings.api_host}",
            # No flowerconfig.py from the working directory: it could replace the auth.
            f"--conf={os.devnull}",
            # Tornado keeps its hands off logging, so CONVEYOR_LOG_LEVEL holds here too.
            "--logging=none",
        ]
    )


def _pin_flower_auth(user: str, password: str) -> None:
    """Give Flower exactly one credential, set in this process and never in argv.

    Flower splits FLOWER_BASIC_AUTH at commas, so a password holding one would turn its
    pieces into credentials of their own; an inherited value would replace ours.
    """
    import flower.options  # noqa: F401  (declares Flower's options, basic_auth among them)
    from tornado.options import options

    for name in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API"):
        os.environ.pop(name, None)
    options.basic_auth = [f"{user}:{password}"]


def migrate(settings: Settings) -> None:
    """Apply every pending migration."""
    try:
        run_migrations(settings)
    except CommandError:
        raise
    print(f"migrated {urlsplit(settings.database_url).scheme} database to the latest schema")
