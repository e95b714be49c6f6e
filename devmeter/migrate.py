"""Versioned SQL migrations, safe to run twice in a row or from two processes at once.

Files in ``devmeter/migrations`` are named ``NNNN_name.sql`` (every database),
``NNNN_name.timescaledb.sql`` or ``NNNN_name.plain.sql`` (only in that storage mode). A
database's storage mode is chosen once, when it is first migrated, and recorded in
``devmeter_meta``; it never changes afterwards, since the two modes store rows differently.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Literal, LiteralString, cast

import psycopg
from psycopg import sql

from devmeter.config import SERVICE_ROLE
from devmeter.db import connect, load_queries
from devmeter.errors import ConfigError

StorageMode = Literal["timescaledb", "plain"]

# One fixed key for pg_advisory_lock: every devmeter process migrating the same database queues
# behind the first, which makes "two at once" the same as "twice in a row".
_LOCK_KEY = 0x6465_766D_6967  # "devmig"
_FILE = re.compile(
    r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+?)(?:\.(?P<mode>timescaledb|plain))?\.sql$"
)
_TIME_SERIES = ("device_state_events", "heartbeats")
_PARTITIONING = {"timescaledb": "", "plain": "PARTITION BY RANGE (time)"}


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    mode: StorageMode | None
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class MigrateResult:
    mode: StorageMode
    applied: list[str]
    current_version: int
    timescaledb_version: str | None


def available_migrations(mode: StorageMode) -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files("devmeter.migrations").iterdir():
        match = _FILE.match(entry.name)
        if not match:
            continue
        file_mode = cast(StorageMode | None, match.group("mode"))
        if file_mode not in (None, mode):
            continue
        text = entry.read_text(encoding="utf-8").replace(
            "{{time_partitioning}}", _PARTITIONING[mode]
        )
        found.append(Migration(int(match.group("version")), match.group("name"), file_mode, text))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


def _choose_mode(conn: psycopg.Connection[dict[str, object]], wanted: str) -> StorageMode:
    row = conn.execute(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone()
    available = row is not None
    if wanted == "plain" or (wanted == "auto" and not available):
        return "plain"
    if not available:
        raise ConfigError(
            "DEVMETER_STORAGE=timescaledb but the timescaledb extension is not installed "
            "on this PostgreSQL server"
        )
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.errors.Error as exc:
        # Installed but not loaded (shared_preload_libraries) is the usual case here.
        if wanted == "timescaledb":
            raise ConfigError(f"cannot enable timescaledb: {exc}".splitlines()[0]) from exc
        return "plain"
    return "timescaledb"


def migrate(
    url: str,
    *,
    storage: str = "auto",
    heartbeat_retention_days: int = 400,
    service_role: str = SERVICE_ROLE,
    service_password: str | None = None,
    target: int | None = None,
) -> MigrateResult:
    """Apply the migrations as the owner ``url`` logs in as, then create (or check) the
    service role and grant it exactly devmeter/service_role.sql.

    ``target`` stops after that version: an upgrade test builds the database an older release
    left behind, writes what that release wrote, then migrates the rest of the way.
    """
    with connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            result = _migrate_locked(conn, storage, heartbeat_retention_days, target)
            ensure_service_role(conn, service_role, service_password)
            return result
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def _migrate_locked(
    conn: psycopg.Connection[dict[str, object]],
    storage: str,
    retention_days: int,
    target: int | None = None,
) -> MigrateResult:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS devmeter_meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE TABLE IF NOT EXISTS devmeter_schema_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        );
        """
    )
    row = conn.execute("SELECT value FROM devmeter_meta WHERE key = 'storage_mode'").fetchone()
    if row is None:
        mode = _choose_mode(conn, storage)
        conn.execute("INSERT INTO devmeter_meta (key, value) VALUES ('storage_mode', %s)", (mode,))
    else:
        mode = cast(StorageMode, row["value"])
        if storage != "auto" and storage != mode:
            raise ConfigError(
                f"this database was set up in {mode} mode; "
                f"DEVMETER_STORAGE={storage} cannot change it"
            )

    done = {
        int(cast(int, r["version"])): str(r["checksum"])
        for r in conn.execute("SELECT version, checksum FROM devmeter_schema_migrations")
    }
    applied: list[str] = []
    for migration in available_migrations(mode):
        if target is not None and migration.version > target:
            break
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                raise ConfigError(
                    f"migration {migration.version:04d}_{migration.name} was changed after it "
                    "was applied; add a new migration instead"
                )
            continue
        with conn.transaction():
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO devmeter_schema_migrations (version, name, checksum) "
                "VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
        applied.append(f"{migration.version:04d}_{migration.name}")

    _apply_policies(conn, mode, retention_days)
    if mode == "timescaledb" and any(name.startswith("0007_") for name in applied):
        # What was stored before the continuous aggregate existed: its policy only looks back
        # 31 days, and the raw rows may be dropped by retention after that.
        conn.execute(
            "CALL refresh_continuous_aggregate('heartbeats_hourly', NULL,"
            " date_trunc('hour', now()) - INTERVAL '1 hour')"
        )
    ts_version = None
    if mode == "timescaledb":
        ts_row = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        ts_version = str(ts_row["extversion"]) if ts_row else None
    current = max([*done, *(int(a[:4]) for a in applied)], default=0)
    return MigrateResult(mode, applied, current, ts_version)


def _apply_policies(
    conn: psycopg.Connection[dict[str, object]], mode: StorageMode, retention_days: int
) -> None:
    """Settings-driven parts of the schema, re-applied on every run so a changed setting takes."""
    if mode == "timescaledb":
        with conn.transaction():
            conn.execute("SELECT remove_retention_policy('heartbeats', if_exists => TRUE)")
            conn.execute(
                "SELECT add_retention_policy('heartbeats', drop_after => %s)",
                (timedelta(days=retention_days),),
            )
        return
    now = datetime.now(UTC)
    ensure_month_partitions(conn, now - timedelta(days=400), now + timedelta(days=100))
    drop_expired_heartbeat_partitions(conn, now - timedelta(days=retention_days))


def drop_expired_heartbeat_partitions(
    conn: psycopg.Connection[dict[str, object]], cutoff: datetime
) -> list[str]:
    """Plain mode's retention policy: drop raw-heartbeat months that ended before ``cutoff``.

    Only whole months go, so a heartbeat is kept at least the retention period. State events
    (the billing evidence) are never dropped.
    """
    dropped: list[str] = []
    rows = conn.execute(
        """
        SELECT c.relname AS name FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'heartbeats'::regclass AND c.relname ~ '^heartbeats_p[0-9]{6}$'
        """
    ).fetchall()
    for row in rows:
        name = str(row["name"])
        year, month = int(name[-6:-2]), int(name[-2:])
        month_end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        if month_end <= cutoff:
            with conn.transaction():
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
            dropped.append(name)
    return dropped


def ensure_month_partitions(
    conn: psycopg.Connection[dict[str, object]], start: datetime, end: datetime
) -> int:
    """Plain mode: make sure every UTC month touching [start, end) has its own partition."""
    created = 0
    for table in _TIME_SERIES:
        with conn.transaction():
            row = conn.execute(
                sql.SQL(
                    "SELECT devmeter_ensure_month_partitions({}::regclass, %s, %s) AS n"
                ).format(sql.Literal(table)),
                (start, end),
            ).fetchone()
        created += int(cast(int, row["n"])) if row else 0
    return created


def ensure_service_role(
    conn: psycopg.Connection[dict[str, object]], role: str, password: str | None
) -> None:
    """Create the service role if missing (or check the one that exists), then grant it what
    the service needs and nothing else. ``conn`` is the owner's, in autocommit mode."""
    me = conn.execute("SELECT current_user AS name").fetchone()
    if me is not None and me["name"] == role:
        raise ConfigError(
            f"devmeter migrate must run as the schema's owner, not as the service role {role!r} "
            "(point DEVMETER_DATABASE_URL at the owner for the migration)"
        )
    name = sql.Identifier(role)
    # A password travels as the libpq-computed verifier, never in the clear (server logs).
    verifier = (
        conn.pgconn.encrypt_password(password.encode(), role.encode()).decode()
        if password
        else None
    )
    existing = conn.execute(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolcanlogin "
        "FROM pg_roles WHERE rolname = %s",
        (role,),
    ).fetchone()
    if existing is None:
        create = sql.SQL(
            "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION "
            "NOBYPASSRLS"
        ).format(name)
        if verifier:
            create += sql.SQL(" PASSWORD {}").format(sql.Literal(verifier))
        try:
            conn.execute(create)
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            # Roles belong to the whole cluster: another database's migrate (or a test worker)
            # created it at the same moment. Then it is the one checked below.
            pass
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"cannot create the service role {role!r} ({exc.diag.message_primary}); create "
                "it (LOGIN, nothing else) or name an existing one in DEVMETER_SERVICE_ROLE"
            ) from exc
        else:
            verifier = None
    _check_service_role(conn, role)
    if verifier:
        _alter_role_password(conn, name, verifier)
    grants = _service_role_queries()["grant_service_role"]
    with conn.transaction():
        conn.execute(sql.SQL(grants).format(role=name))


def _check_service_role(conn: psycopg.Connection[dict[str, object]], role: str) -> None:
    """Refuse a service role that could rewrite evidence by other means than its grants."""
    row = conn.execute(
        """
        SELECT r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication
                   OR r.rolbypassrls AS privileged,
               r.rolcanlogin AS can_login,
               (SELECT array_agg(g.rolname::text ORDER BY g.rolname) FROM pg_auth_members m
                JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid) AS member_of,
               EXISTS (SELECT 1 FROM pg_class WHERE relowner = r.oid)
                   OR EXISTS (SELECT 1 FROM pg_proc WHERE proowner = r.oid)
                   OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspowner = r.oid)
                   OR EXISTS (SELECT 1 FROM pg_database
                              WHERE datname = current_database() AND datdba = r.oid) AS owns
        FROM pg_roles r WHERE r.rolname = %s
        """,
        (role,),
    ).fetchone()
    if row is None:
        raise ConfigError(f"the service role {role!r} does not exist")
    problems = []
    if row["privileged"]:
        problems.append("is a superuser or may create roles/databases, replicate or bypass RLS")
    if not row["can_login"]:
        problems.append("cannot log in")
    if row["member_of"]:
        problems.append(f"is a member of {row['member_of']} (SET ROLE would escalate)")
    if row["owns"]:
        problems.append("owns objects of this database (an owner bypasses grants)")
    if problems:
        raise ConfigError(
            f"the service role {role!r} " + "; ".join(problems) + ": devmeter needs a role "
            "with LOGIN and nothing else (DEVMETER_SERVICE_ROLE)"
        )


def _alter_role_password(
    conn: psycopg.Connection[dict[str, object]], name: sql.Identifier, verifier: str
) -> None:
    # Two migrations of different databases in one cluster may set it at the same instant;
    # PostgreSQL then fails one with "tuple concurrently updated". The value is the same.
    for attempt in range(5):
        try:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(name, sql.Literal(verifier)))
            return
        except psycopg.errors.InternalError_:
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


def _service_role_queries() -> dict[str, LiteralString]:
    return load_queries("devmeter", "service_role.sql")
