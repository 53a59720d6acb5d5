"""Handing jobs recorded by a command to the embedded platform that can run them.

The embedded platform (`conveyor up` without a broker URL) keeps its broker in its own
memory, which another process cannot reach. So it listens on a Unix socket named after
its database; a command of the same database (`conveyor submit`, `jobs retry`,
`dead-letters replay`, `workflows submit`) records its jobs as ever, then sends their ids
over the socket, and the platform publishes them into its broker at once. With no
platform listening the jobs stay recorded and unpublished: the platform's relay
publishes them when it starts, and the command can say that nothing runs them now.

The socket is made readable by its owner only; whoever may open it may write the
database it names anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import socketserver
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from conveyor.jobs.models import Job
from conveyor.observability import logs

log = logs.get(__name__)

# A command waits this long for the platform's answer before leaving its jobs to the relay.
ANSWER_SECONDS = 5.0
MAX_REQUEST_BYTES = 4 * 1024 * 1024


def socket_path(database_url: str) -> Path:
    """The socket of the embedded platform of this database, in the temporary folder."""
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"conveyor-{os.getuid()}-{digest}.sock"


def _ask(path: Path, request: dict[str, object], seconds: float) -> dict[str, object] | None:
    """One request and its answer; None when no platform listens or it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(seconds)
            client.connect(str(path))
            client.sendall(json.dumps(request).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = client.recv(65536)
                if not chunk:
                    return None
                answer += chunk
    except OSError:
        return None
    found = json.loads(answer)
    return found if isinstance(found, dict) else None


def platform_pools_at(path: Path, seconds: float = 1.0) -> list[str] | None:
    """The pools the platform listening at `path` consumes; None when none answers."""
    answer = _ask(path, {"ping": True}, seconds)
    if answer is None:
        return None
    pools = answer.get("pools")
    return [str(p) for p in pools] if isinstance(pools, list) else []


def platform_pools(database_url: str) -> list[str] | None:
    """The pools an embedded platform of this database consumes; None when none runs."""
    return platform_pools_at(socket_path(database_url))


class HandoverPublisher:
    """A command's publisher under the embedded broker: the running platform publishes."""

    def __init__(self, database_url: str) -> None:
        self.path = socket_path(database_url)

    def publish(self, jobs: Sequence[Job]) -> list[uuid.UUID]:
        """Hand the jobs' ids over; the ids the platform published (none without one)."""
        answer = _ask(self.path, {"publish": [str(job.id) for job in jobs]}, ANSWER_SECONDS)
        if answer is None:
            return []
        published = answer.get("published")
        return [uuid.UUID(str(i)) for i in published] if isinstance(published, list) else []


class HandoverServer:
    """The embedded platform's end: publishes the jobs named by commands."""

    def __init__(
        self,
        database_url: str,
        publish: Callable[[list[uuid.UUID]], list[uuid.UUID]],
        pools: Sequence[str],
    ) -> None:
        self.path = socket_path(database_url)
        self._publish = publish
        self._pools = list(pools)
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    def _answer(self, request: dict[str, object]) -> dict[str, object]:
        if request.get("ping"):
            return {"pools": self._pools}
        ids = request.get("publish")
        if not isinstance(ids, list):
            return {"error": "expected publish or ping"}
        published = self._publish([uuid.UUID(str(i)) for i in ids])
        log.debug("published jobs handed over by a command", count=len(published))
        return {"published": [str(i) for i in published]}

    def start(self) -> None:
        """Listen on the socket in a thread of its own."""
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(MAX_REQUEST_BYTES)
                try:
                    request = json.loads(line)
                    answer = owner._answer(request if isinstance(request, dict) else {})
                except Exception as error:  # a bad request, or the store did not answer
                    log.warning("a command's handover failed: %s", error)
                    answer = {"error": str(error)}
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        # A socket left by a platform that was killed answers nothing: replace it.
        if self.path.exists() and platform_pools_at(self.path) is None:
            self.path.unlink()
        previous = os.umask(0o077)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        finally:
            os.umask(previous)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="conveyor-handover", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and remove the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
