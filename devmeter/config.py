"""The one place devmeter reads its configuration: environment variables prefixed ``DEVMETER_``."""

from __future__ import annotations

import ipaddress
import json
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from devmeter.errors import ConfigError

#: Written by ``devmeter up`` while it runs embedded servers, so that other ``devmeter``
#: commands started from the same folder reach the same database and broker without
#: the user copying URLs around.
RUNTIME_FILE = "runtime.json"

#: The database role the service logs in as unless DEVMETER_SERVICE_ROLE names another.
SERVICE_ROLE = "devmeter_service"


def public_url(broker_url: str) -> str:
    """``broker_url`` as a device may be shown it: no credentials, no devmeter-only options."""
    parts = urlsplit(broker_url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, "", "", ""))


def validate_timezone(name: str) -> str:
    """Return ``name`` if it is an IANA zone; billing months are cut in it, so a typo must fail."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown time zone {name!r} (expected an IANA name such as Asia/Tokyo)"
        ) from exc
    return name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEVMETER_", extra="ignore", frozen=True)

    env: Literal["development", "test", "production"] = "development"
    database_url: str | None = Field(
        default=None,
        description="libpq URL of PostgreSQL/TimescaleDB; unset: `devmeter up` embeds one",
    )
    mqtt_url: str | None = Field(
        default=None,
        description="mqtt://host:port of the broker; unset: `devmeter up` runs an embedded one",
    )
    mqtt_public_url: str | None = Field(
        default=None,
        description="the broker address given to devices at registration (e.g. "
        "mqtts://mqtt.example.com:8883); unset: DEVMETER_MQTT_URL without its credentials",
    )
    catalog: Path | None = Field(
        default=None, description="plan catalog and tax table (TOML); unset: the shipped default"
    )
    timezone: str = Field(default="Asia/Tokyo", description="default billing time zone (IANA)")
    data_dir: Path = Field(
        default=Path(".devmeter"), description="where `devmeter up` keeps embedded servers' data"
    )
    service_role: str = Field(
        default=SERVICE_ROLE,
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="database role the service logs in as (owns nothing, no superuser); "
        "`devmeter migrate` creates it and grants it what the service needs",
    )
    service_password: SecretStr | None = Field(
        default=None,
        description="password of the service role; set by `devmeter migrate`, used by every "
        "other command; required in production",
    )
    storage: Literal["auto", "timescaledb", "plain"] = Field(
        default="auto",
        description="time-series storage for a new database: TimescaleDB when available, "
        "else monthly-partitioned PostgreSQL tables",
    )
    heartbeat_retention_days: int = Field(default=400, ge=35)

    # Ingest worker.
    ingest_client_id: str = Field(
        # No host name in it: a worker redeployed on another host or container must pick up
        # the same persistent session, or the old one keeps (and loses) what is queued for it.
        default="devmeter-ingest",
        description="MQTT client id; keep it stable across restarts so the persistent session "
        "(and its unacknowledged messages) is picked up again",
    )
    ingest_share_group: str = Field(
        default="",
        description="shared-subscription group ($share/<group>/...) so that several workers "
        "split the load; empty (default): a plain subscription, which survives a broker "
        "restart (Mosquitto 2.0 does not restore shared ones)",
    )
    ingest_batch_size: int = Field(default=2000, ge=1, le=100_000)
    ingest_batch_age_ms: int = Field(default=200, ge=1, le=60_000)
    ingest_max_inflight: int = Field(
        default=20_000,
        ge=10,
        le=65_535,
        description="unacknowledged messages the broker may send (MQTT 5 Receive Maximum); "
        "also the bound of the worker's queue",
    )
    ingest_session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    ingest_metrics_port: int | None = Field(
        default=None, description="serve Prometheus metrics of `devmeter ingest` on this port"
    )
    ingest_log_interval_s: float = Field(default=10.0, gt=0)
    ingest_source: Literal["mqtt", "jetstream"] = Field(
        default="mqtt",
        description="where `devmeter ingest` reads heartbeats: the MQTT broker (Mosquitto, one "
        "node) or a NATS JetStream stream that several workers and nodes share",
    )

    # NATS JetStream (DEVMETER_INGEST_SOURCE=jetstream).
    nats_url: str | None = Field(
        default=None,
        description="nats://[user:pass@]host:port of the NATS cluster, several comma-separated "
        "(the client moves to another node when one dies)",
    )
    nats_auth_file: Path | None = Field(
        default=None,
        description="the file devmeter keeps nats-server's device users and permissions in "
        "(include it from nats.conf); set: `devmeter up` with DEVMETER_INGEST_SOURCE=jetstream "
        "and `devmeter broker nats` keep it current; unset: devmeter writes none",
    )
    nats_pid_file: str = Field(
        default="",
        description="the nats-server(s) reading DEVMETER_NATS_AUTH_FILE, as pid files (nats.conf "
        "`pid_file`) or pids, comma-separated: each gets SIGHUP (`nats-server --signal reload`) "
        "when the file changes",
    )
    jetstream_stream: str = Field(
        default="DEVMETER_HEARTBEATS",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="the stream capturing devmeter.> (created when missing)",
    )
    jetstream_consumer: str = Field(
        default="devmeter-ingest",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="the durable pull consumer every worker shares (created when missing)",
    )
    jetstream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="copies of the stream when devmeter creates it (3 in "
        "a 3-node cluster: one node may die without losing or stopping anything)",
    )
    jetstream_ack_wait_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="a message a worker has not acknowledged this long (it died) goes to another",
    )
    jetstream_max_ack_pending: int = Field(
        default=50_000, ge=10, description="unacknowledged messages out, over all workers"
    )
    jetstream_max_age_days: float = Field(
        default=7.0,
        gt=0,
        description="how long the stream keeps messages: how far back `ingest replay` reaches",
    )

    # Month close and the export to billing.
    close_grace_minutes: int = Field(
        default=120,
        ge=0,
        le=7 * 24 * 60,
        description="how long after a month ends (in the account's zone) late heartbeats may "
        "still arrive before the scheduler closes it",
    )
    scheduler_interval_s: int = Field(
        default=300, ge=1, description="how often the scheduler looks for months to close"
    )
    webhook_url: str | None = Field(
        default=None, description="push each closed statement to this URL (signed, retried)"
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC-SHA256 key of the webhook signature"
    )
    webhook_max_attempts: int = Field(default=12, ge=1, le=100)

    # API and console.
    console_secret: SecretStr | None = Field(
        default=None,
        description="key of the console's CSRF tokens; set it when several API processes serve "
        "one console (default: random per process)",
    )
    api_host: str = Field(default="127.0.0.1", description="address `devmeter api`/`up` serve on")
    api_port: int = Field(default=8000, ge=0, le=65535, description="0: any free port")
    api_workers: int = Field(
        default=1, ge=1, le=64, description="`devmeter api` processes sharing the port"
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="bearer token of the operator endpoints under /v1/admin/; required outside "
        "development",
    )
    trusted_proxies: str = Field(
        default="",
        description="comma-separated IPs or CIDRs of reverse proxies whose X-Forwarded-Proto and "
        "X-Forwarded-For are believed (a TLS-terminating proxy: the console's cookie is then "
        "Secure); empty: nobody's",
    )
    console_idle_minutes: int = Field(
        default=30, ge=1, le=24 * 60, description="a console session unused this long ends"
    )
    console_session_hours: int = Field(
        default=12, ge=1, le=30 * 24, description="a console session ends this long after sign-in"
    )

    @field_validator("console_secret", "admin_token")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # A short or sample value would be guessable; refuse it rather than run with it.
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (use a random value)")
        return value

    @model_validator(mode="after")
    def _check_service_password(self) -> Settings:
        # Without a password the service role can only log in where the server trusts the
        # connection; in production that is a misconfiguration, found here rather than at the
        # first connection. A URL naming the service role may carry its own password.
        if (
            self.env == "production"
            and self.service_password is None
            and not (self.database_url and self._names_service_role(self.database_url))
        ):
            raise ValueError("DEVMETER_SERVICE_PASSWORD is required in production")
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: str) -> str:
        # Only addresses and networks: uvicorn would take anything else as a literal host name
        # that never matches, and a typo would silently trust nobody (or, worse, be "*").
        for item in filter(None, (part.strip() for part in value.split(","))):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from exc
        return value

    @property
    def trusted_proxy_list(self) -> list[str]:
        return [part.strip() for part in self.trusted_proxies.split(",") if part.strip()]

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        return validate_timezone(value)

    @cached_property
    def runtime(self) -> dict[str, str]:
        path = self.data_dir / RUNTIME_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def require_database_url(self) -> str:
        url = self.database_url or self.runtime.get("database_url")
        if not url:
            raise ConfigError(
                "DEVMETER_DATABASE_URL is not set and no `devmeter up` is running here "
                "(start one, or point DEVMETER_DATABASE_URL at PostgreSQL)"
            )
        return url

    def device_mqtt_url(self) -> str | None:
        """The broker address devices are told to connect to (registration, rotation)."""
        if self.mqtt_public_url:
            return self.mqtt_public_url
        url = self.mqtt_url or self.runtime.get("mqtt_url")
        return public_url(url) if url else None

    def _names_service_role(self, url: str) -> bool:
        from devmeter.db import url_user

        return url_user(url) == self.service_role

    @property
    def database_url_names_service_role(self) -> bool:
        """True when DEVMETER_DATABASE_URL already logs in as the service role: the service can
        use it as is, and it cannot migrate (the owner does)."""
        return self.database_url is not None and self._names_service_role(self.database_url)

    def service_database_url(self) -> str:
        """The URL every connection but the migration's opens: the service role's.

        Derived from the configured URL (or that of a `devmeter up` running here) by logging in
        as DEVMETER_SERVICE_ROLE, so a superuser URL never reaches the service.
        """
        from devmeter.db import service_url

        if self.database_url is None and (url := self.runtime.get("service_database_url")):
            return url
        password = self.service_password.get_secret_value() if self.service_password else None
        return service_url(self.require_database_url(), self.service_role, password)

    def require_nats_url(self) -> str:
        if not self.nats_url:
            raise ConfigError(
                "DEVMETER_NATS_URL is not set (DEVMETER_INGEST_SOURCE=jetstream and "
                "`devmeter ingest replay` read from NATS JetStream)"
            )
        return self.nats_url

    @property
    def nats_pids(self) -> list[str]:
        return [part.strip() for part in self.nats_pid_file.split(",") if part.strip()]

    def require_nats_auth_file(self) -> Path:
        if self.nats_auth_file is None:
            raise ConfigError(
                "DEVMETER_NATS_AUTH_FILE is not set: name the file nats.conf includes for "
                "devices' users and permissions"
            )
        return self.nats_auth_file

    def require_mqtt_url(self) -> str:
        url = self.mqtt_url or self.runtime.get("mqtt_url")
        if not url:
            raise ConfigError(
                "DEVMETER_MQTT_URL is not set and no `devmeter up` is running here "
                "(start one, or point DEVMETER_MQTT_URL at an MQTT broker)"
            )
        return url
