"""Evidence nobody can rewrite (issue 9, part 7): as the service role the app logs in as, every
statement that would rewrite billing evidence fails, and the role cannot become another."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from devmeter.config import SERVICE_ROLE
from devmeter.db import connect
from metering.statements import close_month
from tests.conftest import Cli
from tests.integration.test_close import CATALOG, NOW, worked_example

#: Billing evidence: appended to, never changed, by the service.
EVIDENCE = (
    "device_state_events",
    "heartbeats",
    "statements",
    "statement_lines",
    "statement_peaks",
    "webhook_attempts",
    "rejected_heartbeats",
    # Histories of an account's payment methods and suspensions (migration 0013).
    "payment_methods",
    "account_status_changes",
    # Contracts are their requests; a charge issued is final (migration 0018).
    "contracts",
    "contract_changes",
    "charges",
)
# The maintained usage figures (migration 0014) are derived, not evidence: rebuilt at will.
USAGE_FIGURES = {"usage_steps", "usage_buckets", "usage_classes", "usage_days"}
#: Current state the service legitimately moves (devmeter/service_role.sql says who and why).
UPDATABLE = {
    "accounts",
    "devices",
    "device_credentials",
    "api_keys",
    "webhook_deliveries",
    "close_failures",
    "console_sessions",
    "idempotency_keys",
} | USAGE_FIGURES
DELETABLE = {"close_failures", "console_sessions", "idempotency_keys"} | USAGE_FIGURES


@pytest.fixture
def closed_october(database_url: str) -> None:
    """October closed by the service, with a row in every evidence table."""
    worked_example(database_url)
    report = close_month(lambda: connect(database_url), CATALOG, "2026-10", now=NOW)
    assert report.closed == ["acme"]
    with connect(database_url) as conn, conn.transaction():
        # Rows the ingest worker and the webhook would write, as the service writes them.
        conn.execute(
            "INSERT INTO heartbeats (time, device_id, account_id, state, seq, reporter, "
            "received_at) SELECT '2026-10-07T00:00Z', 'acme-d1', id, 'active', 1, 'acme-d1', "
            "now() FROM accounts WHERE ref = 'acme'"
        )
        conn.execute(
            "INSERT INTO rejected_heartbeats (received_at, topic, reason, detail, payload) "
            "VALUES (now(), 't', 'bad_json', 'x', '\\x00')"
        )
        conn.execute(
            "INSERT INTO payment_methods (account_id, kind, reference, source, created_at)"
            " SELECT id, 'card', 'pm_1', 'cli', now() FROM accounts WHERE ref = 'acme'"
        )
        conn.execute(
            "INSERT INTO account_status_changes (account_id, status, source, changed_at)"
            " SELECT id, 'suspended', 'cli', now() FROM accounts WHERE ref = 'acme'"
        )
        contract = conn.execute(
            "INSERT INTO contracts (account_id, policy, currency, timezone, started_at)"
            " SELECT id, 'calendar', 'JPY', 'Asia/Tokyo', '2026-10-03T00:00Z' FROM accounts"
            " WHERE ref = 'acme' RETURNING id, account_id"
        ).fetchone()
        assert contract is not None
        conn.execute(
            "INSERT INTO contract_changes (contract_id, kind, requested_at, effect, term, plan,"
            " commitments, requested_by) VALUES (%s, 'start', '2026-10-03T00:00Z', 'now',"
            " 'monthly', 'standard', '{}', 'test')",
            (contract["id"],),
        )
        conn.execute(
            "INSERT INTO charges (account_id, contract_id, key, kind, plan, term, description,"
            " period_start, period_end, currency, amount, tax_rate, tax, amount_due, issued_at,"
            " due_date, issued_by) VALUES (%s, %s, 'term:x', 'term_fee', 'standard', 'monthly',"
            " 'fee', '2026-10-31T15:00Z', '2026-11-30T15:00Z', 'JPY', 0, 0.10, 0, 0,"
            " '2026-10-31T15:00Z', '2026-12-31', 'test')",
            (contract["account_id"], contract["id"]),
        )
        delivery = conn.execute(
            "INSERT INTO webhook_deliveries (statement_id, url, idempotency_key) "
            "SELECT id, 'https://billing.example/hook', 'k' FROM statements RETURNING id"
        ).fetchone()
        assert delivery is not None
        conn.execute(
            "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, "
            "duration_ms) VALUES (%s, 1, now(), 500, 3)",
            (delivery["id"],),
        )


def _refused(url: str, statement: str) -> None:
    with psycopg.connect(url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


@pytest.mark.usefixtures("closed_october")
@pytest.mark.parametrize("table", EVIDENCE)
def test_the_service_role_cannot_update_delete_or_truncate_evidence(
    database_url: str, owner_database_url: str, table: str
) -> None:
    with psycopg.connect(owner_database_url) as conn:
        before = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        count = before.fetchone()
    assert count is not None
    assert count[0] > 0, f"{table} has rows to protect"
    # Any column will do: no UPDATE at all is allowed (an identity column refuses by itself).
    with psycopg.connect(owner_database_url) as conn:
        column = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped AND attidentity = '' ORDER BY attnum LIMIT 1",
            (table,),
        ).fetchone()
    assert column is not None
    name, col = sql.Identifier(table), sql.Identifier(str(column[0]))
    for statement in (
        sql.SQL("UPDATE {} SET {} = {}").format(name, col, col),
        sql.SQL("DELETE FROM {}").format(name),
        sql.SQL("TRUNCATE {}").format(name),
        sql.SQL("TRUNCATE {} CASCADE").format(name),
    ):
        _refused(database_url, statement.as_string())
    with psycopg.connect(owner_database_url) as conn:
        after = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone()
    assert after == count


@pytest.mark.usefixtures("closed_october")
def test_partitions_and_chunks_are_no_way_around(
    database_url: str, owner_database_url: str
) -> None:
    """Plain mode's month partitions (and the default one) are tables of their own."""
    with psycopg.connect(owner_database_url) as conn:
        parts = [
            str(r[0])
            for r in conn.execute(
                "SELECT c.oid::regclass::text FROM pg_inherits i JOIN pg_class c "
                "ON c.oid = i.inhrelid WHERE i.inhparent IN "
                "('device_state_events'::regclass, 'heartbeats'::regclass)"
            )
        ]
    for part in parts:
        for statement in ("UPDATE {} SET time = time", "DELETE FROM {}", "TRUNCATE {}"):
            _refused(database_url, statement.format(part))


def test_privileges_are_exactly_what_the_service_needs(database_url: str) -> None:
    """Every table of the schema, including one a later migration adds: UPDATE and DELETE
    only where listed, TRUNCATE nowhere, owner of nothing."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """
            SELECT c.relname::text,
                   has_table_privilege(c.oid, 'SELECT') AS sel,
                   has_table_privilege(c.oid, 'INSERT') AS ins,
                   has_table_privilege(c.oid, 'UPDATE') AS upd,
                   has_table_privilege(c.oid, 'DELETE') AS del,
                   has_table_privilege(c.oid, 'TRUNCATE') AS trunc,
                   has_table_privilege(c.oid, 'REFERENCES, TRIGGER') AS ddl,
                   pg_has_role(c.relowner, 'USAGE') AS owner
            FROM pg_class c
            WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
              AND NOT c.relispartition
            """
        ).fetchall()
    tables = {str(r[0]): r[1:] for r in rows}
    assert set(EVIDENCE) | UPDATABLE <= set(tables)
    for table, (sel, ins, upd, dele, trunc, ddl, owner) in tables.items():
        assert sel, table
        meta = table.startswith("devmeter_")
        assert ins is not meta, table
        assert upd is (table in UPDATABLE), table
        assert dele is (table in DELETABLE), table
        assert not trunc, table
        assert not ddl, table
        assert not owner, table


@pytest.mark.parametrize("view", ["mqtt_device_credentials", "nats_device_credentials"])
def test_the_broker_syncs_read_their_credentials_as_the_service(
    database_url: str, view: str
) -> None:
    """`devmeter broker` and the NATS sync log in as the service role: it reads both views
    (migrations 0009, 0017). They join three tables, so nobody writes through them."""
    with psycopg.connect(database_url) as conn:
        conn.execute(sql.SQL("SELECT username, password_hash FROM {}").format(sql.Identifier(view)))
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute(
                sql.SQL("UPDATE {} SET password_hash = password_hash").format(sql.Identifier(view))
            )


@pytest.mark.usefixtures("closed_october")
def test_no_line_or_peak_after_the_closing_transaction(
    database_url: str, owner_database_url: str
) -> None:
    line = (
        "INSERT INTO statement_lines (statement_id, line_no, kind, description, quantity, "
        "unit_price, amount, corrects_month) "
        "SELECT id, 99, 'adjustment', 'late', 1, 1, 1, month FROM statements"
    )
    peak = (
        "INSERT INTO statement_peaks (statement_id, device_class, peak, peak_at, device_ids) "
        "SELECT id, 'wifi', 0, period_start, '{}' FROM statements"
    )
    # As the service role, which may INSERT into both tables: the trigger refuses. The owner
    # is refused as well.
    for url in (database_url, owner_database_url):
        for statement in (line, peak):
            with (
                psycopg.connect(url) as conn,
                pytest.raises(psycopg.errors.RestrictViolation, match="is final"),
            ):
                conn.execute(statement)
    with psycopg.connect(owner_database_url) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM statement_lines WHERE line_no = 99),"
            " (SELECT count(*) FROM statement_peaks WHERE device_class = 'wifi')"
        ).fetchone()
    assert counts == (0, 0)


def test_a_statement_cannot_claim_a_later_closing_transaction(database_url: str) -> None:
    """closed_xact is stamped by the database; a value given by the inserter is replaced."""
    worked_example(database_url)
    with psycopg.connect(database_url) as conn:
        xact = conn.execute("SELECT pg_current_xact_id()").fetchone()
        assert xact is not None
        row = conn.execute(
            "INSERT INTO statements (account_id, month, timezone, period_start, period_end, "
            "plan, currency, subtotal, amount_due, due_date, closed_by, closed_xact) "
            "SELECT id, '2026-09-01', 'Asia/Tokyo', '2026-08-31T15:00Z', '2026-09-30T15:00Z', "
            "'standard', 'JPY', 0, 0, '2026-10-31', 'test', "
            "(pg_current_xact_id()::text::bigint + 5)::text::xid8 FROM accounts "
            "RETURNING closed_xact = pg_current_xact_id() AS stamped"
        ).fetchone()
        assert row == (True,)
        # Lines in the closing transaction itself are what a close writes: accepted.
        conn.execute(
            "INSERT INTO statement_lines (statement_id, line_no, kind, description, quantity, "
            "unit_price, amount) SELECT id, 1, 'usage', 'x', 0, 0, 0 FROM statements"
        )


def test_the_service_role_cannot_become_another(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        me = conn.execute(
            "SELECT session_user::text, current_user::text, rolsuper, rolcreaterole, "
            "rolcreatedb, rolreplication, rolbypassrls, rolinherit "
            "FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert me == (SERVICE_ROLE, SERVICE_ROLE, False, False, False, False, False, False)
        # A member of no role: SET ROLE has nowhere to go, RESET ROLE nowhere to come back to.
        assert conn.execute(
            "SELECT count(*) FROM pg_auth_members WHERE member = current_user::regrole"
        ).fetchone() == (0,)
        for statement in (
            "SET ROLE postgres",
            "SET SESSION AUTHORIZATION postgres",
            # Would switch off every trigger (ordinary ones fire only in 'origin' mode).
            "SET session_replication_role = replica",
            "CREATE TABLE mine (x int)",
            "ALTER TABLE statements DISABLE TRIGGER statements_final",
            "DROP TRIGGER statement_lines_closed ON statement_lines",
            "ALTER TABLE device_state_events OWNER TO " + SERVICE_ROLE,
            "CREATE OR REPLACE FUNCTION devmeter_refuse_change() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        # Granting what it lacks is a warning ("no privileges were granted"), and grants nothing.
        conn.execute("GRANT UPDATE, DELETE, TRUNCATE ON device_state_events TO " + SERVICE_ROLE)
        assert conn.execute(
            "SELECT has_table_privilege('device_state_events', 'UPDATE, DELETE, TRUNCATE')"
        ).fetchone() == (False,)
        conn.execute("RESET ROLE")
        assert conn.execute("SELECT current_user::text").fetchone() == (SERVICE_ROLE,)
        owned = conn.execute(
            "SELECT (SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole)"
            " + (SELECT count(*) FROM pg_proc WHERE proowner = current_user::regrole)"
            " + (SELECT count(*) FROM pg_namespace WHERE nspowner = current_user::regrole)"
        ).fetchone()
        assert owned == (0,)


def test_the_cli_logs_in_as_the_service_role(cli: Cli, owner_database_url: str) -> None:
    """Given the owner's URL, every command but `migrate` logs in as the service role; and
    `migrate` grants again what the service role lacks."""
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("REVOKE INSERT ON accounts FROM {}").format(sql.Identifier(SERVICE_ROLE))
        )
    args = ("accounts", "create", "--ref", "acme", "--name", "ACME", "--plan", "standard")
    refused = cli(*args, "--country", "JP")
    assert refused.code != 0
    assert "permission denied for table accounts" in refused.stderr
    assert cli("migrate").code == 0
    created = cli(*args, "--country", "JP")
    assert created.code == 0, created.stderr


def test_partitions_are_made_by_the_owner_for_the_service(
    database_url: str, owner_database_url: str
) -> None:
    """Plain mode: the service calls devmeter_ensure_month_partitions, which creates and
    attaches tables it could not create itself, owned by the owner."""
    with psycopg.connect(owner_database_url) as conn:
        mode = conn.execute("SELECT value FROM devmeter_meta WHERE key = 'storage_mode'")
        row = mode.fetchone()
    if row != ("plain",):
        pytest.skip("TimescaleDB mode has no month partitions")
    start = datetime(2040, 1, 1, tzinfo=UTC)
    with psycopg.connect(database_url) as conn:
        made = conn.execute(
            "SELECT devmeter_ensure_month_partitions('heartbeats', %s, %s)",
            (start, datetime(2040, 2, 1, tzinfo=UTC)),
        ).fetchone()
        assert made == (1,)
        owner = conn.execute(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE relname = "
            "'heartbeats_p204001'"
        ).fetchone()
    assert owner is not None
    assert owner[0] != SERVICE_ROLE
