"""Versioned SQL migrations, safe to run twice in a row or from two processes at once.

Files in ``devmeter/migrations`` are named ``NNNN_name.sql`` (every database),
``NNNN_name.timescaledb.sql`` or ``NNNN_name.plain.sql`` (only in that storage mode). A
database's storage mode is chosen once, when it is first migrated, and recorded in
``devmeter_meta``; it never changes afterwards, since the two modes store rows differently.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Literal, cast

import psycopg
from psycopg import sql

from devmeter.db import connect
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
    url: str, *, storage: str = "auto", heartbeat_retention_days: int = 400
) -> MigrateResult:
    with connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            return _migrate_locked(conn, storage, heartbeat_retention_days)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def _migrate_locked(
    conn: psycopg.Connection[dict[str, object]], storage: str, retention_days: int
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
