"""``devmeter up``: everything devmeter runs, in one process, with embedded servers if needed."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from devmeter.config import RUNTIME_FILE, Settings

log = logging.getLogger("devmeter.up")


def _say(message: str) -> None:
    # A person reads these lines, and starts from them: they go to stderr, unbuffered.
    sys.stderr.write(f"devmeter up: {message}\n")
    sys.stderr.flush()


def run_up(config: Settings, *, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    data_dir = config.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        _say(f"{signal.Signals(signum).name} received, stopping")
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)

    with ExitStack() as stack:
        database_url = config.database_url
        if database_url is None:
            from devmeter.embedded import start_postgres

            pg = start_postgres(data_dir / "postgres")
            stack.callback(pg.stop)
            database_url = pg.url
            _say(
                f"no DEVMETER_DATABASE_URL: started embedded PostgreSQL at {pg.url} "
                f"(data in {pg.data_dir})"
            )
        mqtt_url = config.mqtt_url
        if mqtt_url is None:
            from devmeter.embedded import start_broker

            broker = start_broker(data_dir / "broker")
            stack.callback(broker.stop)
            mqtt_url = broker.url
            _say(
                f"no DEVMETER_MQTT_URL: started embedded {broker.kind} broker at {broker.url} "
                f"(MQTT {broker.protocol})"
            )

        from devmeter.migrate import migrate

        result = migrate(
            database_url,
            storage=config.storage,
            heartbeat_retention_days=config.heartbeat_retention_days,
        )
        _say(f"database schema at version {result.current_version}, storage mode {result.mode}")

        runtime = data_dir / RUNTIME_FILE
        _write_runtime(
            runtime, {"database_url": database_url, "mqtt_url": mqtt_url, "pid": str(os.getpid())}
        )
        stack.callback(runtime.unlink, missing_ok=True)
        _say(f"ready; other devmeter commands run here use these servers ({runtime})")
        _say("press Ctrl-C to stop")
        stop.wait()
    _say("stopped")


def _write_runtime(path: Path, values: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)
