"""Finding the parts of a parsed JSON value the job store cannot keep exactly as sent.

Python's json module reads `1e999` as infinity and accepts the non-standard `NaN`,
`Infinity` and `-Infinity`; JSON cannot hold them, so the store would write `null`.
PostgreSQL's jsonb and text refuse the NUL character, and a lone surrogate (`"\\ud800"`)
has no UTF-8 form at all. Such values are refused where they arrive, naming their place,
rather than altered on the way to the store or failing there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

Path = tuple[str | int, ...]

# Arrays and objects may nest this deep. pydantic stops serializing at about 255 levels
# and a stored value travels inside the API's response models, so this leaves room.
MAX_DEPTH = 128

# Integers of any length are stored exactly, up to Python's limit on converting them to
# text (4,300 digits by default, never under 640); below 2,000 bits (602 digits) no limit
# can apply, so only longer ones are converted to find out.
_LONG_INT_BITS = 2000

ERROR_TYPE = "unstorable_value"
NOT_FINITE = (
    "the number is not finite (NaN, Infinity, -Infinity, or too large, such as 1e999);"
    " JSON cannot hold it"
)
TOO_DEEP = f"arrays and objects may nest at most {MAX_DEPTH} levels deep"
INT_TOO_LONG = "the integer has more digits than can be stored"
KEY_NOT_TEXT = "object keys must be strings"
NUL = "the NUL character (\\u0000)"
SURROGATE = "a lone surrogate such as \\ud800, which has no UTF-8 form"


@dataclass(frozen=True, slots=True)
class Unstorable:
    """A value the job store cannot keep as sent: where it is, and why."""

    path: Path
    reason: str


@dataclass(frozen=True, slots=True)
class _Refused:
    """Stands on the walk's stack for a value already found bad, to keep document order."""

    reason: str


Container = dict[Any, Any] | list[Any] | tuple[Any, ...]


def find_unstorable(value: Any, *, limit: int = 100) -> list[Unstorable]:
    """Up to `limit` places in a parsed JSON value the store cannot keep, in document order."""
    # Objects of other types (a caller's datetime, say) are the payload model's to turn
    # into JSON, and are not looked into.
    if not isinstance(value, dict | list | tuple):
        reason = _scalar_flaw(value)
        return [] if reason is None else [Unstorable((), reason)]
    found: list[Unstorable] = []
    # A stack, not recursion: however deep a value nests, the walk costs no frames. Only
    # containers and what was found bad go on it, since most values are plain scalars.
    stack: list[tuple[Container | _Refused, Path]] = [(value, ())]
    while stack and len(found) < limit:
        item, path = stack.pop()
        if isinstance(item, _Refused):
            found.append(Unstorable(path, item.reason))
        elif len(path) >= MAX_DEPTH:
            found.append(Unstorable(path, TOO_DEEP))
        else:
            stack.extend(reversed(_children(item, path)))
    return found


def require_storable(value: Any, title: str) -> None:
    """Raise pydantic's ValidationError naming every place in `value` the store cannot keep."""
    if found := find_unstorable(value):
        raise unstorable_error(title, found)


def unstorable_error(title: str, found: Sequence[Unstorable]) -> ValidationError:
    """pydantic's ValidationError with one `unstorable_value` error at each place found."""
    return ValidationError.from_exception_data(
        title,
        [
            # Without context pydantic leaves the message as it is, braces and all.
            InitErrorDetails(
                type=PydanticCustomError(ERROR_TYPE, where.reason),
                loc=tuple(_shown(part) for part in where.path),
                input=None,
            )
            for where in found
        ],
    )


def _children(item: Container, path: Path) -> list[tuple[Container | _Refused, Path]]:
    """The containers below `item` and its bad values, in order; good scalars are skipped."""
    # The common case (a plain ASCII string, a finite number) is decided inline by exact
    # type, as this loop runs once for every value of every request.
    is_object = isinstance(item, dict)
    entries: Any = item.items() if isinstance(item, dict) else enumerate(item)
    children: list[tuple[Container | _Refused, Path]] = []
    for key, child in entries:
        if (
            is_object
            and (type(key) is not str or "\x00" in key or not key.isascii())
            and (reason := _key_flaw(key))
        ):
            children.append((_Refused(reason), (*path, _key_name(key))))
            continue
        kind = type(child)
        if kind is dict or kind is list or kind is tuple:
            children.append((child, (*path, key)))
        elif kind is str:
            if ("\x00" in child or not child.isascii()) and (flaw := _text_flaw(child)):
                children.append((_Refused(f"text may not contain {flaw}"), (*path, key)))
        elif kind is float:
            if not math.isfinite(child):
                children.append((_Refused(NOT_FINITE), (*path, key)))
        elif kind is int or kind is bool or child is None:
            if kind is int and child.bit_length() > _LONG_INT_BITS and _too_long(child):
                children.append((_Refused(INT_TOO_LONG), (*path, key)))
        elif isinstance(child, dict | list | tuple):
            children.append((child, (*path, key)))
        elif reason := _scalar_flaw(child):
            children.append((_Refused(reason), (*path, key)))
    return children


def _key_flaw(key: Any) -> str | None:
    if not isinstance(key, str):
        # json.dumps would quietly store 1 as "1" and None as "null".
        return KEY_NOT_TEXT
    flaw = _text_flaw(key)
    return None if flaw is None else f"object keys may not contain {flaw}"


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


def _scalar_flaw(value: Any) -> str | None:
    if isinstance(value, str):
        flaw = _text_flaw(value)
        return None if flaw is None else f"text may not contain {flaw}"
    if isinstance(value, float):
        return None if math.isfinite(value) else NOT_FINITE
    if isinstance(value, int) and _too_long(value):
        return INT_TOO_LONG
    return None


def _shown(part: str | int) -> str | int:
    # pydantic would show a lone surrogate in a key as replacement characters (U+FFFD);
    # its escape, `\udc00`, says which key is meant.
    if isinstance(part, int):
        return part
    return part.encode("utf-8", "backslashreplace").decode("utf-8")


def _text_flaw(text: str) -> str | None:
    if "\x00" in text:
        return NUL
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return SURROGATE
    return None


def _too_long(number: int) -> bool:
    if number.bit_length() <= _LONG_INT_BITS:
        return False
    try:
        str(number)
    except ValueError:
        return True
    return False
