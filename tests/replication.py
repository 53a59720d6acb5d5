"""A PostgreSQL primary and a streaming replica of it, started for a test in a temporary
folder: `initdb` of a primary that allows replication, `pg_basebackup -R` of it, and a
second `postgres` on another port. Both run as the `postgres` user, on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.support import free_port, wait_until

OWNER = "postgres"


def _bin(name: str) -> str:
    """A server program of the newest PostgreSQL installed."""
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        raise RuntimeError("PostgreSQL's server programs are missing (/usr/lib/postgresql)")
    version = sorted(root.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0)[-1]
    return str(version / "bin" / name)


def _as_owner(*argv: str) -> subprocess.CompletedProcess[str]:
    command = ["runuser", "-u", OWNER, "--", *argv] if os.geteuid() == 0 else list(argv)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


@dataclass
class Server:
    """One `postgres` of the pair."""

    data: Path
    port: int
    sockets: Path

    @property
    def url(self) -> str:
        """Its SQLAlchemy URL."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start it and wait until it takes connections."""
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.sockets} -c fsync=off "
            "-c wal_level=replica -c max_wal_senders=4 -c hot_standby=on"
        )
        _as_owner(
            _bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.data / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop it (`immediate`: as if its host went away)."""
        with contextlib.suppress(RuntimeError):
            _as_owner(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def execute(self, sql: str) -> object:
        """Run one statement as the superuser; its first value, if any."""
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            cursor = conn.execute(sql)
            row = cursor.fetchone() if cursor.description else None
        return None if row is None else row[0]


@dataclass
class Replicated:
    """A primary, its streaming replica, and what a test does to the replica."""

    primary: Server
    replica: Server

    def pause_replay(self) -> None:
        """The replica keeps receiving but applies nothing: it lags more every moment."""
        self.replica.execute("SELECT pg_wal_replay_pause()")
        wait_until(
            lambda: self.replica.execute("SELECT pg_get_wal_replay_pause_state()") == "paused",
            timeout=10,
            what="the replica's replay to pause",
        )

    def resume_replay(self) -> None:
        """The replica catches up."""
        self.replica.execute("SELECT pg_wal_replay_resume()")

    def caught_up(self) -> bool:
        """Whether the replica has applied everything the primary has written."""
        written = self.primary.execute("SELECT pg_current_wal_lsn()::text")
        return bool(self.replica.execute(f"SELECT pg_last_wal_replay_lsn() >= '{written}'::pg_lsn"))


@contextlib.contextmanager
def primary_and_replica() -> Iterator[Replicated]:
    """Start the pair; stop both and remove their folder afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="conveyor-replication-"))
    owner = pwd.getpwnam(OWNER) if os.geteuid() == 0 else None
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    primary = Server(folder / "primary", free_port(), folder)
    replica = Server(folder / "replica", free_port(), folder)
    try:
        _as_owner(_bin("initdb"), "-D", str(primary.data), "-A", "trust", "-U", "postgres")
        primary.start()
        _as_owner(
            _bin("pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(replica.data),
            "-R",
            "-X",
            "stream",
        )
        replica.start()
        pair = Replicated(primary, replica)
        wait_until(
            lambda: replica.execute("SELECT pg_is_in_recovery()") is True,
            timeout=30,
            what="the replica to stream from the primary",
        )
        yield pair
    finally:
        replica.stop("immediate")
        primary.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)
