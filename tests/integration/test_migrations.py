"""The packaged migrations build exactly the schema `conveyor.jobs.tables` declares.

Each test starts from a database of its own: a fresh PostgreSQL database, or a fresh
SQLite file. After `migrate.upgrade`, Alembic's autogenerate comparison against the
metadata must find nothing to do; downgrading to base must remove every table (only
Alembic's own, emptied `alembic_version` table stays), and upgrading again must work.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import CheckConstraint, Engine, inspect, text
from sqlalchemy.exc import IntegrityError

from conveyor.jobs import migrate, store
from conveyor.jobs.db import make_engine, make_session_factory
from conveyor.jobs.models import NewJob
from conveyor.jobs.states import JobState
from conveyor.jobs.tables import metadata
from tests.support import temporary_pg_database

TABLES = {"jobs", "job_events", "api_keys", "job_rollups", "anomalies"}


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a brand-new, empty database."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
        yield engine
        engine.dispose()
    else:
        with temporary_pg_database() as url:
            engine = make_engine(url)
            yield engine
            engine.dispose()


def differences(engine: Engine) -> list[object]:
    """What autogenerate would write to bring the database to the metadata."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "compare_server_default": True},
        )
        return list(compare_metadata(context, metadata))


def downgrade(engine: Engine, revision: str) -> None:
    config = migrate.alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None
    return head


def user_objects(engine: Engine) -> set[str]:
    """Every table, index, sequence or view left in the database, bar Alembic's table."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.execute(
                text("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
            )
        else:
            rows = connection.execute(
                text(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'public'"
                )
            )
        names = {row[0] for row in rows}
    return names - {"alembic_version", "pk_alembic_version", "alembic_version_pkc"}


def assert_store_works(engine: Engine) -> None:
    """The migrated schema takes a job through the store and enforces its constraints."""
    sessions = make_session_factory(engine)
    now = dt.datetime.now(dt.UTC)
    new = NewJob(
        tenant="t",
        task="demo.echo",
        payload={"a": 1},
        priority="high",
        queue="high",
        max_attempts=2,
        timeout_seconds=5.0,
    )
    with sessions() as session:
        store.create_job(session, new, now=now)
        claimed = store.claim(session, new.id, worker="w", lease_seconds=5, now=now)
        assert claimed is not None
        done = store.succeed(session, new.id, worker="w", token=1, result={"b": 2}, now=now)
        assert done is not None
        session.commit()
    with sessions() as session:
        job = store.get_job(session, new.id)
        assert job is not None
        assert (job.state, job.result) == (JobState.SUCCEEDED, {"b": 2})
        assert [e.event for e in store.list_events(session, new.id)] == [
            "created",
            "claimed",
            "succeeded",
        ]


def test_upgrade_builds_exactly_the_declared_schema(fresh_engine: Engine) -> None:
    assert user_objects(fresh_engine) == set()

    migrate.upgrade(fresh_engine)

    assert current_revision(fresh_engine) == head_revision()
    assert set(inspect(fresh_engine).get_table_names()) >= TABLES
    assert differences(fresh_engine) == []
    assert_store_works(fresh_engine)


def test_upgrade_creates_the_declared_check_constraints_and_keys(fresh_engine: Engine) -> None:
    """Autogenerate does not compare CHECK constraints or cascades; check them here."""
    migrate.upgrade(fresh_engine)
    inspector = inspect(fresh_engine)

    for table in metadata.sorted_tables:
        # The naming convention has already given each constraint its full name.
        declared = {
            str(c.name): str(c.sqltext) for c in table.constraints if isinstance(c, CheckConstraint)
        }
        reflected = {c["name"]: c["sqltext"] for c in inspector.get_check_constraints(table.name)}
        assert set(reflected) == set(declared), table.name
        if fresh_engine.dialect.name == "sqlite":
            # SQLite keeps the text as written, so the expressions must match too.
            assert reflected == declared, table.name
    assert len(inspector.get_check_constraints("jobs")) == 7

    [foreign_key] = inspector.get_foreign_keys("job_events")
    assert foreign_key["referred_table"] == "jobs"
    assert foreign_key["constrained_columns"] == ["job_id"]
    assert foreign_key["options"].get("ondelete") == "CASCADE"

    # A job's events go with it.
    assert_store_works(fresh_engine)
    with fresh_engine.begin() as connection:
        connection.execute(text("DELETE FROM jobs"))
        assert connection.execute(text("SELECT count(*) FROM job_events")).scalar_one() == 0


def test_downgrade_to_base_removes_everything_and_upgrade_works_again(
    fresh_engine: Engine,
) -> None:
    migrate.upgrade(fresh_engine)
    assert_store_works(fresh_engine)

    downgrade(fresh_engine, "base")

    assert user_objects(fresh_engine) == set()
    assert set(inspect(fresh_engine).get_table_names()) <= {"alembic_version"}
    assert current_revision(fresh_engine) is None

    migrate.upgrade(fresh_engine)

    assert current_revision(fresh_engine) == head_revision()
    assert differences(fresh_engine) == []
    assert_store_works(fresh_engine)
    # The tables came back empty but for the job just stored.
    with fresh_engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 1
        assert connection.execute(text("SELECT count(*) FROM api_keys")).scalar_one() == 0


def test_upgrade_is_idempotent(fresh_engine: Engine) -> None:
    migrate.upgrade(fresh_engine)
    assert_store_works(fresh_engine)
    before = user_objects(fresh_engine)

    migrate.upgrade(fresh_engine)

    assert user_objects(fresh_engine) == before
    assert differences(fresh_engine) == []
    with fresh_engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 1


def test_comparison_would_notice_a_difference(fresh_engine: Engine) -> None:
    """The control: the comparison above is not blind."""
    migrate.upgrade(fresh_engine)
    with fresh_engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_jobs_state_run_after"))
        connection.execute(text("CREATE TABLE stray (id INTEGER PRIMARY KEY)"))

    found = differences(fresh_engine)

    kinds = {(d[0], getattr(d[1], "name", None)) for d in found if isinstance(d, tuple)}
    assert ("add_index", "ix_jobs_state_run_after") in kinds
    assert ("remove_table", "stray") in kinds


PARTIAL_INDEXES = {
    "uq_jobs_tenant_idempotency_key": "idempotency_key",
    "uq_jobs_schedule_id_schedule_tick": "schedule_tick",
    "ix_jobs_finished_at": "finished_at",
    "ix_jobs_task_limit_key_state": "limit_key",
}


def index_definitions(engine: Engine) -> dict[str, str]:
    """Each index on jobs by name, with its definition as the database keeps it."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.execute(
                text("SELECT name, coalesce(sql, '') FROM sqlite_master WHERE tbl_name = 'jobs'")
            )
        else:
            rows = connection.execute(
                text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'jobs'")
            )
        return {name: definition for name, definition in rows}


def test_sparse_columns_are_indexed_only_where_set_and_keys_stay_unique(
    fresh_engine: Engine,
) -> None:
    migrate.upgrade(fresh_engine)
    definitions = index_definitions(fresh_engine)
    for name, column in PARTIAL_INDEXES.items():
        assert f"WHERE {column} IS NOT NULL" in definitions[name].replace("(", "").replace(
            ")", ""
        ), definitions[name]

    sessions = make_session_factory(fresh_engine)
    now = dt.datetime.now(dt.UTC)

    def keyed(key: str | None) -> NewJob:
        return NewJob(
            tenant="t", task="demo.echo", payload={}, priority="default", queue="default",
            max_attempts=1, timeout_seconds=5.0, idempotency_key=key,
        )  # fmt: skip

    with sessions() as session:
        # Jobs without a key never conflict; a second job with the same key does.
        store.create_job(session, keyed(None), now=now)
        store.create_job(session, keyed(None), now=now)
        store.create_job(session, keyed("k"), now=now)
        session.commit()
    with pytest.raises(IntegrityError), sessions() as session:
        store.create_job(session, keyed("k"), now=now)
        session.commit()

    # Back at 0006 the constraints are whole again, and forward the partial indexes return.
    downgrade(fresh_engine, "0006")
    assert not any("WHERE" in d for d in index_definitions(fresh_engine).values())
    migrate.upgrade(fresh_engine)
    assert differences(fresh_engine) == []
    assert set(PARTIAL_INDEXES) <= set(index_definitions(fresh_engine))
