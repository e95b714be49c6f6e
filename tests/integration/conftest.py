"""Integration tests' shared fixtures: the marker, and billing's webhook receiver."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Billing's end: records every request; answers from a script, then 200."""

    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    script: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Set at teardown, to free handlers told to "hang".
    released: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/billing/devmeter"

    def answer_next(self, *answers: str) -> None:
        """ "500", "302" or "drop" (close the connection without a response), in order."""
        with self.lock:
            self.script.extend(answers)

    def take(self, request: Received) -> str:
        with self.lock:
            self.requests.append(request)
            return self.script.pop(0) if self.script else "200"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            answer = rec.take(Received(self.path, dict(self.headers.items()), body))
            if answer == "hang":
                rec.released.wait(timeout=60)
            if answer in ("drop", "hang"):
                self.close_connection = True
                return
            code = int(answer)
            self.send_response(code)
            if code == 302:
                self.send_header("Location", "/somewhere-else")
            payload = b'{"ok":true}' if code == 200 else b""
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec = Receiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    rec.released.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
