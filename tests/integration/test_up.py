"""`devmeter up` on nothing but Python: embedded PostgreSQL and broker, migrations, ingest."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.processor import device_topic
from tests.conftest import Cli, seed_fleet
from tests.integration.test_cli_registry import _create_acme
from tests.integration.test_ingest_worker import Publisher, poll


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
        assert "broker at mqtt://127.0.0.1:" in text
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
        publisher = Publisher(runtime["mqtt_url"])
        try:
            publisher.publish(
                device_topic("d1"),
                {"state": "inactive", "ts": datetime.now(UTC).isoformat(), "seq": 1},
            )
        finally:
            publisher.close()

        def inactive() -> bool:
            listed = cli("devices", "list", "--account", "acme").json()
            return listed["devices"][0]["state"] == "inactive"  # type: ignore[index,no-any-return]

        poll(inactive, 30, "the heartbeat to set d1 inactive")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("devmeter up did not stop on SIGTERM")
    assert code == 0, log_path.read_text()
    assert "stopped" in log_path.read_text()
    assert not (tmp_path / "data" / "runtime.json").exists()


def test_up_restarts_a_killed_broker_and_a_killed_worker(
    cli_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:

    seed_fleet(database_url, [("sup-1", "lte-m", None)], datetime.now(UTC) - timedelta(hours=1))
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmeter", "up"],
            env={**cli_env, "DEVMETER_DATABASE_URL": database_url, "DEVMETER_API_PORT": "0"},
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        poll(lambda: "ready" in log_path.read_text() or proc.poll() is not None, 120, "ready")
        text = log_path.read_text()
        broker = re.search(r"broker at mqtt://127\.0\.0\.1:(\d+) \(MQTT 5, pid (\d+)", text)
        worker = re.search(r"ingest worker started \(pid (\d+)\)", text)
        assert broker, text
        assert worker, text
        port = broker.group(1)

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

        publisher = Publisher(f"mqtt://127.0.0.1:{port}")
        try:
            publisher.publish(
                device_topic("sup-1"),
                {"state": "inactive", "ts": datetime.now(UTC).isoformat(), "seq": 7},
            )
        finally:
            publisher.close()
        cli = Cli({**cli_env, "DEVMETER_DATABASE_URL": database_url}, tmp_path)
        poll(
            lambda: (
                cli("devices", "list", "--account", "acme").json()["devices"][0]["state"]  # type: ignore[index]
                == "inactive"
            ),
            30,
            "the heartbeat published after the restarts to be stored",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("devmeter up did not stop on SIGTERM")
    assert code == 0, log_path.read_text()
