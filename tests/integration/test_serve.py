"""`devmeter api` and `devmeter scheduler` as their own processes: they serve, and SIGTERM stops
them cleanly (exit status 0) within a bound."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_ingest_worker import poll

STARTED = {
    "api": re.compile(r"API at (http://127\.0\.0\.1:\d+)/v1"),
    "scheduler": re.compile(r"scheduler started"),
}


def serve(
    command: str, env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], re.Match[str]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmeter", command], env=env, stdout=out, stderr=out
        )
    poll(
        lambda: STARTED[command].search(log.read_text()) is not None or proc.poll() is not None,
        30,
        f"devmeter {command} to start",
    )
    assert proc.poll() is None, log.read_text()
    found = STARTED[command].search(log.read_text())
    assert found is not None
    return proc, found


def terminate(proc: subprocess.Popen[bytes], timeout: float, what: str) -> int:
    """SIGTERM, as Ctrl-C or an orchestrator would; the exit code, or a failure (the process
    killed) when ``what`` does not stop within ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"{what} did not stop on SIGTERM within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    assert terminate(proc, 20, "the service") == 0, log.read_text()
    assert "SIGTERM received, stopping" in log.read_text()


def test_api_serves_until_sigterm(
    cli_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    env = {
        **cli_env,
        "DEVMETER_DATABASE_URL": database_url,
        "DEVMETER_API_PORT": "0",
        "DEVMETER_ADMIN_TOKEN": "operator-token-of-this-test",
    }
    log = tmp_path / "api.log"
    proc, started = serve("api", env, log)
    with urllib.request.urlopen(f"{started.group(1)}/healthz", timeout=10) as response:
        assert response.status == 200
    stop(proc, log)


def test_scheduler_runs_until_sigterm(
    cli_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "scheduler.log"
    proc, _ = serve("scheduler", {**cli_env, "DEVMETER_DATABASE_URL": database_url}, log)
    stop(proc, log)


def test_api_with_workers_serves_from_several_processes(
    cli_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **cli_env,
        "DEVMETER_DATABASE_URL": database_url,
        "DEVMETER_ADMIN_TOKEN": "operator-token-of-this-test",
    }
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmeter", "api", "--workers", "2", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=out,
        )

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None

    try:
        poll(healthy, 60, "the API's workers to serve")
        assert proc.poll() is None, log.read_text()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        # uvicorn's supervisor keeps one spawned process per worker (beside any helper).
        workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2, (children, log.read_text())
    finally:
        code = terminate(proc, 30, "devmeter api --workers")
    assert code == 0, log.read_text()
