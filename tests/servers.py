"""Where the test suite finds its PostgreSQL and MQTT broker.

In order: the servers named by DEVMETER_TEST_DATABASE_URL / DEVMETER_TEST_MQTT_URL; containers
(TimescaleDB, Mosquitto) when a Docker engine answers; otherwise an embedded PostgreSQL and a
broker the suite starts itself. DEVMETER_TEST_DOCKER=0 skips the Docker probe.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TIMESCALE_IMAGE = "timescale/timescaledb:2.17.2-pg16"
MOSQUITTO_IMAGE = "eclipse-mosquitto:2"


@dataclass(frozen=True)
class Server:
    url: str
    origin: str


def docker_answers() -> bool:
    if os.environ.get("DEVMETER_TEST_DOCKER", "1") == "0":
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:
        return False


@contextmanager
def postgres_server(shared_dir: Path) -> Iterator[Server]:
    url = os.environ.get("DEVMETER_TEST_DATABASE_URL")
    if url:
        yield Server(url, "DEVMETER_TEST_DATABASE_URL")
        return
    if docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(TIMESCALE_IMAGE, driver=None) as container:
            yield Server(container.get_connection_url(), f"container {TIMESCALE_IMAGE}")
        return
    from devmeter.embedded import start_postgres

    # One embedded server for all xdist workers: they share `shared_dir`.
    pg = start_postgres(shared_dir / "embedded-postgres", fast_unsafe=True)
    try:
        yield Server(pg.url, "embedded PostgreSQL")
    finally:
        pg.stop()  # the server stops when the last xdist worker lets go


@contextmanager
def mqtt_server(data_dir: Path) -> Iterator[Server]:
    url = os.environ.get("DEVMETER_TEST_MQTT_URL")
    if url:
        yield Server(url, "DEVMETER_TEST_MQTT_URL")
        return
    if docker_answers():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        container = DockerContainer(MOSQUITTO_IMAGE).with_exposed_ports(1883)
        container.with_command("mosquitto -c /mosquitto-no-auth.conf")
        with container:
            wait_for_logs(container, "running", timeout=30)
            host, port = container.get_container_host_ip(), container.get_exposed_port(1883)
            yield Server(f"mqtt://{host}:{port}", f"container {MOSQUITTO_IMAGE}")
        return
    from devmeter.embedded import start_broker

    broker = start_broker(data_dir)
    try:
        url = broker.url if broker.protocol == "5" else f"{broker.url}?protocol=3.1.1"
        yield Server(url, f"embedded {broker.kind} broker")
    finally:
        broker.stop()
