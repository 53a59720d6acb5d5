"""Who is looking at the console: the signed-in key, its scopes, its CSRF token."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from conveyor.api.console.sessions import COOKIE, CSRF_FIELD, Signer, parse_form, tokens_match
from conveyor.api.deps import State
from conveyor.api.state import ApiState
from conveyor.jobs import keys
from conveyor.jobs.keys import ApiKey

# A key revoked is refused by the console within this long.
KEY_SECONDS = 10.0


class SignInRequired(Exception):
    """No valid session: the page answers with a redirect to the sign-in form."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.location = f"/ui/login?next={quote(next_path, safe='/')}"


class CsrfRefused(Exception):
    """A state-changing request without its session's CSRF token: answered 403."""


class NotAllowed(Exception):
    """The key may read but not act: answered 403."""


@dataclass(frozen=True, slots=True)
class Viewer:
    """The signed-in key and what the pages need of it."""

    key: ApiKey
    csrf: str

    @property
    def tenant(self) -> str:
        """The tenant whose jobs the console shows."""
        return self.key.tenant

    @property
    def can_act(self) -> bool:
        """Whether the key may retry, cancel, replay, discard and pause."""
        return "admin" in self.key.scopes


class ConsoleAuth:
    """The console's signer (its secret read once) and a short cache of keys by id."""

    def __init__(self, state: ApiState) -> None:
        self._state = state
        self._signer: Signer | None = None
        self._lock = threading.Lock()
        self._keys: dict[uuid.UUID, tuple[float, ApiKey | None]] = {}

    def signer(self) -> Signer:
        """The signer; the stored secret is read (or made) on first use."""
        with self._lock:
            if self._signer is None:
                settings = self._state.settings
                secret = settings.console_secret
                if secret is None:
                    with self._state.sessions.begin() as session:
                        secret = keys.console_secret(session)
                self._signer = Signer(secret, settings.console_session_seconds)
            return self._signer

    def key(self, key_id: uuid.UUID) -> ApiKey | None:
        """The live key with this id, from a cache of a few seconds."""
        now = time.monotonic()
        cached = self._keys.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        with self._state.sessions() as session:
            found = keys.get_key(session, key_id)
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[key_id] = (now + KEY_SECONDS, found)
        return found

    def sign_in(self, presented: str) -> ApiKey | None:
        """The key a person typed, if it is live and may read."""
        with self._state.sessions() as session:
            found = keys.find_key(session, presented.strip())
        if found is None or not ({"read", "admin"} & found.scopes):
            return None
        return found


def console_auth(request: Request) -> ConsoleAuth:
    """The app's console authority, made on first use."""
    auth: ConsoleAuth | None = getattr(request.app.state, "console_auth", None)
    if auth is None:
        auth = request.app.state.console_auth = ConsoleAuth(request.app.state.conveyor)
    return auth


Auth = Annotated[ConsoleAuth, Depends(console_auth)]


def _viewer(request: Request, auth: ConsoleAuth) -> Viewer:
    signer = auth.signer()
    session = signer.read(request.cookies.get(COOKIE))
    if session is None:
        raise SignInRequired(_here(request))
    key = auth.key(session.key_id)
    if key is None:
        raise SignInRequired(_here(request))
    return Viewer(key, signer.csrf_token(session))


def _here(request: Request) -> str:
    path = request.url.path
    return path + (f"?{request.url.query}" if request.url.query else "")


async def get_viewer(request: Request, auth: Auth, _state: State) -> Viewer:
    """The signed-in viewer; anyone else is sent to the sign-in form."""
    return await run_in_threadpool(_viewer, request, auth)


async def get_actor(request: Request, auth: Auth, _state: State) -> tuple[Viewer, dict[str, str]]:
    """The signed-in admin behind a form, and the form; 403 without the CSRF token."""
    viewer = await run_in_threadpool(_viewer, request, auth)
    form = parse_form(await request.body())
    if not tokens_match(viewer.csrf, form.get(CSRF_FIELD)):
        raise CsrfRefused()
    if not viewer.can_act:
        raise NotAllowed()
    return viewer, form


Reader = Annotated[Viewer, Depends(get_viewer)]
Actor = Annotated[tuple[Viewer, dict[str, str]], Depends(get_actor)]
