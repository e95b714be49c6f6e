"""`devmeter simulate` drives a real `devmeter ingest` through the real broker and database."""

from __future__ import annotations

import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmeter.embedded import free_port
from ingest.broker_auth import INGEST_USERNAME
from ingest.processor import Reason
from ingest.simulate import BadKind
from tests.conftest import Cli
from tests.integration.test_broker_auth import INGEST_PASSWORD, authenticating_broker
from tests.integration.test_ingest_resilience import WorkerProcess
from tests.integration.test_ingest_worker import count, poll


@pytest.fixture
def env(cli_env: dict[str, str], database_url: str, mqtt_url: str) -> dict[str, str]:
    uid = uuid.uuid4().hex[:8]
    return {
        **cli_env,
        "DEVMETER_DATABASE_URL": database_url,
        "DEVMETER_MQTT_URL": mqtt_url,
        "DEVMETER_INGEST_CLIENT_ID": f"sim-ingest-{uid}",
        "DEVMETER_INGEST_SHARE_GROUP": f"sim{uid}",
        "DEVMETER_INGEST_METRICS_PORT": str(free_port()),
        "DEVMETER_INGEST_LOG_INTERVAL_S": "1",
    }


@pytest.fixture
def ingest(env: dict[str, str], tmp_path: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(env, tmp_path)
    worker.start()
    yield worker
    worker.stop()


def test_simulated_fleet_lands_and_bad_messages_are_quarantined(
    env: dict[str, str], tmp_path: Path, database_url: str, ingest: WorkerProcess
) -> None:
    prefix = f"s{uuid.uuid4().hex[:6]}"
    cli = Cli(env, tmp_path)
    args = ["simulate", "--devices", "60", "--gateways", "3", "--prefix", prefix]
    args += ["--count", "600", "--rate", "600/s", "--bad-share", "0.15", "--seed", "11"]
    result = cli(*args)
    assert result.code == 0, result.stderr
    summary = result.json()
    assert isinstance(summary, dict)
    assert summary["messages"] == summary["acknowledged"] == 600
    assert "63 newly registered" in result.stderr
    bad: dict[str, int] = summary["bad_messages"]
    assert set(bad) == {k.value for k in BadKind}, "a 15 % share over 600 hits every kind"
    # 30 devices bound to 3 gateways: a gateway message carries several heartbeats.
    assert summary["heartbeats"] > summary["messages"] - sum(bad.values())
    assert summary["state_flips"] > 0

    stored = "SELECT count(*) FROM heartbeats WHERE device_id LIKE %s"
    poll(
        lambda: count(database_url, stored, f"{prefix}-%") >= summary["heartbeats"],
        30,
        "the simulated heartbeats",
    )
    quarantined = "SELECT count(*) FROM rejected_heartbeats WHERE topic LIKE %s AND reason = %s"
    for kind, n in bad.items():
        # Each bad kind is built to produce the quarantine reason of the same name.
        reason = Reason(kind)
        poll(
            lambda r=reason, n=n: count(database_url, quarantined, f"%{prefix}-%", r.value) == n,
            30,
            f"{n} quarantined as {reason}",
        )
    assert count(database_url, stored, f"{prefix}-%") == summary["heartbeats"]
    flips = "SELECT count(*) FROM device_state_events WHERE device_id LIKE %s AND source <> 'cli'"
    assert count(database_url, flips, f"{prefix}-%") > 0

    # The same fleet again: every device is reused, none registered twice.
    again = cli(*args[:-2], "--seed", "12", "--count", "50")
    assert again.code == 0, again.stderr
    assert "(0 newly registered)" in again.stderr

    port = env["DEVMETER_INGEST_METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert "devmeter_ingest_messages_total" in metrics
    assert 'devmeter_ingest_rejections_total{reason="malformed_json"}' in metrics
    assert "devmeter_ingest_queue_depth" in metrics
    poll(lambda: "ingest:" in ingest.log.read_text(), 10, "the per-interval log line")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "5", "--rate", "fast"], "is not a rate"),
        (["--devices", "5", "--rate", "-3/s"], "must be a finite rate"),
        (["--devices", "0"], "--devices"),
        (["--devices", "5", "--class", "zigbee"], "no device class 'zigbee'"),
    ],
)
def test_simulate_refuses_bad_arguments(
    env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    result = Cli(env, tmp_path)("simulate", "--count", "1", *args)
    assert result.code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def auth_broker_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A Mosquitto with devmeter's authentication, kept current by `CredentialSync`, as
    `devmeter up` runs it (and as tests/integration/test_broker_auth.py starts it)."""
    if shutil.which("mosquitto", path="/usr/sbin:/usr/bin:/usr/local/sbin") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    with authenticating_broker(database_url, tmp_path) as broker:
        yield broker.broker.url


def test_simulate_publishes_as_the_devices_through_an_authenticating_broker(
    env: dict[str, str], tmp_path: Path, database_url: str, auth_broker_url: str
) -> None:
    ingest_url = auth_broker_url.replace("mqtt://", f"mqtt://{INGEST_USERNAME}:{INGEST_PASSWORD}@")
    worker = WorkerProcess({**env, "DEVMETER_MQTT_URL": ingest_url}, tmp_path)
    worker.start()
    try:
        prefix = f"s{uuid.uuid4().hex[:6]}"
        # The simulator is given the bare URL: auto finds that the broker refuses anonymous.
        cli = Cli({**env, "DEVMETER_MQTT_URL": auth_broker_url}, tmp_path)
        args = ["simulate", "--devices", "20", "--gateways", "2", "--prefix", prefix]
        args += ["--rate", "0", "--bad-share", "0.1", "--seed", "5"]
        result = cli(*args, "--count", "400")
        assert result.code == 0, result.stderr
        summary = result.json()
        assert isinstance(summary, dict)
        assert summary["auth"] == "device"
        assert "dmk_" not in result.stderr + result.stdout, "device keys are never printed"
        # 10 direct devices and 2 gateways speak, each over its own connection.
        assert summary["connections"] == 12
        assert summary["refused_connections"] == 0
        bad: dict[str, int] = summary["bad_messages"]
        assert set(bad) == {k.value for k in BadKind}, "a 10 % share over 400 hits every kind"
        # Only the wrong topic is refused, by the broker's ACL (PUBACK 0x87): a device may
        # publish on its own heartbeat topic only.
        assert summary["refused_by_broker"] == {"Not authorized (0x87)": bad["bad_topic"]}
        assert (
            summary["acknowledged"]
            == summary["messages"] - bad["bad_topic"]
            == 400 - bad["bad_topic"]
        )
        assert summary["unconfirmed"] == 0

        # Every heartbeat the broker acknowledged is stored: 0 lost.
        stored = "SELECT count(*) FROM heartbeats WHERE device_id LIKE %s"
        poll(
            lambda: count(database_url, stored, f"{prefix}-%") >= summary["heartbeats"],
            30,
            "the simulated heartbeats",
        )
        quarantined = "SELECT count(*) FROM rejected_heartbeats WHERE topic LIKE %s AND reason = %s"
        for kind, n in bad.items():
            if kind == BadKind.bad_topic:
                continue  # refused by the broker, never delivered
            poll(
                lambda k=kind, n=n: count(database_url, quarantined, f"%{prefix}-%", k) == n,
                30,
                f"{n} quarantined as {kind}",
            )
        assert count(database_url, stored, f"{prefix}-%") == summary["heartbeats"]
        assert count(database_url, quarantined, f"%{prefix}-%", "bad_topic") == 0

        # The same fleet again: no device registered twice, the speakers' keys are rotated
        # (their old ones are unknown here) and the run publishes with the new ones.
        before = count(database_url, stored, f"{prefix}-%")
        again = cli(*args[:-2], "--bad-share", "0", "--count", "60")
        assert again.code == 0, again.stderr
        assert "(0 newly registered)" in again.stderr
        assert "rotated the keys of 12 devices" in again.stderr
        second = again.json()
        assert isinstance(second, dict)
        assert second["acknowledged"] == second["messages"] == 60
        assert second["keys_rotated"] == 12
        poll(
            lambda: count(database_url, stored, f"{prefix}-%") == before + second["heartbeats"],
            30,
            "the second run's heartbeats",
        )

        # No gateway to report an unknown device: the ghost tries to connect with a made-up
        # key and the broker refuses it (CONNACK), which is the point of authentication. This
        # URL names a user (devmeter's ingest), which alone makes auto pick device mode.
        ghosts = Cli({**env, "DEVMETER_MQTT_URL": ingest_url}, tmp_path)(
            "simulate", "--devices", "3", "--prefix", f"{prefix}x", "--rate", "0",
            "--bad-share", "1", "--count", "40", "--seed", "3",
        )  # fmt: skip
        assert ghosts.code == 0, ghosts.stderr
        third = ghosts.json()
        assert isinstance(third, dict)
        assert third["auth"] == "device"
        kinds: dict[str, int] = third["bad_messages"]
        assert kinds.get("unknown_device", 0) > 0, kinds
        assert kinds.get("bad_topic", 0) > 0, kinds
        refused: dict[str, int] = third["refused_by_broker"]
        at_connect = sum(n for label, n in refused.items() if label.startswith("connection: "))
        assert at_connect == third["refused_connections"] == kinds["unknown_device"], refused
        assert refused["Not authorized (0x87)"] == kinds["bad_topic"]
        assert third["acknowledged"] == 40 - kinds["unknown_device"] - kinds["bad_topic"]
    finally:
        log = worker.stop()
    assert "Traceback" not in log, log
