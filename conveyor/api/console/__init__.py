"""The operator console at /ui/: server-rendered pages over the durable record."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from conveyor.api.console import actions, pages
from conveyor.api.console.auth import CsrfRefused, NotAllowed, SignInRequired
from conveyor.api.console.render import page
from conveyor.api.console.sessions import FormError
from conveyor.api.problems import Problem

STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}


def _static_files() -> dict[str, bytes]:
    folder = resources.files("conveyor.api.console") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC}


def install(app: FastAPI) -> None:
    """Mount the console's pages, forms and files on the API's app."""
    files = _static_files()

    async def static(name: str) -> Response:
        if name not in files:
            return Response(status_code=404)
        return Response(
            files[name],
            media_type=STATIC[name],
            headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    app.add_api_route("/ui/static/{name}", static, methods=["GET"], include_in_schema=False)

    async def sign_in(request: Request, error: Exception) -> Response:
        assert isinstance(error, SignInRequired)
        return RedirectResponse(error.location, status_code=303)

    async def csrf(request: Request, error: Exception) -> Response:
        refused = Problem(403, "this form is missing its CSRF token, or it is stale; reload")
        return page("error.html", status=403, viewer=None, problem=refused)

    async def not_allowed(request: Request, error: Exception) -> Response:
        refused = Problem(403, "this key may read but not act; sign in with an admin key")
        return page("error.html", status=403, viewer=None, problem=refused)

    async def bad_form(request: Request, error: Exception) -> Response:
        return page("error.html", status=400, viewer=None, problem=Problem(400, str(error)))

    app.add_exception_handler(SignInRequired, sign_in)
    app.add_exception_handler(CsrfRefused, csrf)
    app.add_exception_handler(NotAllowed, not_allowed)
    app.add_exception_handler(FormError, bad_form)
    app.include_router(actions.router)
    app.include_router(pages.router)
