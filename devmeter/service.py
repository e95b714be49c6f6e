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
from typing import TYPE_CHECKING

from devmeter.config import RUNTIME_FILE, Settings

if TYPE_CHECKING:
    from ingest.worker import IngestOptions

log = logging.getLogger("devmeter.up")


def _say(message: str) -> None:
    # A person reads these lines, and starts from them: they go to stderr, unbuffered.
    sys.stderr.write(f"devmeter up: {message}\n")
    sys.stderr.flush()


def run_up(config: Settings, *, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    data_dir = config.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    _install_signals(stop)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

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
            mqtt_url = broker.url if broker.protocol == "5" else f"{broker.url}?protocol=3.1.1"
            if broker.kind == "amqtt":
                # The pure-Python broker has no shared subscriptions; one worker needs none.
                config = config.model_copy(update={"ingest_share_group": ""})
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

        worker_thread = _start_ingest(config, database_url, mqtt_url, stop)
        stack.callback(worker_thread.join, 30)

        runtime = data_dir / RUNTIME_FILE
        _write_runtime(
            runtime, {"database_url": database_url, "mqtt_url": mqtt_url, "pid": str(os.getpid())}
        )
        stack.callback(runtime.unlink, missing_ok=True)
        _say(f"ready; other devmeter commands run here use these servers ({runtime})")
        _say("press Ctrl-C to stop")
        stop.wait()
    _say("stopped")


def ingest_options(config: Settings) -> IngestOptions:
    from ingest.worker import IngestOptions

    return IngestOptions(
        client_id=config.ingest_client_id,
        share_group=config.ingest_share_group,
        batch_size=config.ingest_batch_size,
        batch_age_s=config.ingest_batch_age_ms / 1000,
        max_inflight=config.ingest_max_inflight,
        session_expiry_s=config.ingest_session_expiry_s,
        log_interval_s=config.ingest_log_interval_s,
    )


def _start_ingest(
    config: Settings, database_url: str, mqtt_url: str, stop: threading.Event
) -> threading.Thread:
    from ingest.worker import IngestWorker

    worker = IngestWorker(database_url, mqtt_url, ingest_options(config))
    if config.ingest_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.ingest_metrics_port, registry=worker.metrics.registry)
    thread = threading.Thread(target=worker.run, args=(stop,), name="ingest", daemon=True)
    thread.start()
    _say(f"ingest worker subscribed as {config.ingest_client_id!r}")
    return thread


def run_ingest(config: Settings) -> None:
    """``devmeter ingest``: the worker alone, against configured servers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    _install_signals(stop)
    thread = _start_ingest(config, config.require_database_url(), config.require_mqtt_url(), stop)
    while thread.is_alive():
        thread.join(0.5)


def _install_signals(stop: threading.Event) -> None:
    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        _say(f"{signal.Signals(signum).name} received, stopping")
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)


def _write_runtime(path: Path, values: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)
