"""Errors as RFC 9457 problem details, on every error path."""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from conveyor.tasks.json_values import ERROR_TYPE as UNSTORABLE

PROBLEM_JSON = "application/problem+json"

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):
    """An error the API answers with a problem+json body."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug or TITLES.get(status, "error").lower().replace(" ", "-")
        self.errors = errors
        self.headers = headers


def problem_response(problem: Problem) -> JSONResponse:
    """The JSON response for a problem."""
    body: dict[str, Any] = {
        "type": f"/problems/{problem.slug}",
        "title": TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "detail": problem.detail,
    }
    if problem.errors is not None:
        body["errors"] = problem.errors
    return JSONResponse(
        body, status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers
    )


def validation_errors(raw: Any, prefix: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic's errors as `[{loc, msg}]`."""
    return [
        {"loc": [*prefix, *error.get("loc", ())], "msg": str(error.get("msg", "invalid"))}
        for error in raw
    ]


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """Every method served at the request's path, not only by the first route matching it."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    )


def install(app: FastAPI) -> None:
    """Route every error the app can raise through problem+json."""

    async def on_problem(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, Problem)
        return problem_response(error)

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        detail = error.detail if isinstance(error.detail, str) else TITLES.get(error.status_code)
        headers = dict(error.headers or {})
        if error.status_code == 405 and (allowed := allowed_methods(request)):
            headers["Allow"] = allowed
        return problem_response(Problem(error.status_code, str(detail), headers=headers))

    async def on_validation(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        raw = error.errors()
        errors = validation_errors(raw)
        malformed = any(e.get("type") == "json_invalid" for e in raw)
        unstorable = bool(raw) and all(e.get("type") == UNSTORABLE for e in raw)
        if malformed:
            detail, slug = "the body is not valid JSON", "malformed-json"
        elif unstorable:
            detail = "the request holds a value the job store cannot keep exactly as sent"
            slug = "unstorable-value"
        else:
            detail, slug = "the request is invalid", "validation-error"
        return problem_response(Problem(422, detail, slug=slug, errors=errors))

    async def on_store_down(_request: Request, _error: Exception) -> JSONResponse:
        return problem_response(
            Problem(
                503,
                "the job store is unavailable; try again shortly",
                slug="store-unavailable",
                headers={"Retry-After": "1"},
            )
        )

    async def on_unstorable(_request: Request, _error: Exception) -> JSONResponse:
        # The database refused a value from the request, e.g. text holding a NUL character.
        return problem_response(
            Problem(
                422,
                "the request holds a value the job store cannot keep, such as a NUL character",
                slug="unstorable-value",
            )
        )

    async def on_crash(_request: Request, _error: Exception) -> JSONResponse:
        return problem_response(Problem(500, "an unexpected error occurred"))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(OperationalError, on_store_down)
    app.add_exception_handler(InterfaceError, on_store_down)
    # The same, raised by the plain psycopg connection that records single submissions.
    app.add_exception_handler(psycopg.OperationalError, on_store_down)
    app.add_exception_handler(psycopg.InterfaceError, on_store_down)
    app.add_exception_handler(DataError, on_unstorable)
    app.add_exception_handler(psycopg.DataError, on_unstorable)
    app.add_exception_handler(Exception, on_crash)
