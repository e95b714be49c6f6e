"""`devmeter up` on nothing but Python: embedded PostgreSQL and broker, migrations, ingest."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from psycopg.conninfo import conninfo_to_dict

from devmeter.embedded.broker import AUTOSAVE_INTERVAL_S
from ingest.processor import device_topic
from tests.conftest import Cli
from tests.integration.test_cli_registry import _create_acme
from tests.integration.test_ingest_worker import Publisher, poll
from tests.integration.test_serve import terminate


def _anonymous_admitted(url: str) -> bool:
    host, port = url.removeprefix("mqtt://").split(":")
    answers: queue.Queue[bool] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, _f, rc, _p: answers.put(not rc.is_failure)
    client.connect(host, int(port))
    client.loop_start()
    try:
        return answers.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_up_runs_embedded_servers_and_serves_other_commands(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmeter", "up"],
            env={
                **cli_env,
                "DEVMETER_INGEST_SHARE_GROUP": "",
                "DEVMETER_INGEST_CLIENT_ID": "up-test",
                "DEVMETER_API_PORT": "0",
            },
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        poll(
            lambda: "ready" in log_path.read_text() or proc.poll() is not None,
            180,
            "devmeter up to be ready",
        )
        text = log_path.read_text()
        assert proc.poll() is None, text
        assert "started embedded PostgreSQL" in text
        assert "embedded mosquitto at mqtt://127.0.0.1:" in text
        assert "storage mode plain" in text
        assert "scheduler started" in text
        token = re.search(r"operator token for this run \(shown once\): (dmo_\S+)", text)
        assert token, text
        console = re.search(r"console at (http://127\.0\.0\.1:\d+)/console", text)
        assert console, text
        base = console.group(1)
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as response:
            assert json.loads(response.read())["checks"] == {"database": "ok", "broker": "ok"}
        request = urllib.request.Request(
            f"{base}/v1/admin/accounts", headers={"Authorization": f"Bearer {token.group(1)}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read()) == []

        cli = Cli(cli_env, tmp_path)
        _create_acme(cli)
        device = cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1")
        assert device.code == 0, device.stderr

        runtime = json.loads((tmp_path / "data" / "runtime.json").read_text())
        # The service logs in as its own role, with a password made for this data dir; the
        # embedded server's superuser URL is kept for `devmeter migrate` alone.
        assert "the service logs in as the database role 'devmeter_service'" in text
        service = conninfo_to_dict(runtime["service_database_url"])
        assert service["user"] == "devmeter_service"
        password_file = tmp_path / "data" / "service.password"
        assert service["password"] == password_file.read_text().strip()
        assert password_file.stat().st_mode & 0o077 == 0
        assert conninfo_to_dict(runtime["database_url"])["user"] == "postgres"

        # Authentication is on by default: anonymous clients are refused, the device gets
        # in with the key and identity its registration returned (shown once).
        mqtt_info = device.json()["mqtt"]  # type: ignore[index]
        assert mqtt_info["topic"] == device_topic("acme", "d1")
        assert mqtt_info["password"] == device.json()["key"]  # type: ignore[index]
        assert not _anonymous_admitted(mqtt_info["url"])
        host_port = mqtt_info["url"].removeprefix("mqtt://")
        user, key = quote(mqtt_info["username"], safe=""), quote(mqtt_info["password"], safe="")
        publisher = Publisher(f"mqtt://{user}:{key}@{host_port}")
        try:
            publisher.publish(
                device_topic("acme", "d1"),
                {"state": "inactive", "ts": datetime.now(UTC).isoformat(), "seq": 1},
            )
        finally:
            publisher.close()

        def inactive() -> bool:
            listed = cli("devices", "list", "--account", "acme").json()
            return listed["devices"][0]["state"] == "inactive"  # type: ignore[index,no-any-return]

        poll(inactive, 30, "the heartbeat to set d1 inactive")
    finally:
        code = terminate(proc, 60, "devmeter up")
    assert code == 0, log_path.read_text()
    assert "stopped" in log_path.read_text()
    assert not (tmp_path / "data" / "runtime.json").exists()


def test_up_given_a_superuser_url_runs_the_service_as_the_service_role(
    cli: Cli, owner_database_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    """The superuser URL migrates; every session of the running service is the service role's."""
    log_path = tmp_path / "up-su.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmeter", "up"],
            env={
                **cli.env,
                "DEVMETER_MQTT_URL": mqtt_url,
                "DEVMETER_INGEST_SHARE_GROUP": "",
                "DEVMETER_INGEST_CLIENT_ID": f"up-su-test-{tmp_path.name}",
                "DEVMETER_API_PORT": "0",
            },
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        poll(
            lambda: "ready" in log_path.read_text() or proc.poll() is not None,
            120,
            "devmeter up to be ready",
        )
        text = log_path.read_text()
        assert proc.poll() is None, text
        console = re.search(r"console at (http://127\.0\.0\.1:\d+)/console", text)
        assert console, text
        with urllib.request.urlopen(f"{console.group(1)}/readyz", timeout=10) as response:
            assert json.loads(response.read())["checks"]["database"] == "ok"
        dbname = conninfo_to_dict(owner_database_url)["dbname"]

        def sessions() -> set[str]:
            with psycopg.connect(owner_database_url) as conn:
                rows = conn.execute(
                    "SELECT DISTINCT usename::text FROM pg_stat_activity"
                    " WHERE datname = %s AND application_name = 'devmeter'",
                    (dbname,),
                ).fetchall()
            return {str(r[0]) for r in rows}

        # The API pool and the ingest worker hold connections while up runs.
        poll(lambda: bool(sessions()), 30, "the service's sessions")
        assert sessions() == {"devmeter_service"}
    finally:
        terminate(proc, 60, "devmeter up")


def test_up_restarts_a_killed_broker_and_a_killed_worker(cli: Cli, tmp_path: Path) -> None:
    _create_acme(cli)
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmeter", "up"],
            env={**cli.env, "DEVMETER_API_PORT": "0"},
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        poll(lambda: "ready" in log_path.read_text() or proc.poll() is not None, 120, "ready")
        text = log_path.read_text()
        broker = re.search(r"mosquitto at mqtt://127\.0\.0\.1:(\d+) \(MQTT 5, pid (\d+)", text)
        worker = re.search(r"ingest worker started \(pid (\d+)\)", text)
        assert broker, text
        assert worker, text
        port = broker.group(1)
        # Registered while up runs: the key reaches the broker through the credential sync.
        device = cli(
            "devices", "register", "--account", "acme", "--class", "lte-m", "--id", "sup-1"
        )
        assert device.code == 0, device.stderr
        mqtt_info = device.json()["mqtt"]  # type: ignore[index]

        # A SIGKILL keeps only what Mosquitto saved (every AUTOSAVE_INTERVAL_S): wait for a
        # save made after the worker subscribed, so its session survives.
        poll(lambda: "granted" in log_path.read_text(), 30, "the worker to subscribe")
        database = tmp_path / "data" / "broker" / "mosquitto" / "mosquitto.db"
        after_subscribed = time.time()
        poll(
            lambda: database.exists() and database.stat().st_mtime > after_subscribed,
            AUTOSAVE_INTERVAL_S + 10,
            "the broker to save the worker's session",
        )
        os.kill(int(broker.group(2)), signal.SIGKILL)
        poll(lambda: "embedded MQTT broker restarted" in log_path.read_text(), 30, "broker back")
        assert f"running on port {port}, pid" in log_path.read_text()
        os.kill(int(worker.group(1)), signal.SIGKILL)
        poll(lambda: "ingest worker restarted" in log_path.read_text(), 30, "worker back")
        poll(
            lambda: log_path.read_text().count("(session present: True)") >= 1,
            30,
            "the new worker to resume its session",
        )

        # The restarted broker still knows the device's key (it reads the same files).
        user, key = quote(mqtt_info["username"], safe=""), quote(mqtt_info["password"], safe="")
        publisher = Publisher(f"mqtt://{user}:{key}@127.0.0.1:{port}")
        try:
            publisher.publish(
                device_topic("acme", "sup-1"),
                {"state": "inactive", "ts": datetime.now(UTC).isoformat(), "seq": 7},
            )
        finally:
            publisher.close()
        poll(
            lambda: (
                cli("devices", "list", "--account", "acme").json()["devices"][0]["state"]  # type: ignore[index]
                == "inactive"
            ),
            30,
            "the heartbeat published after the restarts to be stored",
        )
    finally:
        code = terminate(proc, 60, "devmeter up")
    assert code == 0, log_path.read_text()
