from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devmeter.db import service_url
from devmeter.migrate import available_migrations, migrate
from tests.conftest import REPO
from tests.servers import Server


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT relname FROM pg_class WHERE relkind IN ('r', 'p') AND relnamespace = "
            "'public'::regnamespace"
        ).fetchall()
    return {str(r[0]) for r in rows}


def test_migrate_twice_in_a_row_applies_once(empty_database_url: str) -> None:
    first = migrate(empty_database_url)
    second = migrate(empty_database_url)

    assert first.applied == [f"{m.version:04d}_{m.name}" for m in available_migrations(first.mode)]
    assert second.applied == []
    assert second.mode == first.mode
    assert second.current_version == first.current_version
    assert {"accounts", "members", "api_keys", "devices", "device_state_events", "heartbeats"} <= (
        _tables(empty_database_url)
    )


def test_migrate_from_two_processes_at_once(empty_database_url: str) -> None:
    env = {**os.environ, "DEVMETER_DATABASE_URL": empty_database_url, "PYTHONPATH": str(REPO)}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devmeter", "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run(), range(2)))

    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    applied = sorted(len(json.loads(r.stdout)["applied"]) for r in results)
    assert applied[0] == 0, "exactly one process applies the migrations"
    assert applied[1] > 0
    for r in results:
        assert "storage mode:" in r.stderr
    with psycopg.connect(empty_database_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT version) FROM devmeter_schema_migrations"
        ).fetchone()
    assert row is not None
    assert row[0] == row[1] > 0


def test_storage_mode_is_recorded_and_matches_server(empty_database_url: str) -> None:
    result = migrate(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        available = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        recorded = conn.execute(
            "SELECT value FROM devmeter_meta WHERE key = 'storage_mode'"
        ).fetchone()
        if result.mode == "plain":
            partitioned = conn.execute(
                "SELECT count(*) FROM pg_partitioned_table WHERE partrelid IN "
                "('heartbeats'::regclass, 'device_state_events'::regclass)"
            ).fetchone()
            assert partitioned == (2,)
        else:
            hypertables = conn.execute(
                "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name "
                "IN ('heartbeats', 'device_state_events')"
            ).fetchone()
            assert hypertables == (2,)
    assert recorded == (result.mode,)
    # Where the extension is not installed the fallback is forced; where it is, auto uses it
    # unless it cannot be loaded.
    if available is None:
        assert result.mode == "plain"


def test_plain_mode_refuses_to_switch_to_timescaledb(empty_database_url: str) -> None:
    from devmeter.errors import ConfigError

    assert migrate(empty_database_url, storage="plain").mode == "plain"
    with pytest.raises(ConfigError, match="set up in plain mode"):
        migrate(empty_database_url, storage="timescaledb")


def test_plain_partitions_take_rows_from_the_default_partition(empty_database_url: str) -> None:
    migrate(empty_database_url, storage="plain")
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO heartbeats (time, device_id, account_id, state, seq, reporter, "
            "received_at) VALUES ('2031-05-10T00:00Z', 'd1', 1, 'active', 1, 'd1', now())"
        )
        assert conn.execute("SELECT count(*) FROM heartbeats_default").fetchone() == (1,)
        conn.execute(
            "SELECT devmeter_ensure_month_partitions('heartbeats', '2031-05-01Z', '2031-06-01Z')"
        )
        assert conn.execute("SELECT count(*) FROM heartbeats_default").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM heartbeats_p203105").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM heartbeats").fetchone() == (1,)


def _role_attributes(url: str, role: str) -> tuple[object, ...] | None:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolinherit, "
            "rolreplication, rolbypassrls FROM pg_roles WHERE rolname = %s",
            (role,),
        ).fetchone()


def _drop_role(role: str, *urls: str) -> None:
    # A role with privileges in a database cannot be dropped: take them back in each first.
    for url in urls:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(urls[0], autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_migrate_creates_the_service_role_and_it_can_log_in(empty_database_url: str) -> None:
    role = f"dm_svc_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        migrate(empty_database_url, service_role=role, service_password="pw-one-0123456789")
        assert _role_attributes(empty_database_url, role) == (
            True, False, False, False, False, False, False,
        )  # fmt: skip
        # Again, with a new password: the role is kept, the password changed.
        migrate(empty_database_url, service_role=role, service_password="pw-two-0123456789")
        url = service_url(empty_database_url, role, "pw-two-0123456789")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT session_user::text").fetchone() == (role,)
            # A table a later migration adds is granted by the next migrate, with no UPDATE.
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE later_evidence (x int)")
        migrate(empty_database_url, service_role=role)
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT has_table_privilege('later_evidence', 'SELECT'),"
                " has_table_privilege('later_evidence', 'INSERT'),"
                " has_table_privilege('later_evidence', 'UPDATE, DELETE, TRUNCATE')"
            ).fetchone()
        assert row == (True, True, False)
    finally:
        _drop_role(role, empty_database_url)


def test_two_databases_migrate_one_new_role_at_once(pg_server: Server) -> None:
    """Roles belong to the cluster: two migrations of two databases may both create it."""
    role = f"dm_svc_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    names = [f"dm_role_race_{os.getpid()}_{i}" for i in range(2)]
    urls = [make_conninfo(pg_server.url, dbname=n) for n in names]
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(
                    lambda u: migrate(u, service_role=role, service_password="pw-0123456789ab"),
                    urls,
                )
            )
        assert len(results) == 2
        assert _role_attributes(urls[0], role) is not None
    finally:
        _drop_role(role, *urls)
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            for name in names:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def test_migrate_refuses_a_service_role_that_could_rewrite_evidence(
    empty_database_url: str,
) -> None:
    from devmeter.errors import ConfigError

    me = conninfo_to_dict(empty_database_url).get("user") or "postgres"
    with pytest.raises(ConfigError, match="must run as the schema's owner"):
        migrate(empty_database_url, service_role=str(me))
    role = f"dm_svc_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            conn.execute(sql.SQL("GRANT pg_write_all_data TO {}").format(sql.Identifier(role)))
        with pytest.raises(ConfigError, match="is a member of"):
            migrate(empty_database_url, service_role=role)
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("REVOKE pg_write_all_data FROM {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("ALTER ROLE {} CREATEROLE").format(sql.Identifier(role)))
        with pytest.raises(ConfigError, match="superuser or may create"):
            migrate(empty_database_url, service_role=role)
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} NOCREATEROLE").format(sql.Identifier(role)))
        # An existing, harmless role is used as it is.
        migrate(empty_database_url, service_role=role)
    finally:
        _drop_role(role, empty_database_url)
