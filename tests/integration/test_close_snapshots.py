"""The close starts from the previous close's snapshot of Active devices (issue 11): it reads
its own month's events, not the history, and gives the same statement; a snapshot that a late
event could have changed is not used."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from devmeter.db import connect
from metering.peak import month_bounds
from metering.peak_frame import peaks_many
from metering.registry import register_device
from metering.statements import close_month, get_statement
from tests.integration.test_close import CATALOG, jst, worked_example

Opener = Callable[[], psycopg.Connection[Any]]
NOV_CLOSE = datetime(2026, 11, 20, tzinfo=UTC)
DEC_CLOSE = datetime(2026, 12, 5, tzinfo=UTC)


@pytest.fixture
def opener(database_url: str) -> Opener:
    return lambda: connect(database_url)


def test_the_snapshot_is_where_the_next_close_starts(
    database_url: str, owner_database_url: str, opener: Opener
) -> None:
    for ref in ("acme", "late"):
        worked_example(database_url, ref)
    close_month(opener, CATALOG, "2026-10", now=NOV_CLOSE)
    start, _ = month_bounds("2026-11", "Asia/Tokyo")
    with opener() as conn:
        snapshot = conn.execute(
            "SELECT a.ref, count(d.device_id) AS n FROM month_snapshots s"
            " JOIN accounts a ON a.id = s.account_id"
            " LEFT JOIN device_month_states d USING (account_id, boundary)"
            " WHERE s.boundary = %s GROUP BY a.ref ORDER BY a.ref",
            (start,),
        ).fetchall()
    # The worked example ends October with 12 Active (d17 registered in its last second).
    assert [(r["ref"], r["n"]) for r in snapshot] == [("acme", 12), ("late", 12)]

    # A late event before November for "late": its snapshot is no longer used.
    with opener() as conn, conn.transaction():
        register_device(
            conn, CATALOG, account_ref="late", device_class="lte-m", device_id="late-x",
            at=jst(2026, 10, 20),
        )  # fmt: skip
    # Proof of which path each close takes: a device only the snapshot knows.
    with psycopg.connect(owner_database_url, autocommit=True) as owner:
        # As if October had closed hours ago: here every event was stored seconds before the
        # close, which the close would otherwise take for one racing it.
        owner.execute("UPDATE month_snapshots SET taken_at = taken_at - interval '3 hours'")
        owner.execute(
            "INSERT INTO device_month_states (account_id, boundary, device_id, device_class)"
            " SELECT id, %s, 'ghost', 'lte-m' FROM accounts",
            (start,),
        )
        owner.execute(
            "INSERT INTO devices (id, account_id, device_class, key_prefix, key_hash,"
            " registered_at, state, state_at)"
            " SELECT 'ghost', id, 'lte-m', 'dmk_ghost', sha256(id::text::bytea), %s, 'inactive', %s"
            " FROM accounts",
            (jst(2026, 9, 1), jst(2026, 9, 1)),
        )
    with opener() as conn:
        expected = peaks_many(conn, _ids(conn), *month_bounds("2026-11", "Asia/Tokyo"))
    report = close_month(opener, CATALOG, "2026-11", now=DEC_CLOSE)
    assert sorted(report.closed) == ["acme", "late"]
    with opener() as conn:
        acme = get_statement(conn, CATALOG, "acme", "2026-11", now=DEC_CLOSE)
        late = get_statement(conn, CATALOG, "late", "2026-11", now=DEC_CLOSE)
        ids = _ids(conn)
    # acme started from its snapshot, ghost included; "late" from its history, as peaks_many.
    assert "ghost" in acme.peaks["lte-m"].device_ids
    assert acme.peaks["lte-m"].peak == expected[ids[0]]["lte-m"].peak + 1
    assert late.peaks["lte-m"] == expected[ids[1]]["lte-m"]


def _ids(conn: psycopg.Connection[Any]) -> list[int]:
    return [r["id"] for r in conn.execute("SELECT id FROM accounts ORDER BY ref")]
