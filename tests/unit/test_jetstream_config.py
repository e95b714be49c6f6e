"""What devmeter tells NATS: subjects, the stream and consumer, the authorization block."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from devmeter.config import Settings
from devmeter.errors import ConfigError
from devmeter.service import nats_credential_sync
from ingest.broker_auth import Credential
from ingest.jetstream import (
    JetStreamOptions,
    consumer_config,
    servers,
    stream_config,
    subject_topic,
)
from ingest.nats_auth import render_authorization, signal_reload, subject_of
from ingest.processor import device_topic, gateway_topic
from ingest.protocol import parse_topic


@pytest.mark.parametrize(
    ("subject", "topic"),
    [
        ("devmeter.v2.acme.d1.heartbeat", device_topic("acme", "d1")),
        ("devmeter.v2.acme.gw.gateway", gateway_topic("acme", "gw")),
    ],
)
def test_a_subject_reads_as_the_mqtt_topic_nats_mapped_it_from(subject: str, topic: str) -> None:
    assert subject_topic(subject) == topic
    assert parse_topic(subject_topic(subject)) is not None


def test_a_device_id_with_a_dot_does_not_map_back() -> None:
    # NATS 2.9 cannot carry a '.' inside one topic level: the processor refuses the topic.
    assert parse_topic(subject_topic("devmeter.v2.acme.pump.1.heartbeat")) is None


def test_servers_are_the_comma_separated_urls() -> None:
    assert servers("nats://a:4222, nats://u:p@b:4222,") == ["nats://a:4222", "nats://u:p@b:4222"]


def test_stream_and_consumer_never_drop_a_message() -> None:
    options = JetStreamOptions(url="nats://x", replicas=3, ack_wait_s=7)
    stream = stream_config(options)
    assert stream.subjects == ["devmeter.>"]
    assert stream.num_replicas == 3
    consumer = consumer_config(options)
    assert consumer.durable_name == "devmeter-ingest"
    assert consumer.max_deliver == -1
    assert consumer.ack_wait == 7


def test_each_device_may_publish_its_own_subject_only() -> None:
    rendered = render_authorization(
        [Credential("acme/gw", "$2a$11$gw", True), Credential("acme/d1", "$2a$11$d1", False)],
        {"devmeter-ingest": "$2a$11$ingest"},
    )
    assert rendered.startswith("#")
    block = json.loads(rendered.split("authorization ", 1)[1])
    users = {u["user"]: u for u in block["users"]}
    assert users["acme/d1"]["password"] == "$2a$11$d1"
    assert users["acme/d1"]["permissions"] == {
        "publish": {"allow": ["devmeter.v2.acme.d1.heartbeat"]},
        "subscribe": {"deny": [">"]},
    }
    assert users["acme/gw"]["permissions"]["publish"] == {"allow": ["devmeter.v2.acme.gw.gateway"]}
    assert users["devmeter-ingest"]["permissions"]["subscribe"] == {"allow": ["_INBOX.>"]}
    assert subject_of("acme/d1", "heartbeat") == "devmeter.v2.acme.d1.heartbeat"


def test_a_reload_signals_each_running_server_by_pid_file_or_pid(tmp_path: Path) -> None:
    # `sleep` stands in for nats-server: SIGHUP, which nats-server takes as "reload", ends it.
    servers = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        pid_file = tmp_path / "nats.pid"
        pid_file.write_text(f"{servers[0].pid}\n")
        sources = [str(pid_file), str(servers[1].pid), str(tmp_path / "not-started.pid")]
        assert signal_reload(sources) == 2
        assert [s.wait(10) for s in servers] == [-signal.SIGHUP] * 2
    finally:
        for s in servers:
            s.kill()
            s.wait()


@pytest.mark.parametrize(
    "url",
    [
        "nats://127.0.0.1:4222",
        "nats://someone:pw@127.0.0.1:4222",
        "nats://devmeter-ingest:pw@a:4222,nats://devmeter-ingest:other@b:4222",
    ],
)
def test_the_nats_sync_needs_the_ingest_login_of_every_node(url: str, tmp_path: Path) -> None:
    config = Settings(nats_url=url, nats_auth_file=tmp_path / "auth.conf", _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="must carry the ingest login"):
        nats_credential_sync(config, "postgresql://unused")
