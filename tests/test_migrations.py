"""The job store's schema migrations (service.migrations) on real SQLite files and real
PostgreSQL databases (conftest's ``store_url``, ``postgres``): revision 0001 is the 0.2.0 schema,
a new store is migrated to the head and matches the models, processes opening an empty store
together create it once (under the migration lock), a 0.2.0 store is refused until ``scsnet db
upgrade`` (a real subprocess) migrates it keeping every row, and the service commands refuse an
outdated store in one line."""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import service_helpers as h
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pg_cluster import Cluster
from sqlalchemy import create_engine, inspect, text

from service import migrations
from service.errors import SchemaOutdated
from service.store import Base, JobState, Store

SCSNET_BIN = Path(sys.executable).parent / "scsnet"
OUTDATED = "scsnet: error: the job store's schema is at revision 0001 (scsnet 0.2.0), this scsnet needs 0003: run 'scsnet db upgrade'"

# What scsnet 0.2.0's Base.metadata.create_all made on SQLite (sqlite_master.sql), frozen here.
DDL_0_2_0 = [
    """CREATE TABLE tenants (
	id INTEGER NOT NULL, 
	name VARCHAR(100) NOT NULL, 
	webhook_secret VARCHAR(100) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
)""",
    """CREATE TABLE workers (
	hostname VARCHAR(255) NOT NULL, 
	seen_at DATETIME NOT NULL, 
	info JSON NOT NULL, 
	PRIMARY KEY (hostname)
)""",
    """CREATE TABLE api_keys (
	id VARCHAR(32) NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	created_at DATETIME NOT NULL, 
	revoked_at DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
)""",
    """CREATE TABLE jobs (
	seq INTEGER NOT NULL, 
	id VARCHAR(32) NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	stage VARCHAR(16), 
	progress FLOAT NOT NULL, 
	version INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	enqueued_at DATETIME, 
	started_at DATETIME, 
	finished_at DATETIME, 
	duration_s FLOAT, 
	attempts INTEGER NOT NULL, 
	dispatch_token VARCHAR(32) NOT NULL, 
	idempotency_key VARCHAR(255), 
	callback_url VARCHAR(2048), 
	inputs JSON NOT NULL, 
	problem JSON, 
	artifacts JSON NOT NULL, 
	deliveries JSON NOT NULL, 
	PRIMARY KEY (seq), 
	CONSTRAINT uq_jobs_tenant_idempotency UNIQUE (tenant_id, idempotency_key), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
)""",
    "CREATE INDEX ix_jobs_tenant_id ON jobs (tenant_id)",
    "CREATE INDEX ix_jobs_state ON jobs (state)",
    "CREATE UNIQUE INDEX ix_jobs_id ON jobs (id)",
    """CREATE TABLE reviews (
	id INTEGER NOT NULL, 
	job_id VARCHAR(32) NOT NULL, 
	verdict VARCHAR(16) NOT NULL, 
	note VARCHAR(2000) NOT NULL, 
	key_id VARCHAR(32) NOT NULL, 
	at DATETIME NOT NULL, 
	latest BOOLEAN NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE
)""",
    "CREATE INDEX ix_reviews_job_latest ON reviews (job_id, latest, verdict)",
]
KEY = "scsnet_0123456789ab_" + "k" * 43
JOB_IDS = ["a" * 32, "b" * 32, "c" * 32]


def _schema(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name != 'alembic_version'")
        return {row[0] for row in rows}


def _differences(url: str) -> list[object]:
    """Alembic's autogenerate comparison of the database at ``url`` with the models."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata))
    finally:
        engine.dispose()


def _reflected(url: str) -> dict[str, object]:
    """Every table's columns (name, type, nullable), indexes, unique constraints and foreign
    keys as SQLAlchemy reflects them (column order aside: ADD COLUMN appends)."""
    engine = create_engine(url)
    try:
        found = inspect(engine)
        return {
            table: (
                sorted((c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(table)),
                sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in found.get_indexes(table)),
                sorted(tuple(u["column_names"]) for u in found.get_unique_constraints(table)),
                sorted((tuple(f["constrained_columns"]), f["referred_table"], str(f.get("options"))) for f in found.get_foreign_keys(table)),
            )
            for table in found.get_table_names()
            if table != "alembic_version"
        }
    finally:
        engine.dispose()


def _store_0_2_0(data: Path) -> Path:
    """A scsnet 0.2.0 job store in ``data``: its DDL, a tenant, a key, three jobs, a review."""
    data.mkdir(parents=True, mode=0o700)
    path = data / "scsnet.db"
    with sqlite3.connect(path) as conn:
        for statement in DDL_0_2_0:
            conn.execute(statement)
        conn.execute("INSERT INTO tenants VALUES (1, 'north', 'whsec_old', '2026-01-02 03:04:05.000000')")
        conn.execute(
            "INSERT INTO api_keys VALUES ('0123456789ab', 1, ?, '2026-01-02 03:04:05.000000', NULL)",
            (hashlib.sha256(KEY.encode()).hexdigest(),),
        )
        for seq, (job_id, state) in enumerate(zip(JOB_IDS, ("succeeded", "failed", "queued"), strict=True), start=1):
            conn.execute(
                "INSERT INTO jobs (seq, id, tenant_id, state, stage, progress, version, created_at, updated_at, finished_at, "
                "attempts, dispatch_token, idempotency_key, callback_url, inputs, problem, artifacts, deliveries) "
                "VALUES (?, ?, 1, ?, NULL, 1.0, 3, '2026-01-02 03:04:05.000000', '2026-01-02 03:05:05.000000', ?, 1, 'tok', ?, NULL, "
                "'{\"kind\": \"nifti\"}', NULL, '{}', '[]')",
                (seq, job_id, state, None if state == "queued" else "2026-01-02 03:05:05.000000", f"idem-{seq}"),
            )
        conn.execute("INSERT INTO reviews VALUES (1, ?, 'pass', 'looks right', '0123456789ab', '2026-01-03 00:00:00.000000', 1)", (JOB_IDS[0],))
    return path


def _run(data: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCSNET_BIN), *args], env=h.env_for(data, **env), capture_output=True, text=True, timeout=120, check=False)


def test_revision_0001_is_the_schema_scsnet_0_2_0_released(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'r1.db'}")
    with engine.begin() as conn:
        command.upgrade(migrations._config(conn), "0001")
    engine.dispose()
    assert _schema(tmp_path / "r1.db") == set(DDL_0_2_0)


def test_a_new_store_is_migrated_to_the_head_and_matches_the_models(store_url: str, make_store_url: Callable[[], str]) -> None:
    store = Store(store_url)
    assert migrations.current(store.engine) == (migrations.head(), True) and migrations.head() == "0003"
    assert _differences(store.url) == []
    # the models' own DDL (what create_all would make) compares equal too: both paths agree
    models_url = make_store_url()
    models = create_engine(models_url)
    Base.metadata.create_all(models)
    models.dispose()
    assert _differences(models_url) == []
    assert _reflected(store.url) == _reflected(models_url)
    store.engine.dispose()


def test_processes_opening_an_empty_store_at_once_create_it_once(store_url: str) -> None:
    url, errors = store_url, []

    def open_store() -> None:
        try:
            Store(url).engine.dispose()
        except Exception as exc:  # noqa: BLE001 - collected and shown by the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    store = Store(url)
    assert migrations.current(store.engine)[0] == migrations.head()
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [migrations.head()]
    store.engine.dispose()


@contextmanager
def _holding_the_migration_lock(url: str) -> Iterator[None]:
    """What a process migrating the store holds: the advisory lock on PostgreSQL, the lock file
    beside a SQLite file."""
    engine = create_engine(url)
    try:
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": migrations._PG_LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": migrations._PG_LOCK_KEY})
        else:
            with open(f"{engine.url.database}-migrate.lock", "a") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
    finally:
        engine.dispose()


def test_an_empty_store_is_created_only_under_the_migration_lock(store_url: str) -> None:
    """While another process holds the migration lock, opening an empty store waits (and makes
    nothing); once it is released, the store is created."""
    opened: list[object] = []
    with _holding_the_migration_lock(store_url):
        opener = threading.Thread(target=lambda: opened.append(Store(store_url)))
        opener.start()
        time.sleep(1.0)
        assert opener.is_alive() and opened == []
        probe = create_engine(store_url)
        assert migrations.current(probe) == (None, False)  # nothing made yet
        probe.dispose()
    opener.join(60)
    assert not opener.is_alive() and len(opened) == 1
    assert migrations.current(opened[0].engine)[0] == migrations.head()  # type: ignore[attr-defined]
    opened[0].engine.dispose()  # type: ignore[attr-defined]



def _assert_the_0_2_0_rows_are_kept(store: Store) -> None:
    """The tenant, key, jobs and review written by the 0.2.0 schema, unchanged after upgrading."""
    tenant = store.authenticate(KEY)
    assert tenant is not None and tenant.name == "north" and tenant.webhook_secret == "whsec_old"
    assert tenant.signing_secrets() == ["whsec_old"]
    jobs = {job.id: job for job in store.list_jobs(tenant.id, state=None, before_seq=None, limit=10)}
    assert sorted(jobs) == JOB_IDS
    assert [jobs[i].state for i in JOB_IDS] == [JobState.succeeded, JobState.failed, JobState.queued]
    assert all(job.files_deleted_at is None and job.inputs == {"kind": "nifti"} and job.version == 3 for job in jobs.values())
    assert jobs[JOB_IDS[2]].finished_at is None and jobs[JOB_IDS[0]].idempotency_key == "idem-1"
    assert [(r.verdict, r.note) for r in store.reviews(JOB_IDS[0])] == [("pass", "looks right")]


def test_a_0_2_0_store_is_refused_then_upgraded_by_scsnet_db_upgrade_keeping_every_row(tmp_path: Path) -> None:
    data = tmp_path / "var"
    path = _store_0_2_0(data)
    with pytest.raises(SchemaOutdated) as refused:
        Store(f"sqlite:///{path}")
    assert f"scsnet: error: {refused.value}" == OUTDATED
    current = _run(data, "db", "current")
    assert current.returncode == 0 and current.stdout.strip() == "job store schema: 0001 (scsnet 0.2.0); this scsnet needs 0003"
    upgraded = _run(data, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == "job store schema upgraded from 0001 (scsnet 0.2.0) to 0003 (this scsnet)"
    again = _run(data, "db", "upgrade")
    assert again.returncode == 0 and again.stdout.strip() == "job store schema already at 0003 (this scsnet)"

    store = Store(f"sqlite:///{path}")
    assert _differences(store.url) == []
    _assert_the_0_2_0_rows_are_kept(store)
    listed = _run(data, "apikey", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("0123456789ab  north  created 2026-01-02 03:04  live")


def test_the_migrations_go_down_to_0001_and_up_again_keeping_rows(tmp_path: Path) -> None:
    path = _store_0_2_0(tmp_path / "var")
    engine = create_engine(f"sqlite:///{path}")
    migrations.upgrade(engine)
    with engine.begin() as conn:
        command.downgrade(migrations._config(conn), "0001")
    assert _schema(path) == set(DDL_0_2_0)
    assert {c["name"] for c in inspect(engine).get_columns("jobs")} >= {"seq", "id", "deliveries"}
    assert migrations.upgrade(engine) == ("0001 (scsnet 0.2.0)", "0003 (this scsnet)")
    engine.dispose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM reviews").fetchone() == (1,)


@pytest.mark.parametrize("args", [("serve", "--port", "0"), ("worker",), ("apikey", "list"), ("tenant", "list")])
def test_service_commands_refuse_an_outdated_store_in_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    data = tmp_path / "var"
    _store_0_2_0(data)
    done = _run(data, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip() == OUTDATED
    assert not (data / "redis").exists() and not (data / "logs").exists()  # no child process was started


def test_celery_started_directly_refuses_an_outdated_store(tmp_path: Path) -> None:
    data = tmp_path / "var"
    _store_0_2_0(data)
    celery = Path(sys.executable).parent / "celery"
    env = {**h.env_for(data), "C_FORCE_ROOT": "1"} if os.getuid() == 0 else h.env_for(data)
    done = subprocess.run(
        [str(celery), "-A", "worker.celery_app", "worker", "--loglevel", "WARNING"],
        env=env, capture_output=True, text=True, timeout=120, cwd=h.ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == OUTDATED and "Traceback" not in done.stderr


# --- PostgreSQL ---------------------------------------------------------------------------------
def _store_0_2_0_postgresql(url: str, *, revision_recorded: bool) -> None:
    """A 0.2.0 job store in the PostgreSQL database at ``url``: revision 0001's schema, a tenant,
    a key, three jobs, a review. ``revision_recorded=False`` drops ``alembic_version``: what
    scsnet 0.2.0's ``create_all`` left (it recorded no revision)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(migrations._config(conn), "0001")
    with engine.begin() as conn:
        if not revision_recorded:
            conn.execute(text("DROP TABLE alembic_version"))
        # times with their zone: the test cluster's own is not UTC
        conn.execute(text("INSERT INTO tenants VALUES (1, 'north', 'whsec_old', '2026-01-02 03:04:05+00')"))
        conn.execute(
            text("INSERT INTO api_keys VALUES ('0123456789ab', 1, :sha, '2026-01-02 03:04:05+00', NULL)"),
            {"sha": hashlib.sha256(KEY.encode()).hexdigest()},
        )
        for seq, (job_id, state) in enumerate(zip(JOB_IDS, ("succeeded", "failed", "queued"), strict=True), start=1):
            conn.execute(
                text(
                    "INSERT INTO jobs (seq, id, tenant_id, state, stage, progress, version, created_at, updated_at, finished_at, "
                    "attempts, dispatch_token, idempotency_key, callback_url, inputs, problem, artifacts, deliveries) "
                    "VALUES (:seq, :id, 1, :state, NULL, 1.0, 3, '2026-01-02 03:04:05+00', '2026-01-02 03:05:05+00', "
                    "CAST(:finished AS timestamptz), 1, 'tok', :idem, NULL, '{\"kind\": \"nifti\"}', NULL, '{}', '[]')"
                ),
                {"seq": seq, "id": job_id, "state": state, "finished": None if state == "queued" else "2026-01-02 03:05:05+00", "idem": f"idem-{seq}"},
            )
        conn.execute(text("INSERT INTO reviews VALUES (1, :job, 'pass', 'looks right', '0123456789ab', '2026-01-03 00:00:00+00', true)"), {"job": JOB_IDS[0]})
        # the serial columns go on after the rows inserted with their ids, as they would have
        conn.execute(text("SELECT setval(pg_get_serial_sequence('tenants', 'id'), 1), setval(pg_get_serial_sequence('jobs', 'seq'), 3), "
                          "setval(pg_get_serial_sequence('reviews', 'id'), 1)"))  # fmt: skip
    engine.dispose()


@pytest.mark.parametrize("revision_recorded", [True, False], ids=["revision-0001-recorded", "no-revision-recorded"])
def test_a_0_2_0_store_on_postgresql_is_refused_then_upgraded_by_scsnet_db_upgrade_keeping_every_row(
    postgres: Cluster, tmp_path: Path, revision_recorded: bool
) -> None:
    url, data = postgres.database(), tmp_path / "var"
    env = {"SCSNET_DATABASE_URL": url}
    _store_0_2_0_postgresql(url, revision_recorded=revision_recorded)
    with pytest.raises(SchemaOutdated) as refused:
        Store(url)
    assert f"scsnet: error: {refused.value}" == OUTDATED
    listed = _run(data, "apikey", "list", **env)
    assert listed.returncode == 2 and listed.stderr.strip() == OUTDATED
    current = _run(data, "db", "current", **env)
    assert current.returncode == 0 and current.stdout.strip() == "job store schema: 0001 (scsnet 0.2.0); this scsnet needs 0003"
    upgraded = _run(data, "db", "upgrade", **env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == "job store schema upgraded from 0001 (scsnet 0.2.0) to 0003 (this scsnet)"
    again = _run(data, "db", "upgrade", **env)
    assert again.returncode == 0 and again.stdout.strip() == "job store schema already at 0003 (this scsnet)"

    store = Store(url)
    assert _differences(url) == []
    _assert_the_0_2_0_rows_are_kept(store)
    # the migrated store takes new rows (its sequences went on past the old ones)
    assert store.create_api_key("south").tenant_created
    assert store.add_review(JOB_IDS[0], verdict="fail", note="second look", key_id="0123456789ab") is not None
    store.engine.dispose()
    listed = _run(data, "apikey", "list", "--tenant", "north", **env)
    assert listed.returncode == 0 and listed.stdout.startswith("0123456789ab  north  created 2026-01-02 03:04  live")


def test_the_migrations_go_down_to_0001_and_up_again_keeping_rows_on_postgresql(postgres: Cluster) -> None:
    url = postgres.database()
    _store_0_2_0_postgresql(url, revision_recorded=True)
    engine = create_engine(url)
    assert migrations.upgrade(engine) == ("0001 (scsnet 0.2.0)", "0003 (this scsnet)")
    with engine.begin() as conn:
        command.downgrade(migrations._config(conn), "0001")
    assert set(inspect(engine).get_table_names()) == {"alembic_version", "tenants", "api_keys", "jobs", "reviews", "workers"}
    assert migrations.upgrade(engine) == ("0001 (scsnet 0.2.0)", "0003 (this scsnet)")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 3
        assert conn.execute(text("SELECT count(*) FROM reviews")).scalar() == 1
    engine.dispose()
    assert _differences(url) == []
