"""``devmeter up``: everything devmeter runs, in one process, with embedded servers if needed."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from devmeter.config import RUNTIME_FILE, Settings
from devmeter.errors import ConfigError

if TYPE_CHECKING:
    from ingest.worker import IngestOptions

log = logging.getLogger("devmeter.up")


def _say(message: str) -> None:
    # A person reads these lines, and starts from them: they go to stderr, unbuffered.
    sys.stderr.write(f"devmeter: {message}\n")
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
        _start_scheduler(config, database_url, stack)
        _start_api(config, database_url, mqtt_url, stack)

        runtime = data_dir / RUNTIME_FILE
        _write_runtime(
            runtime, {"database_url": database_url, "mqtt_url": mqtt_url, "pid": str(os.getpid())}
        )
        stack.callback(runtime.unlink, missing_ok=True)
        _say(f"ready; other devmeter commands run here use these servers ({runtime})")
        _say("press Ctrl-C to stop")
        stop.wait()
    _say("stopped")


def _start_scheduler(config: Settings, database_url: str, stack: ExitStack) -> None:
    from metering.catalog import load_catalog
    from metering.scheduler import build_scheduler

    scheduler = build_scheduler(config, load_catalog(config.catalog), database_url)
    scheduler.start()
    stack.callback(scheduler.shutdown, wait=False)
    _say(
        f"scheduler started: closes each account's month {config.close_grace_minutes} min after "
        f"it ends in the account's time zone (checked every {config.scheduler_interval_s} s)"
        + (f"; pushes statements to {config.webhook_url}" if config.webhook_url else "")
    )


def _with_admin_token(config: Settings) -> Settings:
    """In development, an operator token made up for this run (shown once) when none is set."""
    if config.admin_token is not None or config.env != "development":
        return config
    import secrets

    from pydantic import SecretStr

    token = "dmo_" + secrets.token_urlsafe(24)
    _say(f"no DEVMETER_ADMIN_TOKEN: operator token for this run (shown once): {token}")
    return config.model_copy(update={"admin_token": SecretStr(token)})


def serve_in_thread(
    app: Any, host: str, port: int, *, name: str, ws: str = "auto"
) -> tuple[str, Callable[[], None]]:
    """``app`` served by uvicorn in a daemon thread: its base URL once it accepts connections
    (port 0: the kernel's choice, read back, so no other process can take it in between) and
    a function that stops it. uvicorn installs signal handlers only on the main thread: the
    caller owns signals. Raises ConfigError if it is not serving within 30 s."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws=ws,
            # Off: uvicorn would believe X-Forwarded-* from 127.0.0.1 by default. The API app
            # applies the same middleware with DEVMETER_TRUSTED_PROXIES instead.
            proxy_headers=False,
        )
    )
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfigError(f"{name} could not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://{host}:{bound}", stop


def _start_api(config: Settings, database_url: str, mqtt_url: str | None, stack: ExitStack) -> str:
    from api.app import create_app

    app = create_app(_with_admin_token(config), database_url=database_url, mqtt_url=mqtt_url)
    try:
        base, stop = serve_in_thread(app, config.api_host, config.api_port, name="api")
    except ConfigError as exc:
        raise ConfigError(
            f"the API could not start on {config.api_host}:{config.api_port} "
            "(port in use? set DEVMETER_API_PORT)"
        ) from exc
    stack.callback(stop)
    _say(f"API at {base}/v1 (OpenAPI: {base}/docs); console at {base}/console")
    return base


def run_api(config: Settings) -> None:
    """``devmeter api``: the REST API and console alone, against configured servers."""

    def start(stack: ExitStack, _stop: threading.Event) -> Callable[[], bool]:
        mqtt_url = config.mqtt_url or config.runtime.get("mqtt_url")
        _start_api(config, config.require_database_url(), mqtt_url, stack)
        return lambda: True

    _serve(start)


def run_scheduler(config: Settings) -> None:
    """``devmeter scheduler``: month close (and webhooks) alone, against a configured database."""

    def start(stack: ExitStack, _stop: threading.Event) -> Callable[[], bool]:
        _start_scheduler(config, config.require_database_url(), stack)
        return lambda: True

    _serve(start)


def _serve(start: Callable[[ExitStack, threading.Event], Callable[[], bool]]) -> None:
    """One part in the foreground until SIGINT or SIGTERM, or until ``start``'s liveness check
    says it has ended by itself; then what ``start`` put on the stack is undone."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    _install_signals(stop)
    with ExitStack() as stack:
        alive = start(stack, stop)
        while alive() and not stop.wait(0.5):
            pass
        ended_by_itself = not stop.is_set()
        stop.set()
    if ended_by_itself:
        # A supervisor (systemd, compose) restarts on a failure status, not on a clean exit.
        log.error("stopped by itself, not by a signal: exiting with status 1")
        raise SystemExit(1)


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
    _say(f"ingest worker started, MQTT client id {config.ingest_client_id!r}")
    return thread


def run_ingest(config: Settings) -> None:
    """``devmeter ingest``: the worker alone, against configured servers."""

    def start(stack: ExitStack, stop: threading.Event) -> Callable[[], bool]:
        database_url, mqtt_url = config.require_database_url(), config.require_mqtt_url()
        thread = _start_ingest(config, database_url, mqtt_url, stop)
        # The worker stops when `stop` is set; it commits and acks what it holds first.
        stack.callback(thread.join)
        return thread.is_alive

    _serve(start)


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
