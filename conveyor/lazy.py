"""Modules loaded on first use, and database errors told apart without loading SQLAlchemy.

A worker's pool children fork from its main process and hold everything it imported
before the fork. SQLAlchemy (some 20 MB a process) serves the store's slower paths only:
a job claimed and finished on the fast path never touches it. The modules of the worker's
path name the store through `module`, so it is imported the first time it is used: in the
main process once its pool has started, and in a child only if one of its jobs fails,
retries or is stopped.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeGuard

import psycopg

if TYPE_CHECKING:
    from sqlalchemy.exc import SQLAlchemyError


class LazyModule:
    """Stands for a module and imports it when one of its attributes is first read."""

    __slots__ = ("_module", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        module = self._module
        if module is None:
            # The import system's own locks make a first use from two threads safe.
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attribute)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r}, {state}>"


def module(name: str) -> Any:
    """A stand-in for the module `name` that imports it on first use."""
    return LazyModule(name)


def transient_db_errors() -> tuple[type[BaseException], ...]:
    """Errors of a database that is briefly away (restart, failover, dropped connection).

    SQLAlchemy's own are among them once it is loaded; before that, nothing can raise them.
    Used as `except transient_db_errors():`, which is evaluated only when an error arrives.
    """
    errors: tuple[type[BaseException], ...] = (psycopg.OperationalError,)
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is not None:
        errors += (exc.OperationalError, exc.InterfaceError)
    return errors


def is_sqlalchemy_error(error: BaseException) -> TypeGuard[SQLAlchemyError]:
    """Whether `error` is one of SQLAlchemy's (false when SQLAlchemy was never loaded)."""
    exc = sys.modules.get("sqlalchemy.exc")
    return exc is not None and isinstance(error, exc.SQLAlchemyError)
