"""The ``devmeter`` command. Machine-readable JSON on stdout, one-line errors on stderr.

Exit codes: 0 done; 2 refused (bad input, unknown account, duplicate id, bad catalog...),
and nothing was changed; 1 failed (database unreachable, a bug). Modules are imported inside
commands so that ``devmeter --help`` stays fast and a command loads only what it uses.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
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

    with connect(config.require_database_url()) as conn, conn.transaction():
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
    """Apply database migrations (safe to run twice, or from two processes at once)."""
    from devmeter.migrate import migrate as run_migrations

    config = settings()
    result = run_migrations(
        config.require_database_url(),
        storage=config.storage,
        heartbeat_retention_days=config.heartbeat_retention_days,
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
    type=click.DateTime(formats=["%Y-%m-%d"]),
    help="Sign-up date (YYYY-MM-DD). Default: today in the billing time zone.",
)
@click.option("--owner-email", help="The owner's e-mail address.")
@reports_errors
def accounts_create(
    ref: str,
    name: str,
    plan: str,
    country: str,
    timezone: str | None,
    signed_up: datetime | None,
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
    signed_up_on = signed_up.date() if signed_up else _now().astimezone(ZoneInfo(tz)).date()
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


@main.group()
def devices() -> None:
    """Devices: register, activate/deactivate, list. Devices are never deleted."""


@devices.command("register")
@click.option("--account", "account_ref", required=True, help="Account ref.")
@click.option("--class", "device_class", required=True, help="Device class, e.g. lte-m.")
@click.option("--id", "device_id", help="Device id (default: generated).")
@click.option("--gateway", "gateway_id", help="Id of the gateway this device is bound to.")
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
            "gateway": device.gateway_id,
        }
    )


@devices.command("set-state")
@click.option("--device", "device_id", required=True, help="Device id.")
@click.option("--state", required=True, type=click.Choice(["active", "inactive"]))
@reports_errors
def devices_set_state(device_id: str, state: str) -> None:
    """Set a device Active or Inactive from now (records a state event)."""
    from metering.registry import set_device_state

    config = settings()
    with transaction(config) as conn:
        device = set_device_state(
            conn,
            device_id=device_id,
            state="active" if state == "active" else "inactive",
            at=_now(),
            source="cli",
        )
    emit(_device_json(device))


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
@reports_errors
def devices_events(device_id: str) -> None:
    """Show a device's state timeline."""
    from metering.registry import device_events

    config = settings()
    with transaction(config) as conn:
        events = device_events(conn, device_id)
    emit({"device": device_id, "events": events})


def _device_json(device: Any) -> dict[str, object]:
    return {
        "id": device.id,
        "account": device.account_ref,
        "class": device.device_class,
        "name": device.name,
        "gateway": device.gateway_id,
        "state": device.state,
        "state_at": device.state_at,
        "registered_at": device.registered_at,
        "last_seen_at": device.last_seen_at,
        "key_prefix": device.key_prefix,
    }


@main.command()
@click.option("--client-id", help="MQTT client id (default: DEVMETER_INGEST_CLIENT_ID).")
@reports_errors
def ingest(client_id: str | None) -> None:
    """Run the ingest worker: MQTT heartbeats into the database, until Ctrl-C."""
    from devmeter.service import run_ingest

    config = settings()
    if client_id:
        config = config.model_copy(update={"ingest_client_id": client_id})
    run_ingest(config)


@main.command()
@reports_errors
def up() -> None:
    """Run the service: migrations, then everything devmeter has, until Ctrl-C.

    With DEVMETER_DATABASE_URL / DEVMETER_MQTT_URL unset, starts an embedded PostgreSQL and
    MQTT broker under DEVMETER_DATA_DIR (default ./.devmeter) and says so.
    """
    from devmeter.service import run_up

    run_up(settings())


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
