"""Console sessions: a signed cookie naming the key that signed in, and its CSRF token.

The cookie holds the key's id, an expiry and a random nonce, signed with HMAC-SHA256; it
never holds the key. Each request checks the signature and the expiry, then reads the key
again (cached for seconds), so a revoked key ends its sessions. The CSRF token is an HMAC
of the session's nonce: a form posted without the token of its own session is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs

COOKIE = "conveyor_session"
# Before sign-in there is no session; the login form's token is tied to this cookie.
LOGIN_COOKIE = "conveyor_login"
LOGIN_SECONDS = 3600
CSRF_FIELD = "csrf_token"
MAX_FORM_BYTES = 64 * 1024


class FormError(ValueError):
    """A form body this console did not send."""


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    """Who signed in, until when, and the nonce the CSRF token derives from."""

    key_id: uuid.UUID
    expires_at: float
    nonce: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and checks the console's cookies and tokens with one secret."""

    def __init__(self, secret: str, session_seconds: float) -> None:
        self._secret = hashlib.sha256(b"conveyor-console\0" + secret.encode()).digest()
        self.session_seconds = session_seconds

    def _mac(self, purpose: str, text: str) -> str:
        message = f"{purpose}\0{text}".encode()
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest())

    def issue(self, key_id: uuid.UUID, now: float | None = None) -> tuple[str, ConsoleSession]:
        """A new session for a key: the cookie's value and what it says."""
        expires = (time.time() if now is None else now) + self.session_seconds
        session = ConsoleSession(key_id, expires, secrets.token_urlsafe(16))
        body = _b64(json.dumps({"k": str(key_id), "e": int(expires), "n": session.nonce}).encode())
        return f"{body}.{self._mac('session', body)}", session

    def read(self, cookie: str | None, now: float | None = None) -> ConsoleSession | None:
        """The session a cookie names; None when absent, tampered with or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("session", body)):
            return None
        try:
            fields = json.loads(_unb64(body))
            session = ConsoleSession(uuid.UUID(fields["k"]), float(fields["e"]), str(fields["n"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if session.expires_at <= (time.time() if now is None else now):
            return None
        return session

    def csrf_token(self, session: ConsoleSession) -> str:
        """The token every state-changing form of this session carries."""
        return self._mac("csrf", session.nonce)

    def login_token(self, nonce: str) -> str:
        """The token of the sign-in form, tied to the login cookie's nonce."""
        return self._mac("login", nonce)

    def login_cookie(self, now: float | None = None) -> tuple[str, str]:
        """A fresh login cookie and the token its form carries."""
        expires = int((time.time() if now is None else now) + LOGIN_SECONDS)
        nonce = f"{secrets.token_urlsafe(16)}:{expires}"
        return f"{nonce}.{self._mac('login-cookie', nonce)}", self.login_token(nonce)

    def login_nonce(self, cookie: str | None, now: float | None = None) -> str | None:
        """The nonce of a login cookie this console set and that has not expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        nonce, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("login-cookie", nonce)):
            return None
        try:
            expires = int(nonce.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return None
        return nonce if expires > (time.time() if now is None else now) else None


def tokens_match(expected: str, presented: str | None) -> bool:
    """A constant-time comparison of a form's token with the one expected."""
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


def parse_form(body: bytes) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body: the first value of each field."""
    if len(body) > MAX_FORM_BYTES:
        raise FormError("the form is too large")
    try:
        text = body.decode("utf-8")
        fields = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
    except (UnicodeDecodeError, ValueError):
        raise FormError("the form is not url-encoded") from None
    return {name: values[0] for name, values in fields.items()}
