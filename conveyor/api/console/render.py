"""The console's templates, their filters, and the headers every page carries."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from conveyor.api.console.drawing import STATE_COLOURS
from conveyor.api.console.sessions import CSRF_FIELD
from conveyor.jobs.states import JobState

# Shown for a value that is not there.
NONE = "\u2013"

# Scripts and styles only from this origin; no frames; nothing cached.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def when(at: dt.datetime | None) -> str:
    """A time in UTC to the second."""
    return "" if at is None else at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds(value: float | None) -> str:
    """A duration as people read it: ms below a second, then s, min, h."""
    if value is None:
        return NONE
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def ago(at: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """How long before now a time was."""
    if at is None:
        return ""
    delta = ((now or dt.datetime.now(dt.UTC)) - at).total_seconds()
    return f"in {seconds(-delta)}" if delta < 0 else f"{seconds(delta)} ago"


def pretty(value: Any) -> str:
    """JSON indented for reading."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def percent(value: float | None) -> str:
    """A share as a percentage."""
    return NONE if value is None else f"{value * 100:.1f} %"


_env = Environment(
    loader=PackageLoader("conveyor.api.console", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(when=when, ago=ago, pretty=pretty, seconds=seconds, percent=percent)
_env.globals.update(
    csrf_field=CSRF_FIELD,
    job_states=[s.value for s in JobState],
    state_colours=STATE_COLOURS,
)


def page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A rendered page with the console's headers."""
    html = _env.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers=HEADERS)
