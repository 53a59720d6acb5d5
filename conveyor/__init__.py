"""Conveyor: background jobs on Celery with the database as the record of truth."""

__version__ = "0.1.0"
