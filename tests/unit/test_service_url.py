"""Which role the service's connections log in as (devmeter/db.py, devmeter/config.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic import SecretStr, ValidationError

from devmeter.config import Settings
from devmeter.db import service_url

OWNER = "postgresql://postgres:secret@db.example:5433/devmeter?sslmode=require"


@pytest.mark.parametrize(
    ("url", "password", "expected"),
    [
        # An owner's (or superuser's) URL: user and password replaced, the rest kept.
        (
            OWNER,
            "svc-pw",
            {"user": "devmeter_service", "password": "svc-pw", "host": "db.example",
             "port": "5433", "dbname": "devmeter", "sslmode": "require"},
        ),
        # No service password: none at all, never the owner's.
        (
            OWNER,
            None,
            {"user": "devmeter_service", "host": "db.example", "port": "5433",
             "dbname": "devmeter", "sslmode": "require"},
        ),
        # A URL naming no user gets the service role.
        ("postgresql://127.0.0.1/devmeter", None,
         {"user": "devmeter_service", "host": "127.0.0.1", "dbname": "devmeter"}),
        # Already the service role: kept; its own password wins over the setting.
        ("postgresql://devmeter_service:own@h/d", "other",
         {"user": "devmeter_service", "password": "own", "host": "h", "dbname": "d"}),
        ("postgresql://devmeter_service@h/d", "svc-pw",
         {"user": "devmeter_service", "password": "svc-pw", "host": "h", "dbname": "d"}),
    ],
)  # fmt: skip
def test_service_url(url: str, password: str | None, expected: dict[str, str]) -> None:
    assert conninfo_to_dict(service_url(url, "devmeter_service", password)) == expected


def test_settings_derive_the_service_url(tmp_path: Path) -> None:
    config = Settings(
        database_url=OWNER,
        service_role="billing_app",
        service_password=SecretStr("pw"),
        data_dir=tmp_path,
    )
    params = conninfo_to_dict(config.service_database_url())
    assert (params["user"], params["password"]) == ("billing_app", "pw")
    assert config.require_database_url() == OWNER  # migrate's, unchanged
    assert not config.database_url_names_service_role
    assert Settings(
        database_url="postgresql://billing_app@h/d", service_role="billing_app", data_dir=tmp_path
    ).database_url_names_service_role


def test_a_running_up_gives_other_commands_its_service_url(tmp_path: Path) -> None:
    (tmp_path / "runtime.json").write_text(
        json.dumps(
            {
                "database_url": "postgresql://postgres:x@127.0.0.1:5999/postgres",
                "service_database_url": "postgresql://devmeter_service:y@127.0.0.1:5999/postgres",
            }
        )
    )
    config = Settings(data_dir=tmp_path)
    assert config.service_database_url().startswith("postgresql://devmeter_service:y@")
    assert config.require_database_url().startswith("postgresql://postgres:x@")


def test_production_requires_the_service_password(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="DEVMETER_SERVICE_PASSWORD is required"):
        Settings(env="production", database_url=OWNER, data_dir=tmp_path)
    Settings(env="production", database_url=OWNER, service_password="x", data_dir=tmp_path)
    # A URL that names the service role may carry its password itself.
    Settings(env="production", database_url="postgresql://devmeter_service:pw@h/d")


@pytest.mark.parametrize("role", ["Robert'); DROP", "", "a" * 64, "1abc"])
def test_the_role_name_is_a_plain_identifier(role: str) -> None:
    with pytest.raises(ValidationError):
        Settings(service_role=role)
