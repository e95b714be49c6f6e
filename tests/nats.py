"""A NATS cluster with JetStream on loopback, of Debian's `nats-server`, for tests and benches.

Each node has its own ports, store folder and `server_name` (JetStream's clustering needs it,
and so does the MQTT listener); the nodes route to each other. Ports are free ones found by
binding port 0: another process could take one between that and the server's start, in which
case the node fails to start and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

NATS_SERVER = (
    os.environ.get("DEVMETER_NATS_SERVER")
    or shutil.which("nats-server")
    or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").is_file() else None)
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NatsNode:
    name: str
    port: int
    cluster_port: int
    http_port: int
    mqtt_port: int | None
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "nats.log"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """JetStream on this node is up and current with the cluster (its /healthz)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/healthz", timeout=1
            ) as r:
                return bool(r.status == 200 and json.load(r).get("status") == "ok")
        except (OSError, urllib.error.URLError, ValueError):
            return False


@dataclass
class NatsCluster:
    folder: Path
    size: int = 3
    #: Extra configuration for every node (authorization, accounts).
    extra: str = ""
    mqtt: bool = False
    nodes: list[NatsNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i in range(self.size):
            node_dir = self.folder / f"n{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                NatsNode(
                    f"n{i}",
                    free_port(),
                    free_port(),
                    free_port(),
                    free_port() if self.mqtt else None,
                    node_dir,
                )
            )

    @property
    def url(self) -> str:
        """Every node, comma-separated (DEVMETER_NATS_URL)."""
        return ",".join(n.url for n in self.nodes)

    def config(self, node: NatsNode) -> str:
        lines = [
            f"server_name: {node.name}",
            f"listen: 127.0.0.1:{node.port}",
            f"http: 127.0.0.1:{node.http_port}",
            "jetstream {",
            f'  store_dir: "{node.folder / "js"}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 2GB",
            "}",
        ]
        if self.size > 1:
            routes = ", ".join(
                f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node
            )
            lines += [
                "cluster {",
                "  name: devmeter-test",
                f"  listen: 127.0.0.1:{node.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        if node.mqtt_port is not None:
            lines += ["mqtt {", f"  listen: 127.0.0.1:{node.mqtt_port}", "}"]
        return "\n".join(lines) + "\n" + self.extra

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            self.start_node(node, wait=False)
        self.wait_healthy(timeout)

    def start_node(self, node: NatsNode, *, wait: bool = True, timeout: float = 60.0) -> None:
        assert NATS_SERVER is not None, "nats-server is not installed"
        conf = node.folder / "nats.conf"
        conf.write_text(self.config(node))
        with node.log.open("ab") as out:
            node.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_healthy(timeout, [node])

    def wait_healthy(self, timeout: float, nodes: list[NatsNode] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes or self.nodes:
            while not node.healthy():
                if not node.alive():
                    raise RuntimeError(f"nats-server {node.name} exited:\n{node.log.read_text()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server {node.name} not healthy after {timeout}s")
                time.sleep(0.1)

    def kill(self, node: NatsNode) -> None:
        """SIGKILL: no goodbye to the cluster, nothing flushed."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)

    def reload(self) -> None:
        """SIGHUP: every node reads its configuration (e.g. new users) again."""
        for node in self.nodes:
            if node.alive():
                conf = node.folder / "nats.conf"
                conf.write_text(self.config(node))
                assert node.proc is not None
                node.proc.send_signal(signal.SIGHUP)

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                assert node.proc is not None
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(15)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
