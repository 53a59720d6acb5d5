"""The one place Conveyor's settings are declared and validated."""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EMBEDDED_BROKER = "memory://"
POOLS = ("high", "default", "low")
Pool = Literal["high", "default", "low"]


class TaskLimits(BaseModel):
    """Flow control for one task type.

    `key` names what per-key limits count by: `payload.<field>` or `tag:<prefix>` (the
    first tag starting with the prefix).
    """

    model_config = ConfigDict(extra="forbid")
    rate: float | None = Field(None, gt=0, description="starts per second, all workers")
    key: str | None = Field(None, pattern=r"^(payload\.[A-Za-z0-9_]+|tag:.+)$")
    key_rate: float | None = Field(None, gt=0, description="starts per second per key")
    concurrency: int | None = Field(None, ge=1, description="running at once per key")

    @model_validator(mode="after")
    def _key_when_needed(self) -> TaskLimits:
        if (self.key_rate or self.concurrency) and self.key is None:
            raise ValueError("key_rate and concurrency need a key")
        return self


class SettingsError(Exception):
    """A setting is invalid; the message is one line naming the variable."""


class Settings(BaseSettings):
    """Every setting Conveyor reads, from `CONVEYOR_*` variables or `.env`."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", env_file=".env", extra="ignore", frozen=True
    )

    database_url: str = "sqlite:///./var/conveyor.db"
    # A streaming replica of the PostgreSQL job store for what only reads.
    database_read_url: str | None = None
    # `transaction`: the database URL is a pooler in transaction mode (PgBouncer's
    # pool_mode = transaction): no prepared statements, no session settings but the
    # time zone (which PgBouncer carries from server to server).
    database_pooler: Literal["none", "transaction"] = "none"
    broker_url: str = EMBEDDED_BROKER
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_user: str | None = None
    flower_password: str | None = None

    # Operator console: the key that signs its session cookies (unset: one made once and
    # kept in the job store, shared by every API process) and how long a session lasts.
    console_secret: str | None = Field(default=None, min_length=32)
    console_session_seconds: float = Field(default=8 * 3600, ge=60, le=30 * 86400)
    # Flower's address as an operator's browser reaches it; the console links each job
    # to its Celery task there.
    flower_url: str | None = None
    # Workers send Celery's task events (for Flower) from the start; Flower turns them on
    # in every worker when it connects anyway.
    task_events: bool = False

    # API limits.
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    # Requests per second per API key (0: no limit), with bursts up to the burst size.
    api_rate_per_second: float = Field(default=200.0, ge=0)
    api_rate_burst: int = Field(default=400, ge=1)

    # Execution.
    # A run renews its lease every heartbeat; rescue takes jobs whose lease expired,
    # so a lost worker's jobs run again within lease + rescue interval seconds.
    lease_seconds: float = Field(default=15.0, ge=2)
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    rescue_interval_seconds: float = Field(default=5.0, gt=0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    # Redis hands an unacknowledged message to another consumer after this long; our
    # claims make that safe, and it bounds how long a killed worker's prefetched jobs wait.
    redis_visibility_timeout: int = Field(default=60, ge=10)
    rabbitmq_delivery_limit: int = Field(default=20, ge=1)
    retry_base_seconds: float = Field(default=1.0, gt=0)
    retry_cap_seconds: float = Field(default=300.0, gt=0)
    default_max_attempts: int = Field(default=3, ge=1, le=100)
    default_timeout_seconds: float = Field(default=300.0, gt=0)
    relay_interval_seconds: float = Field(default=1.0, gt=0)
    relay_grace_seconds: float = Field(default=10.0, ge=0)
    # `conveyor up` prints a line of the platform's health this often.
    health_log_seconds: float = Field(default=60.0, gt=0)

    # Stats rollups and retention (the conveyor.aggregate and conveyor.cleanup tasks).
    aggregate_interval_seconds: float = Field(default=15.0, gt=0)
    cleanup_interval_seconds: float = Field(default=300.0, gt=0)
    # Idempotency keys live on job rows and go with them: at least a day is kept, so a
    # client retrying a request within 24 hours gets the same job back.
    retention_finished_days: float = Field(default=7, ge=1)
    retention_dead_days: float = Field(default=30, ge=1)
    retention_rollup_days: float = Field(default=90, ge=1)

    # Worker pools: concurrency and prefetch of each.
    high_concurrency: int = Field(default=2, ge=1, le=512)
    default_concurrency: int = Field(default=2, ge=1, le=512)
    low_concurrency: int = Field(default=1, ge=1, le=512)
    # All pools' prefetch when set explicitly and a pool's own is not (see pool_prefetch).
    prefetch_multiplier: int = Field(default=4, ge=1, le=1000)
    worker_pool_class: Literal["prefork", "threads", "solo"] = "prefork"
    # Messages a worker process reserves ahead. high takes one at a time: a job held in a
    # busy process's buffer would wait behind it (head-of-line blocking) while another
    # process sits idle. default favours throughput: fewer broker round trips per job.
    # low keeps one so a long job holds back no more than itself.
    high_prefetch: int = Field(default=1, ge=1, le=1000)
    default_prefetch: int = Field(default=4, ge=1, le=1000)
    low_prefetch: int = Field(default=1, ge=1, le=1000)
    # None: a fixed pool of <pool>_concurrency processes. Set: Celery's autoscaler grows
    # and shrinks the prefork pool between this many and <pool>_concurrency by load.
    high_autoscale_min: int | None = Field(default=None, ge=0, le=512)
    default_autoscale_min: int | None = Field(default=None, ge=0, le=512)
    low_autoscale_min: int | None = Field(default=None, ge=0, le=512)
    # A cap on how long any one run in the pool may take, whatever its job's own timeout.
    high_time_limit_seconds: float | None = Field(default=None, gt=0)
    default_time_limit_seconds: float | None = Field(default=None, gt=0)
    low_time_limit_seconds: float | None = Field(default=None, gt=0)

    # Beat: one leader at a time holds a lease; a standby takes over when it lapses.
    beat_lease_seconds: float = Field(default=8.0, ge=2)
    # Ticks later than this were missed while no beat ran: the misfire policy decides.
    misfire_grace_seconds: float = Field(default=30.0, ge=1)

    # Flow control per task type, as JSON: {"task": {"rate": 20, "key": "payload.customer",
    # "key_rate": 5, "concurrency": 1}}. Rate limits live in Redis (this URL, else a Redis
    # broker's) or, with neither, in the job store.
    limits: dict[str, TaskLimits] = Field(default_factory=dict)
    limiter_url: str | None = None
    # A worker takes a rate-limit slot at most this far ahead and waits for it in place;
    # when every slot that near is taken, the job is deferred until one frees up.
    rate_horizon_seconds: float = Field(default=1.0, gt=0, le=60)

    # webhook.deliver reaches public addresses only; these networks (comma-separated CIDRs,
    # e.g. 10.20.0.0/16 for receivers on the private network) are let through as well.
    # Read as text, not JSON, so a plain list of networks is the whole syntax.
    webhook_allowed_networks: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = ()

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # auto: JSON lines, or readable lines when stderr is a terminal.
    log_format: Literal["auto", "json", "console"] = "auto"
    # Prometheus port of a worker or beat process (the API serves /metrics on its own
    # port). `conveyor up` gives its processes this port and the ones after it. 0: none.
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # OTLP over HTTP, e.g. http://127.0.0.1:4318: traces are exported there. Unset: no
    # spans are recorded (trace ids from callers still reach the logs).
    otlp_endpoint: str | None = None

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        if value.startswith("postgresql://"):
            # psycopg 3 is the only PostgreSQL driver installed.
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @field_validator("database_read_url")
    @classmethod
    def _check_database_read_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith("postgresql"):
            raise ValueError("must be a postgresql:// URL (a replica of the job store)")
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "amqp://", "amqps://", "memory://")):
            raise ValueError("must be a redis://, amqp:// or memory:// URL")
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _check_otlp_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return value.rstrip("/") if value else None

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple):
            return value
        return tuple(_network(str(item).strip()) for item in value if str(item).strip())

    @field_validator("high_autoscale_min", "default_autoscale_min", "low_autoscale_min")
    @classmethod
    def _check_autoscale_min(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        pool = str(info.field_name).removesuffix("_autoscale_min")
        concurrency = info.data.get(f"{pool}_concurrency")
        if concurrency is not None and value > concurrency:
            raise ValueError(f"must be at most CONVEYOR_{pool.upper()}_CONCURRENCY ({concurrency})")
        if info.data.get("worker_pool_class", "prefork") != "prefork":
            raise ValueError("autoscaling needs CONVEYOR_WORKER_POOL_CLASS=prefork")
        return value

    @property
    def embedded(self) -> bool:
        """True when the broker lives inside this process."""
        return self.broker_url.startswith("memory://")

    @property
    def is_sqlite(self) -> bool:
        """True when the job store is a SQLite file."""
        return self.database_url.startswith("sqlite")

    def pool_concurrency(self, pool: str) -> int:
        """How many jobs a pool runs at once."""
        return {
            "high": self.high_concurrency,
            "default": self.default_concurrency,
            "low": self.low_concurrency,
        }[pool]

    def pool_prefetch(self, pool: str) -> int:
        """A pool's prefetch multiplier.

        The pool's own setting when given; else CONVEYOR_PREFETCH_MULTIPLIER when given
        (it used to apply to every pool and still does); else the pool's default.
        """
        own = f"{pool}_prefetch"
        if own not in self.model_fields_set and "prefetch_multiplier" in self.model_fields_set:
            return self.prefetch_multiplier
        value: int = getattr(self, own)
        return value

    def pool_autoscale_min(self, pool: str) -> int | None:
        """The fewest processes a pool's autoscaler keeps; None for a fixed-size pool."""
        value: int | None = getattr(self, f"{pool}_autoscale_min")
        return value

    def pool_time_limit(self, pool: str) -> float | None:
        """The longest any run in the pool may take, in seconds; None for no cap."""
        value: float | None = getattr(self, f"{pool}_time_limit_seconds")
        return value


def _network(text: str) -> IPv4Network | IPv6Network:
    try:
        return ip_network(text)
    except ValueError:
        pass
    try:
        # A typo like 10.0.0.1/8 would allow more or less than meant: say what it means.
        meant = ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a network in CIDR notation, such as 10.0.0.0/8"
        ) from None
    raise ValueError(f"{text!r} has host bits set; the network is {meant}")


def describe_error(error: ValidationError) -> str:
    """One line naming the first invalid variable and what is wrong with it."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "settings"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"invalid setting CONVEYOR_{field.upper()}: {message}"


def load_settings() -> Settings:
    """Read the settings, raising SettingsError with one line when one is invalid."""
    try:
        return Settings()
    except ValidationError as error:
        raise SettingsError(describe_error(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
