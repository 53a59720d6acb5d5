"""Path parameters that never swallow the literal name of a sibling route."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor

# Literal segments served next to an id: `/v1/jobs/batch`, `/v1/dead-letters/replay`.
SIBLINGS = ("batch", "replay")


class IdConvertor(Convertor[str]):
    """One path segment, except a sibling route's literal name.

    `GET /v1/jobs/batch` then answers 405 with `Allow: POST` rather than 422 for a
    malformed job id; any other segment still reaches the route, whose parameter type
    answers 422 when it is not a valid id.
    """

    regex = rf"(?!(?:{'|'.join(SIBLINGS)})$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("id", IdConvertor())

JOB_ID = "/{job_id:id}"
