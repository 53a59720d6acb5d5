"""PgBouncer (Debian's `pgbouncer` package) in transaction mode in front of the test
PostgreSQL, started for a test: its own configuration in a temporary folder, run as the
`postgres` user (PgBouncer refuses root), on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.support import free_port, wait_until

OWNER = "postgres"
POOL_SIZE = 8


@dataclass
class Bouncer:
    """A running PgBouncer: where it listens, and what its admin console says."""

    port: int
    process: subprocess.Popen[bytes]

    def url_for(self, database_url: str) -> str:
        """`database_url` (on 127.0.0.1:5432) through this PgBouncer."""
        return database_url.replace("127.0.0.1:5432", f"127.0.0.1:{self.port}")

    def pools(self) -> list[dict[str, object]]:
        """`SHOW POOLS`: per database, clients and server connections."""
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=pgbouncer",
            autocommit=True,
            prepare_threshold=None,
        ) as conn:
            cursor = conn.execute("SHOW POOLS")
            names = [c.name for c in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@contextlib.contextmanager
def pgbouncer() -> Iterator[Bouncer]:
    """PgBouncer in transaction mode for the test's duration."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise RuntimeError("pgbouncer is missing: apt-get install pgbouncer (.ci/run installs it)")
    folder = Path(tempfile.mkdtemp(prefix="conveyor-pgbouncer-"))
    port = free_port()
    (folder / "users.txt").write_text('"postgres" ""\n')
    (folder / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                "* = host=127.0.0.1 port=5432",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {folder / 'users.txt'}",
                "admin_users = postgres",
                "pool_mode = transaction",
                f"default_pool_size = {POOL_SIZE}",
                "max_client_conn = 1000",
                "server_reset_query =",
                "ignore_startup_parameters = extra_float_digits",
                f"logfile = {folder / 'pgbouncer.log'}",
                f"pidfile = {folder / 'pgbouncer.pid'}",
                "",
            ]
        )
    )
    owner = pwd.getpwnam(OWNER) if os.geteuid() == 0 else None
    if owner is not None:
        for path in (folder, *folder.iterdir()):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    argv = [binary, str(folder / "pgbouncer.ini")]
    if owner is not None:
        argv = ["runuser", "-u", OWNER, "--", *argv]
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    bouncer = Bouncer(port, process)

    def answers() -> bool:
        try:
            bouncer.pools()
        except psycopg.OperationalError:
            return False
        return True

    try:
        wait_until(answers, timeout=20, what="PgBouncer to listen")
        yield bouncer
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)
