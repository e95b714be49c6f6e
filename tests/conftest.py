from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from devmeter.config import SERVICE_ROLE
from tests.servers import Server, mqtt_server, postgres_server

REPO = Path(__file__).resolve().parent.parent

#: The service role's password in every test database. Roles belong to the whole cluster,
#: which every xdist worker shares: one role, one password, set by each template migration.
SERVICE_PASSWORD = "devmeter-test-service-role"


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # getbasetemp().parent is shared by all xdist workers of this run.
    shared = tmp_path_factory.getbasetemp().parent
    with postgres_server(shared) as server:
        yield server


@pytest.fixture(scope="session")
def mqtt_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mqtt_server(tmp_path_factory.mktemp("broker")) as server:
        yield server.url


def _admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> Iterator[str]:
    """A migrated database that each test's database is cloned from (fast: a file copy)."""
    from devmeter.migrate import migrate

    name = f"devmeter_tmpl_{_worker()}_{os.getpid()}"
    with _admin(pg_server.url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate(make_conninfo(pg_server.url, dbname=name), service_password=SERVICE_PASSWORD)
    yield name
    with _admin(pg_server.url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


_counter = itertools.count()


@pytest.fixture
def owner_database_url(pg_server: Server, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test, dropped afterwards; the superuser's URL, for
    a test that reaches behind the service (tampering, DDL, its own triggers)."""
    name = f"devmeter_test_{_worker()}_{os.getpid()}_{next(_counter)}"
    with _admin(pg_server.url) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    yield make_conninfo(pg_server.url, dbname=name)
    with _admin(pg_server.url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def database_url(owner_database_url: str) -> str:
    """The same database as the service logs in to it: as the service role, which owns nothing
    and holds only devmeter/service_role.sql's grants. What app code gets in tests."""
    from devmeter.db import service_url

    return service_url(owner_database_url, SERVICE_ROLE, SERVICE_PASSWORD)


@pytest.fixture
def empty_database_url(pg_server: Server) -> Iterator[str]:
    """A fresh database with no schema, for testing migrations themselves."""
    name = f"devmeter_empty_{_worker()}_{os.getpid()}_{next(_counter)}"
    with _admin(pg_server.url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(pg_server.url, dbname=name)
    with _admin(pg_server.url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> object:
        import json

        return json.loads(self.stdout)


@dataclass(frozen=True)
class Cli:
    """Runs the real `devmeter` command in a subprocess, as a person or a script would."""

    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str, timeout: float = 60) -> CliResult:
        proc = subprocess.run(
            [sys.executable, "-m", "devmeter", *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)


@dataclass(frozen=True)
class InProcessCli(Cli):
    """The same `devmeter` entry point run in this process, in click's test isolation (its own
    stdout, stderr and environment): for tests that make dozens of calls, where a process
    each (~1 s of start-up and imports) made them the suite's slowest. What needs a process
    of its own (two commands racing, signals, a server) keeps using ``Cli``."""

    def __call__(self, *args: str, timeout: float = 60) -> CliResult:
        del timeout  # only a process of its own can be stopped from outside
        from click.testing import CliRunner

        from devmeter.cli import run

        # As the subprocess would see it: the given DEVMETER_ variables and no others.
        env: dict[str, str | None] = {
            k: None for k in os.environ if k.startswith("DEVMETER_") and k not in self.env
        }
        env.update({k: v for k, v in self.env.items() if k.startswith("DEVMETER_")})
        with CliRunner().isolation(env=env) as (out, err, _):
            try:
                run(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            return CliResult(code, out.getvalue().decode(), err.getvalue().decode())


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMETER_")}
    env["DEVMETER_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture
def cli(cli_env: dict[str, str], owner_database_url: str, tmp_path: Path) -> Cli:
    # The owner's URL, as an operator gives `devmeter up` a superuser URL: every command but
    # `migrate` derives the service role's from it (devmeter/config.py).
    return Cli(
        {
            **cli_env,
            "DEVMETER_DATABASE_URL": owner_database_url,
            "DEVMETER_SERVICE_PASSWORD": SERVICE_PASSWORD,
        },
        tmp_path,
    )


#: A plan that needs a payment method on file before devices can be registered (SPEC A2), for
#: the tests' catalogs; the shipped catalog has none.
PRO_PLAN = """
[plans.pro]
currency = "JPY"
base_fee = "5000"
payment_method_required = true

[plans.pro.classes.lte-m]
mode = "graduated"
tiers = [ { up_to = 10, price = "280" }, { price = "230" } ]

[plans.pro.classes.gateway]
mode = "graduated"
tiers = [ { price = "450" } ]
"""


@pytest.fixture
def pro_catalog_path(tmp_path: Path) -> Path:
    """The shipped catalog plus plan `pro` (PRO_PLAN), as a file for DEVMETER_CATALOG."""
    from metering.catalog import DEFAULT_CATALOG_PATH

    path = tmp_path / "catalog-with-pro.toml"
    path.write_text(DEFAULT_CATALOG_PATH.read_text(encoding="utf-8") + PRO_PLAN, encoding="utf-8")
    return path


def seed_fleet(
    url: str,
    devices: Iterable[tuple[str, str, str | None]],
    at: datetime,
    *,
    signed_up_on: date = date(2026, 1, 1),
) -> None:
    """The SPEC's example account (`acme`, plan standard, Japan) with devices registered at `at`.

    `devices` are (id, class, gateway id or None), in registration order.
    """
    from devmeter.db import connect
    from metering.catalog import load_catalog
    from metering.registry import create_account, register_device

    catalog = load_catalog()
    with connect(url) as conn, conn.transaction():
        create_account(
            conn,
            catalog,
            ref="acme",
            name="ACME",
            plan="standard",
            country="JP",
            timezone="Asia/Tokyo",
            signed_up_on=signed_up_on,
        )
        for device_id, device_class, gateway_id in devices:
            register_device(
                conn,
                catalog,
                account_ref="acme",
                device_class=device_class,
                device_id=device_id,
                gateway_id=gateway_id,
                at=at,
            )
