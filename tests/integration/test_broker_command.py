"""`devmeter broker`: production's Mosquitto, with devices' keys from the database."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devmeter.embedded import free_port
from devmeter.errors import ConfigError
from devmeter.service import broker_config
from ingest.broker_auth import INGEST_USERNAME
from tests.conftest import Cli
from tests.integration.test_broker_auth import AuthBroker, Client
from tests.integration.test_cli_registry import _create_acme
from tests.integration.test_ingest_worker import poll
from tests.integration.test_serve import terminate

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto", path="/usr/sbin:/usr/bin:/usr/local/sbin") is None,
    reason="mosquitto is not installed (apt-get install mosquitto)",
)

DEPLOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _admitted(port: int, username: str | None, password: str | None) -> bool:
    broker = AuthBroker(None, None, "", "127.0.0.1", port)  # type: ignore[arg-type]
    client = Client(broker, username, password)
    try:
        return client.ok
    finally:
        client.close()


def test_the_operator_config_may_not_set_authentication(tmp_path: Path) -> None:
    shipped = broker_config(DEPLOY_CONFIG.read_text(), tmp_path)
    assert "allow_anonymous false" in shipped
    assert f"password_file {tmp_path / 'passwd'}" in shipped
    for line in ("allow_anonymous true", "password_file /x", "per_listener_settings true"):
        with pytest.raises(ConfigError, match=line.split()[0]):
            broker_config(f"listener 1883\n{line}\n", tmp_path)


def test_broker_admits_registered_devices_and_reloads_on_registration(
    cli: Cli, tmp_path: Path
) -> None:
    _create_acme(cli)
    port = free_port()
    data = tmp_path / "data"
    base = tmp_path / "mosquitto.conf"
    # The shipped production file, on a free loopback port and this test's data directory.
    base.write_text(
        DEPLOY_CONFIG.read_text()
        .replace("/var/lib/devmeter/mosquitto/", f"{data}/mosquitto/")
        .replace("listener 1883", f"listener {port} 127.0.0.1")
    )
    password = "ingest-password-for-this-test"
    env = {
        **cli.env,
        "DEVMETER_MQTT_URL": f"mqtt://{INGEST_USERNAME}:{password}@127.0.0.1:{port}",
        "DEVMETER_DATA_DIR": str(data),
    }
    log_path = tmp_path / "broker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmeter", "broker", "--config", str(base)],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # Mosquitto's own log is block-buffered into the file: wait for its port instead.
        poll(lambda: _listening(port) or proc.poll() is not None, 30, "mosquitto to listen")
        assert proc.poll() is None, log_path.read_text()
        assert _admitted(port, INGEST_USERNAME, password)
        assert not _admitted(port, None, None)

        device = cli("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "p1")
        assert device.code == 0, device.stderr
        mqtt_info = device.json()["mqtt"]  # type: ignore[index]
        registered = time.monotonic()
        while not _admitted(port, mqtt_info["username"], mqtt_info["password"]):
            assert time.monotonic() - registered < 2.0, log_path.read_text()
            time.sleep(0.05)
    finally:
        code = terminate(proc, 30, "devmeter broker")
    assert code == 0, log_path.read_text()
