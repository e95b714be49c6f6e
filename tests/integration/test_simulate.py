"""`devmeter simulate` drives a real `devmeter ingest` through the real broker and database."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmeter.embedded import free_port
from ingest.processor import Reason
from ingest.simulate import BadKind
from tests.conftest import Cli
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
