"""The ``devmeter`` command. Machine-readable JSON on stdout, one-line errors on stderr.

Exit codes: 0 done; 2 refused (bad input, unknown account, duplicate id, bad catalog...),
and nothing was changed; 1 failed (database unreachable, a bug). Modules are imported inside
commands so that ``devmeter --help`` stays fast and a command loads only what it uses.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click

from devmeter.errors import DevmeterError

if TYPE_CHECKING:
    import psycopg

    from devmeter.config import Settings
    from metering.catalog import Catalog

P = ParamSpec("P")
R = TypeVar("R")

EXIT_REFUSED = 2
EXIT_FAILED = 1


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date | Decimal):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def emit(value: object) -> None:
    click.echo(json.dumps(value, default=_json_default, ensure_ascii=False))


def fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    click.echo(f"devmeter: error: {message}", err=True)
    sys.exit(code)


def reports_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn expected failures into one line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import psycopg
        from pydantic import ValidationError

        from metering.catalog import CatalogError

        try:
            return func(*args, **kwargs)
        except (DevmeterError, CatalogError) as exc:
            code = EXIT_FAILED if getattr(exc, "status_code", 400) >= 500 else EXIT_REFUSED
            fail(str(exc), code)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]).upper()
            fail(f"DEVMETER_{where}: {first['msg']}")
        except psycopg.OperationalError as exc:
            fail(f"database: {str(exc).strip().splitlines()[0]}", EXIT_FAILED)

    return wrapper


def settings() -> Settings:
    from devmeter.config import Settings

    return Settings()


def catalog(config: Settings) -> Catalog:
    from metering.catalog import load_catalog

    return load_catalog(config.catalog)


@contextmanager
def transaction(config: Settings) -> Iterator[psycopg.Connection[dict[str, object]]]:
    """One unit of work: committed when the block ends, rolled back (nothing changed) on error."""
    from devmeter.db import connect

    with connect(config.service_database_url()) as conn, conn.transaction():
        yield conn


def _now() -> datetime:
    return datetime.now(UTC)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="devmeter")
def main() -> None:
    """devmeter: metering of active IoT devices, priced by plan tiers.

    Configuration comes from DEVMETER_* environment variables (DEVMETER_DATABASE_URL,
    DEVMETER_MQTT_URL, DEVMETER_CATALOG, DEVMETER_TIMEZONE). Commands print JSON.
    """


@main.command()
@reports_errors
def migrate() -> None:
    """Apply database migrations (safe to run twice, or from two processes at once).

    Runs as the owner DEVMETER_DATABASE_URL names; creates the service role
    (DEVMETER_SERVICE_ROLE, password DEVMETER_SERVICE_PASSWORD) that every other command
    logs in as, and grants it what the service needs.
    """
    from devmeter.migrate import migrate as run_migrations

    config = settings()
    result = run_migrations(
        config.require_database_url(),
        storage=config.storage,
        heartbeat_retention_days=config.heartbeat_retention_days,
        service_role=config.service_role,
        service_password=(
            config.service_password.get_secret_value() if config.service_password else None
        ),
    )
    click.echo(
        f"schema at version {result.current_version}; storage mode: {result.mode}"
        + (f" (timescaledb {result.timescaledb_version})" if result.timescaledb_version else "")
        + (f"; applied {', '.join(result.applied)}" if result.applied else "; nothing to apply"),
        err=True,
    )
    emit(
        {
            "storage_mode": result.mode,
            "version": result.current_version,
            "applied": result.applied,
            "timescaledb_version": result.timescaledb_version,
        }
    )


@main.group()
def accounts() -> None:
    """Accounts (operator)."""


@accounts.command("create")
@click.option("--ref", required=True, help="Operator-chosen id, e.g. acme.")
@click.option("--name", required=True, help="Display name.")
@click.option("--plan", required=True, help="Plan name from the catalog.")
@click.option("--country", required=True, help="ISO 3166 country code; selects the tax table.")
@click.option("--tz", "timezone", help="Billing time zone (IANA). Default: DEVMETER_TIMEZONE.")
@click.option(
    "--signed-up",
    metavar="DATE|ISO",
    help="Sign-up day (YYYY-MM-DD) or instant (ISO; without an offset, in the billing time "
    "zone): its month in that zone is the sign-up month (P5). Default: now.",
)
@click.option("--owner-email", help="The owner's e-mail address.")
@reports_errors
def accounts_create(
    ref: str,
    name: str,
    plan: str,
    country: str,
    timezone: str | None,
    signed_up: str | None,
    owner_email: str | None,
) -> None:
    """Create an account with its owner; prints the owner's API key (shown only this once)."""
    from zoneinfo import ZoneInfo

    from devmeter.config import validate_timezone
    from metering.registry import create_account

    config = settings()
    tz = timezone or config.timezone
    try:
        validate_timezone(tz)
    except ValueError as exc:
        fail(f"--tz: {exc}")
    signed_up_on = _local_instant("--signed-up", signed_up, tz).astimezone(ZoneInfo(tz)).date()
    plans = catalog(config)
    with transaction(config) as conn:
        created = create_account(
            conn,
            plans,
            ref=ref,
            name=name,
            plan=plan,
            country=country,
            timezone=tz,
            signed_up_on=signed_up_on,
            owner_email=owner_email,
        )
    emit({"ref": created.account.ref, "api_key": created.api_key, "account": created.account})


def _local_instant(option: str, value: str | None, tz: str) -> datetime:
    """``--at``: an ISO date-time; one without an offset (or a bare date: its midnight) is
    read in the account's time zone, since billing months are."""
    from zoneinfo import ZoneInfo

    if value is None:
        return _now()
    at = _parse_instant(option, value)
    if datetime.fromisoformat(value).tzinfo is None:
        at = at.replace(tzinfo=ZoneInfo(tz))
    return at


@accounts.command("set-plan")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@click.option("--plan", required=True, help="The new plan, from the catalog.")
@click.option(
    "--at",
    metavar="ISO",
    help="When the change takes effect (default: now; never in the future). Without an offset "
    "it is read in the account's time zone. A change at a month's first instant prices that "
    "month; later, the next month (P6).",
)
@reports_errors
def accounts_set_plan(account_ref: str, plan: str, at: str | None) -> None:
    """Change an account's plan: at once for the service, from the next month for billing."""
    from metering.plans import change_plan, history
    from metering.registry import get_account

    config = settings()
    with transaction(config) as conn:
        account = get_account(conn, account_ref)
        when = _local_instant("--at", at, account.timezone)
        result = change_plan(
            conn, catalog(config), account, plan, at=when, now=_now(), changed_by="cli"
        )
        emit({**asdict(result), "history": history(conn, account.id)})


@accounts.command("plans")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@reports_errors
def accounts_plans(account_ref: str) -> None:
    """The account's plan history, oldest first."""
    from metering.plans import history
    from metering.registry import get_account

    with transaction(settings()) as conn:
        account = get_account(conn, account_ref)
        emit({"account": account.ref, "plan": account.plan, "history": history(conn, account.id)})


@main.group()
def credits() -> None:
    """Credit points (operator): 1 point = 1 minor unit of the account's currency (P4)."""


@credits.command("grant")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@click.option("--points", required=True, type=int, help="Points to grant (a whole number > 0).")
@click.option("--reason", help="Why, for the ledger (e.g. 'campaign 2026-10').")
@click.option(
    "--expires",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="Last day the points pay for (inclusive, account time zone). Default: never.",
)
@click.option(
    "--at",
    metavar="ISO",
    help="When the grant is made (default: now; never in the future). Without an offset it is "
    "read in the account's time zone.",
)
@reports_errors
def credits_grant(
    account_ref: str, points: int, reason: str | None, expires: datetime | None, at: str | None
) -> None:
    """Grant credit points; at close they pay the amount after tax, oldest-expiring first."""
    from metering import credits as ledger
    from metering.registry import get_account

    config = settings()
    with transaction(config) as conn:
        account = get_account(conn, account_ref)
        entry = ledger.grant(
            conn,
            account,
            points=points,
            reason=reason,
            expires_on=expires.date() if expires else None,
            at=_local_instant("--at", at, account.timezone),
            now=_now(),
        )
        currency = catalog(config).plans[account.plan].currency
        balance = ledger.balance(conn, account, currency, now=_now())
    emit({"granted": ledger.entry_document(entry), **ledger.balance_document(balance)})


@credits.command("balance")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@reports_errors
def credits_balance(account_ref: str) -> None:
    """The account's credit balance and its ledger (every grant, use and expiry)."""
    from metering import credits as ledger
    from metering.registry import get_account

    config = settings()
    with transaction(config) as conn:
        account = get_account(conn, account_ref)
        currency = catalog(config).plans[account.plan].currency
        balance = ledger.balance(conn, account, currency, now=_now())
    emit(ledger.balance_document(balance))


@accounts.command("show")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@reports_errors
def accounts_show(account_ref: str) -> None:
    """Show an account: plan, status with its latest changes, payment method on file."""
    from metering.accounts import current_payment_method, status_changes
    from metering.registry import get_account

    with transaction(settings()) as conn:
        account = get_account(conn, account_ref)
        method = current_payment_method(conn, account.id)
        changes = status_changes(conn, account.id, limit=10)
    emit(
        {
            "account": account,
            "payment_method": _payment_method_json(method) if method else None,
            "status_changes": changes,
        }
    )


@accounts.command("set-payment-method")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@click.option(
    "--kind",
    required=True,
    type=click.Choice(["card", "invoice", "convenience_store"]),
    help="invoice: accounts in Japan only.",
)
@click.option(
    "--reference",
    required=True,
    help="The payment provider's token (e.g. pm_...), never a card number.",
)
@reports_errors
def accounts_set_payment_method(account_ref: str, kind: str, reference: str) -> None:
    """Put a payment method on file for an account (the previous one stays in its history).

    Setting the method already on file changes nothing ("changed": false).
    """
    from metering.accounts import set_payment_method

    with transaction(settings()) as conn:
        method, changed = set_payment_method(
            conn, account_ref=account_ref, kind=kind, reference=reference, at=_now(), source="cli"
        )
    emit({**_payment_method_json(method), "changed": changed})


def _payment_method_json(method: Any) -> dict[str, object]:
    return {
        "account": method.account_ref,
        "kind": method.kind,
        "reference": method.reference,
        "set_at": method.created_at,
        "source": method.source,
    }


@accounts.command("suspend")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@click.option("--reason", help="Why, e.g. 'payment not confirmed' (recorded with the change).")
@reports_errors
def accounts_suspend(account_ref: str, reason: str | None) -> None:
    """Suspend an account (SPEC A3): its devices cannot be registered or activated.

    Heartbeats are still stored, devices may still be deactivated, and its months still close.
    Suspending a suspended account changes nothing ("changed": false).
    """
    _set_account_status(account_ref, "suspended", reason)


@accounts.command("resume")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@click.option("--reason", help="Why, e.g. 'payment received' (recorded with the change).")
@reports_errors
def accounts_resume(account_ref: str, reason: str | None) -> None:
    """Resume a suspended account: registration and activation work again."""
    _set_account_status(account_ref, "active", reason)


def _set_account_status(account_ref: str, status: str, reason: str | None) -> None:
    from metering.accounts import set_account_status

    with transaction(settings()) as conn:
        result = set_account_status(
            conn,
            account_ref=account_ref,
            status="suspended" if status == "suspended" else "active",
            at=_now(),
            source="cli",
            reason=reason,
        )
    last = result.last_change
    emit(
        {
            "account": result.account.ref,
            "status": result.account.status,
            "changed": result.changed,
            "changed_at": last.changed_at if last else None,
            "reason": last.reason if last else None,
        }
    )


@main.group()
def devices() -> None:
    """Devices: register, activate/deactivate, list. Devices are never deleted."""


@devices.command("register")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@click.option("--class", "device_class", required=True, help="Device class, e.g. lte-m.")
@click.option("--id", "device_id", help="Device id (default: generated).")
@click.option(
    "--gateway-id",
    "--gateway",
    "gateway_id",
    help="Id of the gateway this device is bound to (--gateway: the same, older spelling).",
)
@click.option("--name", help="A name for people.")
@reports_errors
def devices_register(
    account_ref: str,
    device_class: str,
    device_id: str | None,
    gateway_id: str | None,
    name: str | None,
) -> None:
    """Register a device, Active from now; prints its key (shown only this once)."""
    from metering.registry import register_device

    config = settings()
    plans = catalog(config)
    with transaction(config) as conn:
        registered = register_device(
            conn,
            plans,
            account_ref=account_ref,
            device_class=device_class,
            device_id=device_id,
            gateway_id=gateway_id,
            name=name,
            at=_now(),
        )
    device = registered.device
    emit(
        {
            "id": device.id,
            "key": registered.key,
            "state": device.state,
            "registered_at": device.registered_at,
            "account": device.account_ref,
            "class": device.device_class,
            "gateway_id": device.gateway_id,
            "mqtt": _mqtt_connection(config, registered),
        }
    )


def _mqtt_connection(config: Settings, registered: Any) -> dict[str, object]:
    """How the device connects (shown once, with its key): docs/protocol.md."""
    from ingest.protocol import connection
    from metering.registry import GATEWAY_CLASS

    device = registered.device
    return dict(
        connection(
            config.device_mqtt_url(),
            device.account_ref,
            device.id,
            registered.key,
            is_gateway=device.device_class == GATEWAY_CLASS,
        )
    )


_DEVICE_ACCOUNT = click.option(
    "--account",
    "account_ref",
    help="Account ref of the device; needed when another account has a device of that id.",
)


@devices.command("set-state")
@click.option("--device", "device_id", required=True, help="Device id.")
@_DEVICE_ACCOUNT
@click.option("--state", required=True, type=click.Choice(["active", "inactive"]))
@reports_errors
def devices_set_state(device_id: str, account_ref: str | None, state: str) -> None:
    """Set a device Active or Inactive from now (records a state event if it changes)."""
    from metering.registry import resolve_device_account, set_device_state

    config = settings()
    with transaction(config) as conn:
        device = set_device_state(
            conn,
            device_id=device_id,
            account_id=resolve_device_account(conn, device_id, account_ref),
            state="active" if state == "active" else "inactive",
            at=_now(),
            source="cli",
        )
    emit(_device_json(device))


@devices.command("rotate-key")
@click.option("--device", "device_id", required=True, help="Device id.")
@_DEVICE_ACCOUNT
@reports_errors
def devices_rotate_key(device_id: str, account_ref: str | None) -> None:
    """Issue a new device key (shown only this once); the old key stops working at once.

    The broker refuses the old key within about a second, and closes a connection made with it.
    """
    from metering.registry import resolve_device_account, rotate_device_key

    config = settings()
    with transaction(config) as conn:
        rotated = rotate_device_key(
            conn,
            device_id=device_id,
            account_id=resolve_device_account(conn, device_id, account_ref),
            at=_now(),
        )
    emit(
        {
            **_device_json(rotated.device),
            "key": rotated.key,
            "mqtt": _mqtt_connection(config, rotated),
        }
    )


@devices.command("list")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@reports_errors
def devices_list(account_ref: str) -> None:
    """List an account's devices with their current state."""
    from metering.registry import list_devices

    config = settings()
    with transaction(config) as conn:
        found = list_devices(conn, account_ref)
    emit({"account": account_ref, "devices": [_device_json(d) for d in found]})


@devices.command("events")
@click.option("--device", "device_id", required=True, help="Device id.")
@_DEVICE_ACCOUNT
@reports_errors
def devices_events(device_id: str, account_ref: str | None) -> None:
    """Show a device's state timeline."""
    from metering.registry import device_events, resolve_device_account

    config = settings()
    with transaction(config) as conn:
        events = device_events(
            conn, device_id, resolve_device_account(conn, device_id, account_ref)
        )
    emit({"device": device_id, "events": events})


def _device_json(device: Any) -> dict[str, object]:
    return {
        "id": device.id,
        "account": device.account_ref,
        "class": device.device_class,
        "name": device.name,
        "gateway_id": device.gateway_id,
        "state": device.state,
        "state_at": device.state_at,
        "state_since": device.state_since,
        "registered_at": device.registered_at,
        "last_seen_at": device.last_seen_at,
        "key_prefix": device.key_prefix,
    }


@main.group(invoke_without_command=True)
@click.option(
    "--config",
    "base_config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Mosquitto configuration: listeners, TLS, persistence, limits (not authentication).",
)
@click.pass_context
@reports_errors
def broker(ctx: click.Context, base_config: Path | None) -> None:
    """Run Mosquitto with devices' keys and topic rights from the database (production).

    Devices connect with their own key and publish only their own topic; devmeter's ingest logs
    in with the password in DEVMETER_MQTT_URL. A registration or key rotation reaches the broker
    within about a second; Mosquitto is restarted if it dies. docs/protocol.md. With the
    subcommand `nats`, keep NATS's device users current instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    if base_config is None:
        raise click.UsageError("Missing option '--config' (or a subcommand: nats).")
    from devmeter.service import run_broker

    run_broker(settings(), base_config)


@broker.command("nats")
@click.option(
    "--once",
    is_flag=True,
    help="Write the file and reload the servers once, print what was done, and exit.",
)
@reports_errors
def broker_nats(once: bool) -> None:
    """Keep nats-server's device users and permissions current from the database.

    Writes DEVMETER_NATS_AUTH_FILE (nats.conf includes it: each device may publish its own
    heartbeat subject, nothing else) and reloads the servers of DEVMETER_NATS_PID_FILE when a
    registration or key rotation commits, until Ctrl-C. devmeter's ingest is admitted with the
    password in DEVMETER_NATS_URL. Devices registered before bcrypt hashes were stored reach
    NATS once their key is rotated; their number is logged.
    """
    from devmeter.service import nats_credential_sync, run_nats_credentials

    config = settings()
    if not once:
        run_nats_credentials(config)
        return
    sync = nats_credential_sync(config, config.service_database_url())
    started = time.perf_counter()
    written = sync.sync()
    emit(
        {
            "file": str(sync.auth_file),
            "devices": sync.devices,
            "without_nats_hash": sync.unhashed,
            "written": written,
            "servers_reloaded": sync.signalled if written else 0,
            "seconds": round(time.perf_counter() - started, 3),
        }
    )


@main.group(invoke_without_command=True)
@click.option("--client-id", help="MQTT client id (default: DEVMETER_INGEST_CLIENT_ID).")
# For `devmeter up`, which runs the worker as its child: stop (committing and acknowledging
# what is held) when up's end of our stdin closes, which happens however up ends.
@click.option("--stop-on-stdin-eof", is_flag=True, hidden=True)
@click.pass_context
@reports_errors
def ingest(ctx: click.Context, client_id: str | None, stop_on_stdin_eof: bool) -> None:
    """Run the ingest worker: MQTT heartbeats into the database, until Ctrl-C.

    DEVMETER_INGEST_SOURCE=jetstream reads them from NATS JetStream instead (DEVMETER_NATS_URL):
    several workers then share one durable consumer. With a subcommand (`gaps`, `replay`), do
    that instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    from devmeter.service import run_ingest

    config = settings()
    if client_id:
        config = config.model_copy(update={"ingest_client_id": client_id})
    run_ingest(config, stop_on_stdin_eof=stop_on_stdin_eof)


def _parse_since(value: str) -> datetime:
    return _parse_instant("--since", value)


def _parse_instant(option: str, value: str) -> datetime:
    from devmeter.errors import InvalidError

    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidError(
            f"{option}: {value!r} is not an ISO date or date-time", field=option.lstrip("-")
        ) from None
    # A bare date or a time without an offset is read in UTC, like the default.
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@ingest.command()
@click.option(
    "--since",
    metavar="ISO",
    required=True,
    help="Replay what the stream stored from this instant on (date or date-time; no offset "
    "means UTC).",
)
@reports_errors
def replay(since: str) -> None:
    """Write again what NATS JetStream holds since --since (DEVMETER_NATS_URL).

    Every message goes through the worker's processor and writer, which store a heartbeat
    once: what is already stored is skipped, what is missing (a restored backup, a rebuilt
    table) is stored with the state events it makes. Replaying twice stores nothing new.
    Progress goes to stderr; the totals are printed as JSON at the end.
    """
    from devmeter.service import jetstream_options
    from ingest.jetstream import ReplayProgress
    from ingest.jetstream import replay as run_replay

    start = _parse_since(since)
    config = settings()

    def progress(p: ReplayProgress) -> None:
        click.echo(
            f"replay: {p.messages} messages to stream sequence {p.sequence}, "
            f"{p.heartbeats} heartbeats stored, {p.duplicates} already there, "
            f"{p.rejections} refused",
            err=True,
        )

    done = run_replay(
        config.service_database_url(), jetstream_options(config), start, progress=progress
    )
    emit(
        {
            "since": start,
            "messages": done.messages,
            "heartbeats_stored": done.heartbeats,
            "already_stored": done.duplicates,
            "refused": done.rejections,
            "end_sequence": done.end_sequence,
        }
    )


@ingest.command()
@click.option("--account", "account_ref", required=True, help="Account ref.")
@click.option(
    "--since",
    metavar="ISO",
    help="Heartbeats from this instant on (date or date-time; no offset means UTC). "
    "Default: the start of the current month, UTC.",
)
@reports_errors
def gaps(account_ref: str, since: str | None) -> None:
    """Devices whose message sequence (seq) skipped: heartbeats that never arrived."""
    from ingest.gaps import find_seq_gaps, start_of_month

    start = _parse_since(since) if since else start_of_month(_now())
    config = settings()
    with transaction(config) as conn:
        found = find_seq_gaps(conn, account_ref, start)
    emit(
        {
            "account": account_ref,
            "since": start,
            "missing": sum(g.missing for g in found),
            "devices": found,
        }
    )


@main.group()
def rejections() -> None:
    """Heartbeats the ingest worker refused (the quarantine): why, and what was sent."""


@rejections.command("list")
@click.option(
    "--account",
    "account_ref",
    help="Account ref: rejections about its devices (default: every rejection).",
)
@click.option(
    "--unattributed",
    is_flag=True,
    help="Only rejections whose topic names no registered device (unknown topics and "
    "devices), which belong to no account.",
)
@click.option("--reason", help="Only this reason (docs/protocol.md, What is refused).")
@click.option("--device", "device_id", help="Only this device of the account.")
@click.option(
    "--since", metavar="ISO", help="Received at or after (date or date-time; no offset: UTC)."
)
@click.option("--until", metavar="ISO", help="Received before (date or date-time; no offset: UTC).")
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many (1-500).")
@click.option("--cursor", help="The next_cursor of the previous page: older rejections.")
@reports_errors
def rejections_list(
    account_ref: str | None,
    unattributed: bool,
    reason: str | None,
    device_id: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None,
) -> None:
    """Refused heartbeats, newest first, with a count per reason over the same window.

    Payloads are text when they are UTF-8, else base64 (payload_encoding), cut at 4 KiB
    (payload_truncated).
    """
    from devmeter.errors import InvalidError
    from ingest.rejections import EVERY, UNATTRIBUTED, RejectionFilter, Scope, list_rejections
    from metering.registry import get_account

    if account_ref is not None and unattributed:
        raise InvalidError("give --account REF or --unattributed, not both", field="account")
    filters = RejectionFilter(
        reason=reason,
        device_id=device_id,
        since=_parse_since(since) if since else None,
        until=_parse_instant("--until", until) if until else None,
    )
    with transaction(settings()) as conn:
        scope: Scope = (
            get_account(conn, account_ref).id
            if account_ref is not None
            else UNATTRIBUTED
            if unattributed
            else EVERY
        )
        page = list_rejections(conn, scope, filters, cursor=cursor, limit=limit)
    emit(
        {
            "account": account_ref,
            "items": page.items,
            "next_cursor": page.next_cursor,
            "summary": page.summary,
            "summary_complete": page.summary_complete,
        }
    )


def _month_option(help_text: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    return click.option("--month", required=True, metavar="YYYY-MM", help=help_text)


@main.command()
@click.option("--account", "account_ref", required=True, help="Account ref.")
@_month_option("Billing month in the account's time zone.")
@click.option("--evidence", is_flag=True, help="Also list the devices that made up each peak.")
@reports_errors
def usage(account_ref: str, month: str, evidence: bool) -> None:
    """Peak active devices per class of a month: preliminary while open, final once closed."""
    from metering.statements import get_usage, usage_document

    config = settings()
    with transaction(config) as conn:
        result = get_usage(conn, catalog(config), account_ref, month, now=_now(), evidence=evidence)
    emit(usage_document(result, evidence=evidence))


@main.command()
@click.option("--account", "account_ref", required=True, help="Account ref.")
@_month_option("Billing month in the account's time zone.")
@click.option("--evidence", is_flag=True, help="Also list the devices that made up each peak.")
@reports_errors
def statement(account_ref: str, month: str, evidence: bool) -> None:
    """The priced statement of a month (preliminary while the month is open)."""
    from metering.statements import get_statement, statement_document

    config = settings()
    with transaction(config) as conn:
        result = get_statement(
            conn, catalog(config), account_ref, month, now=_now(), evidence=evidence
        )
    emit(statement_document(result, evidence=evidence))


@main.command()
@_month_option("The month to close, in each account's time zone.")
@click.option("--account", "account_ref", help="Close only this account (default: all).")
@reports_errors
def close(month: str, account_ref: str | None) -> None:
    """Close a month: final peaks, priced lines, due date. Closing twice changes nothing.

    A month is closed only after it has ended in the account's time zone plus the grace
    period for late heartbeats (DEVMETER_CLOSE_GRACE_MINUTES, default 120).
    """
    from datetime import timedelta

    from devmeter.db import connect
    from metering.scheduler import webhook_outbox
    from metering.statements import close_month

    config = settings()
    url = config.service_database_url()
    report = close_month(
        lambda: connect(url),
        catalog(config),
        month,
        now=_now(),
        account_ref=account_ref,
        grace=timedelta(minutes=config.close_grace_minutes),
        on_closed=webhook_outbox(config.webhook_url),
    )
    emit(report)
    if report.failed:
        fail(
            f"{len(report.failed)} account(s) failed to close (recorded, retried by the "
            f"scheduler): {', '.join(sorted(report.failed))}",
            EXIT_FAILED,
        )


@main.command()
@click.option("--account", "account_ref", default="demo", show_default=True, help="Account ref.")
@reports_errors
def demo(account_ref: str) -> None:
    """The SPEC's worked example as an account: a month of history, 1,000 credit points, closed.

    Prints the owner's API key (shown once: sign in to the console with it) and the closed
    statement: subtotal 3,500, tax 350, credit points 1,000, amount due 2,850.
    """
    from datetime import timedelta

    from devmeter.db import connect
    from metering.demo import create_demo
    from metering.statements import get_statement, statement_document

    config = settings()
    url = config.service_database_url()
    plans = catalog(config)
    made = create_demo(
        lambda: connect(url),
        plans,
        ref=account_ref,
        now=_now(),
        grace=timedelta(minutes=config.close_grace_minutes),
    )
    with transaction(config) as conn:
        statement = get_statement(conn, plans, made.account, made.month, now=_now())
    emit(
        {
            "account": made.account,
            "owner_key": made.owner_key,
            "month": made.month,
            "statement": statement_document(statement),
        }
    )


@main.group()
def webhooks() -> None:
    """Statement deliveries to billing (DEVMETER_WEBHOOK_URL): list them, retry failed ones."""


@webhooks.command("list")
@click.option("--status", type=click.Choice(["pending", "delivered", "failed"]), help="Only these.")
@click.option("--month", help="Only statements of this month (YYYY-MM).")
@click.option("--account", "account_ref", help="Only this account's statements.")
@reports_errors
def webhooks_list(status: str | None, month: str | None, account_ref: str | None) -> None:
    """Deliveries with their latest attempt, one JSON object per line."""
    from metering.webhook import list_deliveries

    with transaction(settings()) as conn:
        for delivery in list_deliveries(conn, status=status, month=month, account_ref=account_ref):
            emit(delivery)


@webhooks.command("retry")
@click.option("--month", help="Failed deliveries of this month's statements (YYYY-MM).")
@click.option("--account", "account_ref", help="Failed deliveries of this account.")
@click.option(
    "--delivery", "ids", type=int, multiple=True, help="This failed delivery (repeatable)."
)
@click.option(
    "--url",
    help="Send to this URL instead of the one each delivery had (e.g. billing moved; pass "
    "the new DEVMETER_WEBHOOK_URL).",
)
@reports_errors
def webhooks_retry(
    month: str | None, account_ref: str | None, ids: tuple[int, ...], url: str | None
) -> None:
    """Send failed deliveries again: due now, with a fresh allowance of attempts.

    The scheduler (devmeter scheduler, or devmeter up) sends them on its next run. Filters
    combine; at least one is needed.
    """
    from metering.webhook import retry_failed

    with transaction(settings()) as conn:
        retried = retry_failed(
            conn, now=_now(), month=month, account_ref=account_ref, ids=list(ids), url=url
        )
    emit({"retried": retried})
    if not retried:
        click.echo("devmeter: no failed delivery matched", err=True)


@main.command()
@_month_option("The closed month to export.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl", "cloudevents"]),
    default="csv",
    show_default=True,
    help="cloudevents: one CloudEvent 1.0 per statement line, JSON Lines (OpenMeter ingests it).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write here (default: stdout).",
)
@reports_errors
def export(month: str, fmt: str, out: Path | None) -> None:
    """Export a closed month's statements for billing (same month, same bytes).

    With --out, the file is written whole or not at all and a JSON summary (export id,
    SHA-256, rows) goes to stdout; without, the export goes to stdout and the summary to stderr.
    A month not closed yet is refused with the instant from which `devmeter close` can close it.
    """
    import os
    from datetime import timedelta

    from metering.export import export_month

    config = settings()
    with transaction(config) as conn:
        result = export_month(
            conn,
            month,
            fmt,
            now=_now(),
            grace=timedelta(minutes=config.close_grace_minutes),
        )
    summary = {
        "export_id": result.export_id,
        "month": result.month,
        "format": result.format,
        "layout": result.layout,
        "sha256": result.sha256,
        "rows": result.rows,
        "statements": result.statements,
    }
    if out is None:
        sys.stdout.buffer.write(result.body)
        sys.stdout.flush()
        click.echo(json.dumps(summary), err=True)
        return
    partial = out.with_name(f".{out.name}.partial")
    partial.write_bytes(result.body)
    os.replace(partial, out)
    emit({**summary, "file": str(out)})


@main.command()
@click.option("--host", help="Address to listen on (default: DEVMETER_API_HOST, 127.0.0.1).")
@click.option(
    "--port", type=click.IntRange(0, 65535), help="Port (default: DEVMETER_API_PORT, 8000)."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Processes serving the port (default: DEVMETER_API_WORKERS, 1). Production: about "
    "one per core; needs DEVMETER_DATABASE_URL.",
)
@reports_errors
def api(host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the REST API (/v1) and the developer console (/console) with uvicorn."""
    from devmeter.service import run_api, run_api_workers

    config = settings()
    updates: dict[str, object] = {}
    if host:
        updates["api_host"] = host
    if port is not None:
        updates["api_port"] = port
    if updates:
        config = config.model_copy(update=updates)
    count = workers or config.api_workers
    if count > 1:
        run_api_workers(config, count)
    else:
        run_api(config)


@main.command()
@reports_errors
def scheduler() -> None:
    """Run the scheduler alone: closes due months (and pushes webhooks), until Ctrl-C."""
    from devmeter.service import run_scheduler

    run_scheduler(settings())


@main.command("import")
@click.option(
    "--devices",
    "devices_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV: device_id,account,class,registered_at[,gateway]",
)
@click.option(
    "--events",
    "events_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV: time,device_id,state[,source]",
)
@reports_errors
def import_(devices_path: Path | None, events_path: Path | None) -> None:
    """Import device history from another system (all or nothing).

    Registration rows become active events at registered_at. Times are ISO 8601 with an
    offset. A bad row refuses the whole import with its file, line number and reason.
    """
    from metering.importer import import_history

    if devices_path is None and events_path is None:
        raise click.UsageError("give --devices, --events or both")
    config = settings()
    bars: dict[str, Any] = {}

    def progress(label: str, done: int, total: int) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = click.progressbar(
                length=total, label=f"importing {label}", file=sys.stderr, show_pos=False
            )
            bar.__enter__()
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)
            # Reading is done; the write that follows can take as long again.
            click.echo(f"{label}: read and checked; writing to the database...", err=True)

    try:
        with transaction(config) as conn:
            result = import_history(
                conn, catalog(config), devices=devices_path, events=events_path, progress=progress
            )
    finally:
        for bar in bars.values():
            if not bar.finished:
                bar.__exit__(None, None, None)
    emit(result)


def _rate(value: str) -> float:
    text = value.removesuffix("/s")
    try:
        rate = float(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a rate such as 500/s") from None
    if not rate >= 0 or rate == float("inf"):
        raise click.BadParameter(f"{value!r} must be a finite rate >= 0 (0: as fast as possible)")
    return rate


@main.command()
@click.option("--devices", type=click.IntRange(1, 1_000_000), required=True, help="Fleet size.")
@click.option(
    "--rate",
    "rate_text",
    default="100/s",
    show_default=True,
    help="Messages per second, e.g. 500/s; 0 publishes as fast as the broker acknowledges.",
)
@click.option(
    "--gateways",
    type=click.IntRange(0, 10_000),
    default=0,
    show_default=True,
    help="Gateways; --gateway-share of the devices are bound to them and reported in batches.",
)
@click.option(
    "--gateway-share",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Share of the devices bound to gateways (when there are gateways).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to run (default: until Ctrl-C).",
)
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many messages.")
@click.option(
    "--account",
    "account_ref",
    default="sim",
    show_default=True,
    help="Account ref (created if missing).",
)
@click.option("--class", "device_class", default="lte-m", show_default=True, help="Device class.")
@click.option(
    "--prefix", default="sim", show_default=True, help="Device id prefix (ids are reused)."
)
@click.option(
    "--bad-share",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help="Share of deliberately bad messages (each kind lands in quarantine).",
)
@click.option(
    "--flip-share",
    type=click.FloatRange(0, 1),
    default=0.02,
    show_default=True,
    help="Chance that a device changes state at each heartbeat.",
)
@click.option("--seed", type=int, help="Random seed, for a reproducible stream.")
@click.option(
    "--auth",
    type=click.Choice(["auto", "device", "anonymous"]),
    default="auto",
    show_default=True,
    help="device: each device (or gateway) connects as itself, username = client id = "
    "<account>/<device>, its key as password; anonymous: one connection publishes for all "
    "(brokers without authentication: tests, benchmarks); auto: device when the MQTT URL "
    "names a user or the broker refuses an anonymous probe connection, else anonymous.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=4000,
    show_default=True,
    help="With --auth device: connections open at once (also capped by the open-file limit); "
    "past it the least recently used idle one is closed, so a bigger fleet connects, publishes "
    "and disconnects (one connection per message: about 5x slower).",
)
@reports_errors
def simulate(
    devices: int,
    rate_text: str,
    gateways: int,
    gateway_share: float,
    duration: float | None,
    count: int | None,
    account_ref: str,
    device_class: str,
    prefix: str,
    bad_share: float,
    flip_share: float,
    seed: int | None,
    auth: str,
    max_connections: int,
) -> None:
    """Publish realistic heartbeats for a simulated fleet (registers the devices first).

    \b
    Example: devmeter simulate --devices 1000 --gateways 10 --rate 500/s --duration 60
    Progress goes to stderr every second; a JSON summary to stdout at the end.

    \b
    Under device authentication (--auth) every direct device and every gateway publishes
    over its own connection with its own key; bound devices travel in their gateway's
    messages. The simulator knows the keys of the devices it registers; devices registered
    by an earlier run get a new key (rotated, said on stderr), as it cannot know the old one.
    Keys are never printed. Bad messages go out as the device they concern: a wrong topic is
    refused by the broker (counted in refused_by_broker), an unknown device is reported as a
    gateway's unknown child (or, without gateways, is refused at connection).
    """
    import secrets as _secrets
    import signal
    import threading
    import time

    from ingest.simulate import (
        DevicePublisher,
        Publisher,
        Sink,
        Traffic,
        choose_auth,
        ensure_account,
        ensure_fleet,
        run_traffic,
        speaker_keys,
        wait_admitted,
    )

    rate = _rate(rate_text)
    config = settings()
    url = config.require_mqtt_url()
    try:
        mode = choose_auth(url, auth)
    except ConnectionError as exc:
        fail(str(exc), EXIT_FAILED)
    keys: dict[str, str] = {}
    rotated = 0
    with transaction(config) as conn:
        owner_key = ensure_account(conn, catalog(config), account_ref, _now())
        fleet, new = ensure_fleet(
            conn,
            catalog(config),
            account_ref=account_ref,
            device_class=device_class,
            prefix=prefix,
            devices=devices,
            gateways=gateways,
            gateway_share=gateway_share,
            at=_now(),
            progress=lambda done, total: click.echo(
                f"registering devices: {done}/{total}", err=True
            ),
            keys=keys,
        )
        if mode == "device":
            rotated = speaker_keys(
                conn,
                fleet,
                keys,
                at=_now(),
                progress=lambda done, total: click.echo(
                    f"rotating device keys: {done}/{total}", err=True
                ),
            )
    if owner_key:
        click.echo(
            f"created account {account_ref!r}; its owner's API key (shown once, signs in to the "
            f"console): {owner_key}",
            err=True,
        )
    click.echo(
        f"fleet {prefix!r} of account {account_ref!r}: {devices} devices, {gateways} gateways "
        f"({new} newly registered); publishing to {url.split('@')[-1]} at "
        + (f"{rate:g}/s" if rate else "full speed")
        + (
            " as the devices themselves (one connection each)"
            if mode == "device"
            else " over one anonymous connection"
        ),
        err=True,
    )
    if rotated:
        click.echo(
            f"rotated the keys of {rotated} devices registered by an earlier run (the simulator "
            "publishes as them and cannot know their old keys); their previous keys no longer "
            "work",
            err=True,
        )
    publisher: Sink
    try:
        if mode == "device":
            speakers = [*fleet.direct(), *fleet.gateways]
            # Every key was issued in the transaction above: wait for the broker to know them.
            waited = wait_admitted(url, account_ref, speakers[0], keys[speakers[0]])
            if waited > 0.5:
                click.echo(f"the broker admitted the new keys after {waited:.1f} s", err=True)
            publisher = DevicePublisher(url, account_ref, keys, max_connections=max_connections)
        else:
            publisher = Publisher(url, client_id=f"devmeter-sim-{_secrets.token_hex(4)}")
    except ConnectionError as exc:
        fail(str(exc), EXIT_FAILED)
    traffic = Traffic(
        fleet,
        flip_share=flip_share,
        bad_share=bad_share,
        seed=seed,
        as_devices=mode == "device",
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.monotonic()

    def report(sent: int, elapsed: float) -> None:
        click.echo(
            f"{elapsed:6.1f}s  sent {sent}  acked {publisher.acked}  {sent / elapsed:,.0f} msg/s",
            err=True,
        )

    try:
        result = run_traffic(
            publisher,
            traffic,
            rate=rate,
            count=count,
            duration=duration,
            stop=stop,
            progress=report,
        )
    except (ConnectionError, TimeoutError) as exc:
        fail(str(exc), EXIT_FAILED)
    finally:
        publisher.close()
    tally = traffic.tally
    extra: dict[str, object] = {}
    if isinstance(publisher, DevicePublisher):
        extra = {
            "connections": publisher.connections,
            "refused_connections": publisher.refused_connections,
            "keys_rotated": rotated,
        }
    emit(
        {
            "account": account_ref,
            "devices": devices,
            "gateways": gateways,
            "auth": mode,
            "messages": result.published,
            # PUBACK success: the broker has them. Refusals (PUBACK >= 0x80, or a refused
            # connection) are counted apart, by reason.
            "acknowledged": result.acked,
            "refused_by_broker": dict(sorted(result.refused.items())),
            "unconfirmed": result.unconfirmed,
            **extra,
            "heartbeats": tally.heartbeats,
            "state_flips": tally.flips,
            "bad_messages": dict(sorted(tally.bad.items())),
            "seconds": round(time.monotonic() - started, 3),
            "rate": round(result.published / result.seconds, 1) if result.seconds else 0.0,
        }
    )


@main.command()
@reports_errors
def up() -> None:
    """Run the service: migrations, then everything devmeter has, until Ctrl-C.

    With DEVMETER_DATABASE_URL / DEVMETER_MQTT_URL unset, starts an embedded PostgreSQL and
    MQTT broker under DEVMETER_DATA_DIR (default ./.devmeter) and says so.
    """
    from devmeter.service import run_up

    run_up(settings())


def _register_groups() -> None:
    # Imported here, once ``main`` and the helpers above exist: the groups' module uses them.
    from devmeter.commands.contracts import charges, contracts

    main.add_command(contracts)
    main.add_command(charges)


_register_groups()


def run(argv: list[str] | None = None) -> None:
    """Entry point: click's standalone mode, but every error is one line (exit 2: refused)."""
    try:
        result = main.main(args=argv, prog_name="devmeter", standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "devmeter"
        fail(f"{exc.format_message()} (see '{where} --help')")
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        fail("aborted", EXIT_FAILED)
    sys.exit(result if isinstance(result, int) else 0)
