"""Settings and the Celery configuration derived from them."""

from conveyor.config.settings import (
    EMBEDDED_BROKER,
    POOLS,
    Settings,
    SettingsError,
    get_settings,
    load_settings,
)

__all__ = ["EMBEDDED_BROKER", "POOLS", "Settings", "SettingsError", "get_settings", "load_settings"]

from conveyor.config.celery_config import MAINTENANCE_QUEUE, RUN_TASK, celery_config

__all__ += ["MAINTENANCE_QUEUE", "RUN_TASK", "celery_config"]
