"""The embedded PostgreSQL and MQTT broker that `devmeter up` and the test suite fall back on.

Each test starts its own servers under ``tmp_path`` and stops them, so the file runs alone
(``--noconftest``) and beside anything else. Waiting is always polling with a deadline.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devmeter import embedded
from devmeter.embedded import EmbeddedBroker, free_port, start_broker, start_postgres

pytestmark = pytest.mark.integration

HAS_MOSQUITTO = bool(
    shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state not in {"Z", "X"}  # an unreaped zombie has stopped serving


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def server_stopped(data_dir: Path, pid: int) -> Callable[[], bool]:
    return lambda: not alive(pid) and postmaster_pid(data_dir) is None


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def query_one(url: str, sql: Any) -> Any:
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def spawn_python(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def reap_children() -> Iterator[list[subprocess.Popen[str]]]:
    """Children a test spawns; killed if the test fails before they finish."""
    children: list[subprocess.Popen[str]] = []
    yield children
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=30)


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_serves_and_keeps_its_data_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    pg = start_postgres(data_dir, fast_unsafe=True)
    try:
        assert pg.url.startswith("postgresql://postgres:")
        assert "@127.0.0.1:" in pg.url
        assert query_one(pg.url, "select version()").startswith("PostgreSQL ")
        assert query_one(pg.url, "show fsync") == "off"
        assert query_one(pg.url, "show synchronous_commit") == "off"
        assert query_one(pg.url, "show full_page_writes") == "off"
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("create table kept (note text)")
            conn.execute("insert into kept values ('from the first run')")
        pid = postmaster_pid(data_dir)
        assert pid is not None
    finally:
        pg.stop()
    wait_until(server_stopped(data_dir, pid), "the server to stop")

    again = start_postgres(data_dir)
    try:
        assert query_one(again.url, "select note from kept") == "from the first run"
        assert query_one(again.url, "show fsync") == "on"
    finally:
        again.stop()
    pid = postmaster_pid(data_dir)
    assert pid is None or not alive(pid)


def test_postgres_refuses_a_wrong_password(tmp_path: Path) -> None:
    pg = start_postgres(tmp_path / "pg", fast_unsafe=True)
    try:
        port = pg.url.rpartition(":")[2].split("/")[0]
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"postgresql://postgres:wrong@127.0.0.1:{port}/postgres").close()
    finally:
        pg.stop()


def test_postgres_is_shared_by_processes_starting_at_once(
    tmp_path: Path, reap_children: list[subprocess.Popen[str]]
) -> None:
    data_dir = tmp_path / "pg"
    code = f"""
        import sys
        from pathlib import Path
        from devmeter.embedded import start_postgres
        pg = start_postgres(Path({str(data_dir)!r}), fast_unsafe=True)
        print(pg.url, flush=True)
        sys.stdin.read()
        pg.stop()
    """
    reap_children.extend(spawn_python(code) for _ in range(2))
    urls = []
    for child in reap_children:
        assert child.stdout is not None
        urls.append(child.stdout.readline().strip())
    assert urls[0] == urls[1]
    assert query_one(urls[0], "select 1") == 1
    pid = postmaster_pid(data_dir)
    assert pid is not None

    first, second = reap_children
    first.communicate(input="", timeout=60)
    assert query_one(urls[0], "select 2") == 2, "the other process still uses it"
    second.communicate(input="", timeout=60)
    assert first.returncode == second.returncode == 0
    wait_until(server_stopped(data_dir, pid), "the server to stop after its last user")


def test_postgres_stops_when_its_last_user_is_killed(
    tmp_path: Path, reap_children: list[subprocess.Popen[str]]
) -> None:
    data_dir = tmp_path / "pg"
    child = spawn_python(
        f"""
        import os, signal
        from pathlib import Path
        from devmeter.embedded import start_postgres
        start_postgres(Path({str(data_dir)!r}), fast_unsafe=True)
        print("started", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    reap_children.append(child)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "started"
    pid = postmaster_pid(data_dir)
    assert pid is not None
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    wait_until(server_stopped(data_dir, pid), "the reaper to stop the orphaned server")


def test_postgres_restarts_after_the_server_crashed(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    crashed = start_postgres(data_dir, fast_unsafe=True)
    try:
        pid = postmaster_pid(data_dir)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), "the postmaster to die")
        # postmaster.pid is left behind, naming a dead process.
        assert postmaster_pid(data_dir) == pid

        restarted = start_postgres(data_dir, fast_unsafe=True)
        try:
            assert query_one(restarted.url, "select 1") == 1
        finally:
            restarted.stop()
    finally:
        crashed.stop()


def test_postgres_starts_over_a_pid_file_whose_pid_was_reused(
    tmp_path: Path, reap_children: list[subprocess.Popen[str]]
) -> None:
    data_dir = tmp_path / "pg"
    pg = start_postgres(data_dir, fast_unsafe=True)
    stale = (data_dir / "pgdata" / "postmaster.pid").read_text()
    old_pid = postmaster_pid(data_dir)
    assert old_pid is not None
    pg.stop()
    wait_until(server_stopped(data_dir, old_pid), "the server to stop")

    # After a crash and a reboot the recorded pid may belong to any process.
    squatter = spawn_python("import sys; sys.stdin.read()")
    reap_children.append(squatter)
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    pid_file.write_text(stale.replace(str(old_pid), str(squatter.pid), 1))
    shutil.chown(pid_file, *_owner(data_dir / "pgdata"))

    pg = start_postgres(data_dir, fast_unsafe=True)
    try:
        assert query_one(pg.url, "select 1") == 1
        assert postmaster_pid(data_dir) != squatter.pid
    finally:
        pg.stop()
    squatter.communicate(input="", timeout=30)


def _owner(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid


# --------------------------------------------------------------------------- MQTT


def publish_and_receive(broker: EmbeddedBroker) -> mqtt.MQTTMessage:
    host, port = broker.url.removeprefix("mqtt://").split(":")
    protocol = mqtt.MQTTv5 if broker.protocol == "5" else mqtt.MQTTv311
    topic = "devmeter/test/heartbeat"
    subscribed = threading.Event()
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe(topic, qos=1)

    def on_subscribe(*_: Any) -> None:
        subscribed.set()

    def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        received.put(message)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="embedded-test", protocol=protocol)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, int(port))
    client.loop_start()
    try:
        assert subscribed.wait(timeout=10), "no SUBACK"
        info = client.publish(topic, b'{"state":"active"}', qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
        return received.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize(
    ("prefer", "protocol"),
    [
        pytest.param(
            "mosquitto",
            "5",
            marks=pytest.mark.skipif(not HAS_MOSQUITTO, reason="mosquitto is not installed"),
        ),
        ("amqtt", "3.1.1"),
    ],
)
def test_broker_delivers_a_qos1_message(tmp_path: Path, prefer: Any, protocol: str) -> None:
    broker = start_broker(tmp_path / "mqtt", prefer=prefer)
    try:
        assert broker.kind == prefer
        assert broker.protocol == protocol
        assert broker.url.startswith("mqtt://127.0.0.1:")
        message = publish_and_receive(broker)
        assert message.payload == b'{"state":"active"}'
        assert message.qos == 1
    finally:
        broker.stop()
    port = int(broker.url.rpartition(":")[2])
    assert not port_accepts(port)
    broker.stop()  # idempotent


@pytest.mark.skipif(not HAS_MOSQUITTO, reason="mosquitto is not installed")
def test_auto_prefers_mosquitto_and_writes_its_persistence(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "mqtt")
    try:
        assert (broker.kind, broker.protocol) == ("mosquitto", "5")
        config = (tmp_path / "mqtt" / "mosquitto.conf").read_text()
        assert "max_queued_messages 100000" in config
    finally:
        broker.stop()
    # mosquitto saves its database on a clean shutdown.
    assert (tmp_path / "mqtt" / "mosquitto" / "mosquitto.db").exists()


@pytest.mark.skipif(not HAS_MOSQUITTO, reason="mosquitto is not installed")
def test_mosquitto_stops_cleanly_right_after_starting(tmp_path: Path) -> None:
    # mosquitto 2.0 can lose a SIGTERM that arrives just after it logs "running"; stop()
    # must still end it cleanly (database saved), not by SIGKILL after a timeout.
    for attempt in range(20):
        data_dir = tmp_path / str(attempt)
        broker = start_broker(data_dir, prefer="mosquitto")
        started = time.monotonic()
        broker.stop()
        assert time.monotonic() - started < 5
        assert (data_dir / "mosquitto" / "mosquitto.db").exists()


@pytest.mark.skipif(not HAS_MOSQUITTO, reason="mosquitto is not installed")
def test_mosquitto_stops_when_its_owner_is_killed(
    tmp_path: Path, reap_children: list[subprocess.Popen[str]]
) -> None:
    child = spawn_python(
        f"""
        import os, signal
        from pathlib import Path
        from devmeter.embedded import start_broker
        broker = start_broker(Path({str(tmp_path / "mqtt")!r}), prefer="mosquitto")
        print(broker.url, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    reap_children.append(child)
    assert child.stdout is not None
    port = int(child.stdout.readline().strip().rpartition(":")[2])
    child.wait(timeout=60)
    wait_until(lambda: not port_accepts(port), "mosquitto to stop with its owner")


@pytest.fixture
def first_port_taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Make the first free_port() answer a port someone else listens on (the race it has)."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken: int = squatter.getsockname()[1]
    answers = iter([taken])
    first = lambda: next(answers, None) or free_port()  # noqa: E731
    # Each server module calls its own free_port name (imported from devmeter.embedded._common).
    monkeypatch.setattr(embedded.postgres, "free_port", first)
    monkeypatch.setattr(embedded.broker, "free_port", first)
    with squatter:
        yield taken


@pytest.mark.parametrize(
    "server",
    [
        pytest.param(
            "mosquitto",
            marks=pytest.mark.skipif(not HAS_MOSQUITTO, reason="mosquitto is not installed"),
        ),
        "amqtt",
        "postgres",
    ],
)
def test_servers_retry_when_their_port_is_taken(
    tmp_path: Path, first_port_taken: int, server: str
) -> None:
    if server == "postgres":
        pg = start_postgres(tmp_path / "pg", fast_unsafe=True)
        try:
            assert f":{first_port_taken}/" not in pg.url
            assert query_one(pg.url, "select 1") == 1
        finally:
            pg.stop()
        return
    broker = start_broker(
        tmp_path / "mqtt", prefer="mosquitto" if server == "mosquitto" else "amqtt"
    )
    try:
        assert not broker.url.endswith(f":{first_port_taken}")
        assert publish_and_receive(broker).qos == 1
    finally:
        broker.stop()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
