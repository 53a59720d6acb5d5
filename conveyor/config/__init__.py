"""Settings and the Celery configuration derived from them."""

from conveyor.config.celery_config import (
    RUN_TASK,
    WORKFLOW_TASK,
    celery_config,
    dead_letter_queue,
    is_amqp,
)
from conveyor.config.settings import (
    EMBEDDED_BROKER,
    POOLS,
    Settings,
    SettingsError,
    TaskLimits,
    get_settings,
    load_settings,
)

__all__ = [
    "EMBEDDED_BROKER",
    "POOLS",
    "RUN_TASK",
    "WORKFLOW_TASK",
    "Settings",
    "SettingsError",
    "TaskLimits",
    "celery_config",
    "dead_letter_queue",
    "get_settings",
    "is_amqp",
    "load_settings",
]
