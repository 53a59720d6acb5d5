"""The `conveyor` command as users run it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conveyor.cli.main import build_parser
from conveyor.jobs import migrate
from conveyor.jobs.db import make_engine
from tests.support import run_conveyor

Result = subprocess.CompletedProcess[str]


@pytest.fixture(autouse=True)
def _no_conveyor_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case states its settings; none leak in from the shell running the tests."""
    for name in list(os.environ):
        if name.startswith("CONVEYOR_"):
            monkeypatch.delenv(name)


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    """Where the case's SQLite job store lives (not created yet)."""
    return tmp_path / "conveyor.db"


@pytest.fixture
def db_env(db_file: Path) -> dict[str, str]:
    """Settings for a job store inside the test's directory and the embedded broker."""
    return {"CONVEYOR_DATABASE_URL": f"sqlite:///{db_file}"}


@pytest.fixture
def migrated(db_env: dict[str, str], db_file: Path) -> Path:
    """A fresh SQLite job store at the latest schema (`conveyor migrate` has its own test)."""
    engine = make_engine(db_env["CONVEYOR_DATABASE_URL"])
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return db_file


def conveyor(cwd: Path, env: dict[str, str], *args: str) -> Result:
    """Run one `conveyor` command in the test's directory."""
    return run_conveyor(*args, env=env, cwd=cwd)


def conveyor_many(cwd: Path, cases: Sequence[tuple[dict[str, str], Sequence[str]]]) -> list[Result]:
    """Run independent `conveyor` commands side by side; results in the order given."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda case: run_conveyor(*case[1], env=case[0], cwd=cwd), cases))


def one_line_error(result: Result, args: Sequence[str]) -> str:
    """Assert the command failed with exactly one line on stderr and no traceback."""
    where = f"`conveyor {' '.join(args)}`"
    assert "Traceback" not in result.stderr, f"{where} printed a traceback:\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"{where} printed {len(lines)} stderr lines:\n{result.stderr}"
    assert lines[0].startswith("conveyor: "), f"{where}: {lines[0]!r}"
    return lines[0]


def rows(db_file: Path, sql: str) -> list[sqlite3.Row]:
    """Rows of a query on the SQLite job store."""
    connection = sqlite3.connect(db_file)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command and subcommand the parser knows, e.g. (), ("jobs",), ("jobs", "show")."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*prefix, name))


def test_every_command_has_help(tmp_path: Path, db_env: dict[str, str], db_file: Path) -> None:
    paths = list(command_paths(build_parser()))
    contract = {
        ("up",),
        ("api",),
        ("worker",),
        ("beat",),
        ("flower",),
        ("migrate",),
        ("keys", "create"),
        ("submit",),
        ("jobs", "show"),
        ("jobs", "list"),
        ("jobs", "cancel"),
        ("jobs", "retry"),
        ("dlq", "list"),
        ("dlq", "replay"),
        ("workflows", "submit"),
        ("workflows", "show"),
        ("workflows", "list"),
        ("workflows", "cancel"),
    }
    assert contract <= set(paths)

    results = conveyor_many(tmp_path, [(db_env, [*path, "--help"]) for path in paths])
    for path, result in zip(paths, results, strict=True):
        shown = " ".join(("conveyor", *path))
        assert result.returncode == 0, f"`{shown} --help`: {result.stderr}"
        assert result.stdout.startswith(f"usage: {shown}"), f"`{shown} --help`: {result.stdout}"
        assert "Traceback" not in result.stderr
    assert not db_file.exists(), "--help must not touch the job store"


def test_bad_argument_exits_2_with_one_line(
    tmp_path: Path, db_env: dict[str, str], db_file: Path
) -> None:
    cases: list[tuple[list[str], str]] = [
        (["worker", "--pool", "urgent"], "urgent"),
        (["worker", "--pool", "high", "--queues", "low"], "not allowed with"),
        (["nosuch"], "nosuch"),
        ([], "COMMAND"),
        (["keys", "create"], "--tenant"),
        (["keys", "create", "--tenant", "a", "--scopes", "bogus"], "scopes"),
        (["jobs", "list", "--state", "bogus"], "bogus"),
    ]
    results = conveyor_many(tmp_path, [(db_env, args) for args, _ in cases])
    for (args, mentions), result in zip(cases, results, strict=True):
        assert result.returncode == 2, f"{args}: {result.stderr}"
        assert mentions in one_line_error(result, args)
        assert result.stdout == ""
    assert not db_file.exists(), "a rejected command must not touch the job store"


def test_invalid_settings_exit_2_naming_the_variable(
    tmp_path: Path, db_env: dict[str, str], db_file: Path
) -> None:
    cases = {
        "CONVEYOR_API_PORT": {**db_env, "CONVEYOR_API_PORT": "notaport"},
        "CONVEYOR_DATABASE_URL": {"CONVEYOR_DATABASE_URL": "mysql://x"},
        "CONVEYOR_BROKER_URL": {**db_env, "CONVEYOR_BROKER_URL": "ftp://x"},
        "CONVEYOR_LOG_LEVEL": {**db_env, "CONVEYOR_LOG_LEVEL": "LOUD"},
    }
    results = conveyor_many(tmp_path, [(env, ["migrate"]) for env in cases.values()])
    for variable, result in zip(cases, results, strict=True):
        assert result.returncode == 2, f"{variable}: {result.stderr}"
        line = one_line_error(result, ["migrate"])
        assert variable in line, line
        assert result.stdout == ""
    assert not db_file.exists(), "invalid settings must stop the process before any work"


def test_invalid_setting_in_dot_env_is_reported_too(
    tmp_path: Path, db_env: dict[str, str], db_file: Path
) -> None:
    (tmp_path / ".env").write_text("CONVEYOR_API_PORT=notaport\n")
    result = conveyor(tmp_path, db_env, "migrate")
    assert result.returncode == 2
    assert "CONVEYOR_API_PORT" in one_line_error(result, ["migrate"])
    assert not db_file.exists()


def test_migrate_creates_the_schema_on_a_fresh_sqlite_file(
    tmp_path: Path, db_env: dict[str, str], db_file: Path
) -> None:
    assert not db_file.exists()
    first = conveyor(tmp_path, db_env, "migrate")
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    tables = {row["name"] for row in rows(db_file, "SELECT name FROM sqlite_master")}
    assert {"jobs", "job_events", "api_keys"} <= tables

    again = conveyor(tmp_path, db_env, "migrate")
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "var").exists(), "the explicit database URL must be the one used"


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(
    tmp_path: Path, db_env: dict[str, str], migrated: Path
) -> None:
    result = conveyor(
        tmp_path, db_env, "keys", "create", "--tenant", "acme", "--scopes", "submit,read"
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("cvk_")
    assert key == key.strip() and " " not in key, "the last line is the key alone"
    assert len(key) > 30
    assert key not in result.stderr

    stored = rows(migrated, "SELECT * FROM api_keys")
    assert len(stored) == 1
    row = stored[0]
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert row["tenant"] == "acme"
    assert sorted(json.loads(row["scopes"])) == ["read", "submit"]
    for column in row.keys():  # noqa: SIM118 - sqlite3.Row iterates values, not names
        assert key not in str(row[column]), f"the raw key is stored in {column}"


def test_jobs_show_unknown_or_malformed_id_fails_with_one_line(
    tmp_path: Path, db_env: dict[str, str], migrated: Path
) -> None:
    missing = str(uuid.uuid4())
    unknown, malformed = conveyor_many(
        tmp_path, [(db_env, ["jobs", "show", missing]), (db_env, ["jobs", "show", "not-a-uuid"])]
    )
    assert unknown.returncode == 1
    assert missing in one_line_error(unknown, ["jobs", "show", missing])
    assert unknown.stdout == ""
    assert malformed.returncode != 0
    assert "not-a-uuid" in one_line_error(malformed, ["jobs", "show", "not-a-uuid"])
    assert malformed.stdout == ""


def test_jobs_show_before_migrate_says_so_in_one_line(
    tmp_path: Path, db_env: dict[str, str]
) -> None:
    args = ["jobs", "show", str(uuid.uuid4())]
    result = conveyor(tmp_path, db_env, *args)
    assert result.returncode == 1
    assert "conveyor migrate" in one_line_error(result, args)


def test_rejected_submissions_store_nothing(
    tmp_path: Path, db_env: dict[str, str], migrated: Path
) -> None:
    cases = [
        (["submit", "demo.nosuch", "--payload", "{}"], "demo.nosuch"),
        (["submit", "demo.sleep", "--payload", '{"seconds": -1}'], "seconds"),
        (["submit", "demo.echo", "--payload", "not json"], "JSON"),
    ]
    results = conveyor_many(tmp_path, [(db_env, args) for args, _ in cases])
    for (args, mentions), result in zip(cases, results, strict=True):
        assert result.returncode != 0, args
        assert mentions in one_line_error(result, args)
        assert result.stdout == ""
    assert rows(migrated, "SELECT count(*) AS n FROM jobs")[0]["n"] == 0
    assert rows(migrated, "SELECT count(*) AS n FROM job_events")[0]["n"] == 0

    # The same store does record a valid submission, and `jobs show` finds it.
    accepted = conveyor(tmp_path, db_env, "submit", "demo.echo", "--payload", '{"hello": "world"}')
    assert accepted.returncode == 0, accepted.stderr
    job_id = uuid.UUID(accepted.stdout.strip().splitlines()[-1])
    stored = rows(migrated, "SELECT id, task, state FROM jobs")
    assert [(uuid.UUID(r["id"]), r["task"], r["state"]) for r in stored] == [
        (job_id, "demo.echo", "queued")
    ]
    shown = conveyor(tmp_path, db_env, "jobs", "show", str(job_id))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == str(job_id)


def test_services_refuse_to_start_without_what_they_need(
    tmp_path: Path, db_env: dict[str, str]
) -> None:
    with_credentials = {
        **db_env,
        "CONVEYOR_FLOWER_USER": "admin",
        "CONVEYOR_FLOWER_PASSWORD": "a-long-password",
    }
    cases: list[tuple[dict[str, str], list[str], str]] = [
        (db_env, ["flower"], "CONVEYOR_FLOWER_PASSWORD"),
        (with_credentials, ["flower"], "CONVEYOR_BROKER_URL"),
        (db_env, ["worker"], "CONVEYOR_BROKER_URL"),
        (db_env, ["beat"], "CONVEYOR_BROKER_URL"),
    ]
    results = conveyor_many(tmp_path, [(env, args) for env, args, _ in cases])
    for (_, args, mentions), result in zip(cases, results, strict=True):
        assert result.returncode == 2, f"{args}: {result.stderr}"
        assert mentions in one_line_error(result, args)
    assert "a-long-password" not in results[1].stderr


def test_workflows_submitted_shown_listed_and_cancelled(
    tmp_path: Path, db_env: dict[str, str], migrated: Path
) -> None:
    def write(name: str, body: object) -> str:
        path = tmp_path / name
        path.write_text(json.dumps(body))
        return str(path)

    bad = [
        (
            write(
                "cycle.json",
                {
                    "steps": [
                        {"key": "a", "task": "demo.echo", "after": ["b"]},
                        {"key": "b", "task": "demo.echo", "after": ["a"]},
                    ]
                },
            ),
            "cycle",
        ),
        (write("unknown.json", {"steps": [{"key": "a", "task": "demo.nosuch"}]}), "demo.nosuch"),
        (
            write(
                "payload.json",
                {
                    "steps": [
                        {"key": "a", "task": "demo.sleep", "payload": {"seconds": -1}},
                    ]
                },
            ),
            "steps.0.payload.seconds",
        ),
        (str(tmp_path / "missing.json"), "cannot read"),
    ]
    (tmp_path / "broken.json").write_text("{")
    bad.append((str(tmp_path / "broken.json"), "not valid JSON"))
    results = conveyor_many(tmp_path, [(db_env, ["workflows", "submit", f]) for f, _ in bad])
    for (path, mentions), result in zip(bad, results, strict=True):
        args = ["workflows", "submit", path]
        assert result.returncode != 0, args
        assert mentions in one_line_error(result, args)
    assert rows(migrated, "SELECT count(*) AS n FROM jobs")[0]["n"] == 0
    assert rows(migrated, "SELECT count(*) AS n FROM workflows")[0]["n"] == 0

    good = write(
        "etl.json",
        {
            "name": "etl",
            "steps": [
                {"key": "fetch", "task": "demo.echo", "payload": {"n": 1}},
                {"key": "transform", "task": "demo.echo", "after": ["fetch"]},
                {"key": "load", "task": "demo.collect", "after": ["transform"]},
            ],
        },
    )
    submitted = conveyor(tmp_path, db_env, "workflows", "submit", good)
    assert submitted.returncode == 0, submitted.stderr
    workflow_id = uuid.UUID(submitted.stdout.strip().splitlines()[-1])
    shown = conveyor(tmp_path, db_env, "workflows", "show", str(workflow_id))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"workflow {workflow_id} etl: running (3 steps)"
    assert lines[1].split()[:2] == ["fetch", "queued"]
    # Each step is indented below the one it runs after, and names it.
    assert lines[2].startswith("    transform") and lines[2].endswith("after fetch")
    assert lines[3].startswith("      load") and "pending" in lines[3]
    listed = conveyor(tmp_path, db_env, "workflows", "list")
    header, _rule, row = listed.stdout.splitlines()[:3]
    assert header.split() == ["ID", "STATE", "STEPS", "CREATED", "NAME"]
    assert row.split()[:3] == [str(workflow_id), "running", "0/3"]
    cancelled = conveyor(tmp_path, db_env, "workflows", "cancel", str(workflow_id))
    assert cancelled.returncode == 0, cancelled.stderr
    states = rows(migrated, "SELECT state FROM jobs")
    assert {r["state"] for r in states} == {"cancelled"}
    again = conveyor(tmp_path, db_env, "workflows", "cancel", str(workflow_id))
    assert "has finished" in one_line_error(again, ["workflows", "cancel"])
    missing = conveyor(tmp_path, db_env, "workflows", "show", str(uuid.uuid4()))
    assert "no workflow" in one_line_error(missing, ["workflows", "show"])
