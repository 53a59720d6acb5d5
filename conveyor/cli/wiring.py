"""Building the platform's parts from Settings; the one place that knows them all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery import Celery

from conveyor.cli.errors import CommandError
from conveyor.cli.handover import HandoverPublisher
from conveyor.config import Settings
from conveyor.jobs.pooling import use_transaction_pooler
from conveyor.observability import logs
from conveyor.worker.app import create_celery
from conveyor.worker.broker import bounded_connection, queue_depths
from conveyor.worker.publisher import CeleryPublisher
from conveyor.worker.runtime import StoreHandle

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from conveyor.api.state import ApiState
    from conveyor.jobs.outbox import Publisher


def setup_logging(settings: Settings, service: str = "conveyor") -> None:
    """Structured logs to stderr at the configured level (see observability.logs)."""
    logs.setup(settings.log_level, settings.log_format, service)


@dataclass
class Platform:
    """The store and the Celery app of one process."""

    settings: Settings
    store: StoreHandle
    celery: Celery
    # A command's jobs under the embedded broker go to the running platform to publish.
    handover: HandoverPublisher | None = None

    @property
    def sessions(self) -> sessionmaker[Session]:
        """This process's session factory."""
        return self.store.sessions()

    @property
    def publisher(self) -> Publisher:
        """The publisher of the Celery app (or, for a command, of the embedded platform)."""
        if self.handover is not None:
            return self.handover
        publisher: CeleryPublisher = self.celery.conveyor_publisher
        return publisher

    def broker_check(self) -> None:
        """Raise unless the broker answers within about two seconds.

        A frozen or partitioned broker may still accept TCP connections, so the check
        waits for an answer: opening a channel on RabbitMQ, a PING on Redis.
        """
        with bounded_connection(self.celery) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
            client = getattr(connection.default_channel, "client", None)
            ping = getattr(client, "ping", None)
            if callable(ping):
                ping()

    def api_state(self) -> ApiState:
        """What the API needs from this process."""
        # Imported here: workers and beat build a Platform too, and never serve the API.
        from conveyor.api.state import ApiState

        return ApiState(
            settings=self.settings,
            sessions=self.sessions,
            publisher=self.publisher,
            broker_check=self.broker_check,
            queue_depths=lambda: queue_depths(self.celery),
        )


def build_platform(settings: Settings, *, pool_size: int = 5) -> Platform:
    """The store handle and Celery app for these settings."""
    use_transaction_pooler(settings.database_pooler == "transaction")
    handle = StoreHandle(settings.database_url, pool_size=pool_size)
    return Platform(settings, handle, create_celery(settings, store_handle=handle))


def command_platform(settings: Settings) -> Platform:
    """The platform of a one-shot command that records jobs: under the embedded broker,
    its jobs are handed to the running platform (cli/handover.py)."""
    platform = build_platform(settings)
    if settings.embedded:
        platform.handover = HandoverPublisher(settings.database_url)
    return platform


def engine_for(settings: Settings) -> Engine:
    """A fresh engine on the configured database."""
    from conveyor.jobs.db import make_engine

    use_transaction_pooler(settings.database_pooler == "transaction")
    return make_engine(settings.database_url)


def run_migrations(settings: Settings) -> None:
    """Bring the configured database to the latest schema."""
    # Alembic is loaded by the commands that migrate, not by every process that wires up.
    from conveyor.jobs import migrate

    engine = engine_for(settings)
    try:
        migrate.upgrade(engine)
    except Exception as error:
        raise CommandError(f"cannot migrate {engine.url.render_as_string()}: {error}") from None
    finally:
        engine.dispose()


def sessions_for(settings: Settings) -> sessionmaker[Session]:
    """A session factory on the configured database, for one-shot commands."""
    from conveyor.jobs.db import make_session_factory

    return make_session_factory(engine_for(settings))
