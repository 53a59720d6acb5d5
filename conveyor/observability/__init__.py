"""Metrics, structured logs and traces of every Conveyor process."""
