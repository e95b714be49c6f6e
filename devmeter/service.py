"""``devmeter up``: everything devmeter runs, in one process, with embedded servers if needed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from devmeter.config import RUNTIME_FILE, Settings
from devmeter.errors import ConfigError
from devmeter.supervisor import Supervisor

if TYPE_CHECKING:
    from devmeter.embedded import EmbeddedBroker
    from ingest.jetstream import JetStreamOptions
    from ingest.nats_auth import NatsCredentialSync
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
            update: dict[str, object] = {"database_url": database_url}
            if config.service_password is None:
                # The embedded server asks every role for a password (any local user can
                # reach its port); the service role's is made once and kept with the data.
                update["service_password"] = _embedded_service_password(data_dir)
            config = config.model_copy(update=update)
        if config.database_url_names_service_role:
            # The owner migrates (compose: the `migrate` service); the service role cannot.
            _say(
                f"DEVMETER_DATABASE_URL logs in as the service role {config.service_role!r}: "
                "not migrating (run `devmeter migrate` as the owner)"
            )
        else:
            from devmeter.migrate import migrate

            result = migrate(
                database_url,
                storage=config.storage,
                heartbeat_retention_days=config.heartbeat_retention_days,
                service_role=config.service_role,
                service_password=(
                    config.service_password.get_secret_value() if config.service_password else None
                ),
            )
            _say(f"database schema at version {result.current_version}, storage mode {result.mode}")
        # Everything below logs in as the service role, whatever role the given URL names.
        service_url = config.service_database_url()
        _say(f"the service logs in as the database role {config.service_role!r}")

        supervisor = Supervisor()
        # Stops the parts it supervises (worker, then broker) before PostgreSQL stops.
        stack.callback(supervisor.stop)
        mqtt_url = config.mqtt_url
        if mqtt_url is None:
            mqtt_url = _start_authenticating_broker(service_url, data_dir, stop, stack, supervisor)

        if config.ingest_source == "jetstream":
            _start_nats_credentials(config, service_url, stop, stack)

        worker_config, worker_mqtt = config, mqtt_url
        supervisor.add(
            "ingest worker", lambda: IngestProcess.start(worker_config, service_url, worker_mqtt)
        )
        supervisor.start()
        _start_scheduler(config, service_url, stack)
        _start_api(config, service_url, mqtt_url, stack)

        runtime = data_dir / RUNTIME_FILE
        _write_runtime(
            runtime,
            {
                # The owner's, for `devmeter migrate` run here; every other command uses the
                # service role's.
                "database_url": database_url,
                "service_database_url": service_url,
                "mqtt_url": mqtt_url,
                "pid": str(os.getpid()),
            },
        )
        stack.callback(runtime.unlink, missing_ok=True)
        _say(f"ready; other devmeter commands run here use these servers ({runtime})")
        _say("press Ctrl-C to stop")
        stop.wait()
    _say("stopped")


def _start_authenticating_broker(
    database_url: str,
    data_dir: Path,
    stop: threading.Event,
    stack: ExitStack,
    supervisor: Supervisor,
) -> str:
    """The embedded Mosquitto with devices' keys and topic rights, as in production: devices
    connect with their own key, and devmeter's ingest with a password made for this run. The
    supervisor restarts it (same port, same data, same credentials) if it dies."""
    import secrets

    from devmeter.embedded import mosquitto_user
    from ingest.broker_auth import INGEST_USERNAME, CredentialSync

    password = secrets.token_urlsafe(24)
    current: list[EmbeddedBroker] = []
    sync = CredentialSync(
        database_url,
        data_dir / "broker-auth",
        reload=lambda: current[-1].reload() if current else None,
        ingest_password=password,
        owner=mosquitto_user() if os.geteuid() == 0 else None,
    )
    sync.write()
    broker = supervisor.add(
        "embedded MQTT broker", _broker_starter(data_dir / "broker", sync.directory, current)
    )
    thread = threading.Thread(target=sync.run, args=(stop,), name="broker-credentials", daemon=True)
    thread.start()
    stack.callback(thread.join, 10)
    _say(
        f"no DEVMETER_MQTT_URL: started embedded mosquitto at {broker.url} (MQTT 5, pid "
        f"{broker.pid}, data in {data_dir / 'broker'}; devices authenticate with their keys, "
        "docs/protocol.md); restarted on the same port if it dies"
    )
    host_port = broker.url.removeprefix("mqtt://")
    return f"mqtt://{INGEST_USERNAME}:{password}@{host_port}"


def _broker_starter(
    data_dir: Path, auth_dir: Path, current: list[EmbeddedBroker]
) -> Callable[[], EmbeddedBroker]:
    """Starts the embedded broker: first on a free port, then (a restart) on that same port,
    so clients and the worker reconnect to the address they know, and over the same data
    directory, so Mosquitto restores its sessions and queued messages."""
    from devmeter.embedded import start_broker

    port: int | None = None

    def start() -> EmbeddedBroker:
        nonlocal port
        broker = start_broker(data_dir, port=port, auth_dir=auth_dir)
        port = broker.port
        current.append(broker)  # the credential sync reloads the broker that runs now
        if broker.pid:
            log.info("embedded broker running on port %d, pid %d", port, broker.pid)
        return broker

    return start


def nats_credential_sync(config: Settings, database_url: str) -> NatsCredentialSync:
    """The NATS credential sync of DEVMETER_NATS_AUTH_FILE, reloading DEVMETER_NATS_PID_FILE's
    servers; devmeter's ingest is admitted with the password in DEVMETER_NATS_URL."""
    from urllib.parse import urlsplit

    from ingest.broker_auth import INGEST_USERNAME
    from ingest.jetstream import servers
    from ingest.nats_auth import NatsCredentialSync

    auth_file = config.require_nats_auth_file().resolve()
    logins = {(u.username, u.password) for u in map(urlsplit, servers(config.require_nats_url()))}
    password = next((p for user, p in logins if user == INGEST_USERNAME and p), None)
    if password is None or len(logins) != 1:
        raise ConfigError(
            f"DEVMETER_NATS_URL must carry the ingest login, nats://{INGEST_USERNAME}:"
            "<password>@host:port (the same on every node): NATS admits devmeter's ingest with "
            "that password"
        )
    if len(password.encode()) > 72:
        raise ConfigError("the ingest password in DEVMETER_NATS_URL: at most 72 bytes (bcrypt)")
    pids = config.nats_pids
    if not pids:
        log.warning(
            "DEVMETER_NATS_PID_FILE is not set: %s is kept current, but no nats-server is told "
            "to read it again",
            auth_file,
        )
    return NatsCredentialSync.for_servers(database_url, auth_file, pids, password)


def _start_nats_credentials(
    config: Settings, database_url: str, stop: threading.Event, stack: ExitStack
) -> None:
    """`devmeter up` with JetStream ingest: devices' users at NATS kept current, as the
    embedded Mosquitto's are (only when DEVMETER_NATS_AUTH_FILE names the file)."""
    if config.nats_auth_file is None:
        _say(
            "DEVMETER_INGEST_SOURCE=jetstream without DEVMETER_NATS_AUTH_FILE: devices' users "
            "at NATS are not kept by devmeter (docs/protocol.md, Credentials at NATS)"
        )
        return
    sync = nats_credential_sync(config, database_url)
    sync.sync()
    thread = threading.Thread(target=sync.run, args=(stop,), name="nats-credentials", daemon=True)
    thread.start()
    stack.callback(thread.join, 10)
    _say(
        f"NATS device users kept in {sync.auth_file} ({len(config.nats_pids)} nats-server(s) "
        "reloaded on a change)"
    )


class IngestProcess:
    """The ingest worker as a child process of `devmeter up` (``devmeter ingest``).

    A process rather than a thread so that it can die alone (and be restarted alone) and be
    killed on its own, as in production. Its stdin is a pipe from us: it stops, committing and
    acknowledging what it holds, when we close it or when we die, however we die.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    @classmethod
    def start(cls, config: Settings, database_url: str, mqtt_url: str) -> IngestProcess:
        env = {
            **os.environ,
            "DEVMETER_DATABASE_URL": database_url,
            "DEVMETER_MQTT_URL": mqtt_url,
            "DEVMETER_INGEST_CLIENT_ID": config.ingest_client_id,
            "DEVMETER_INGEST_SHARE_GROUP": config.ingest_share_group,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmeter", "ingest", "--stop-on-stdin-eof"],
            env=env,
            stdin=subprocess.PIPE,
        )
        _say(f"ingest worker started (pid {proc.pid}), MQTT client id {config.ingest_client_id!r}")
        return cls(proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(_WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("ingest worker (pid %d) did not stop; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait()


#: What a stopping worker may take to write and acknowledge what it holds.
_WORKER_STOP_TIMEOUT_S = 30.0


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
        _start_api(config, config.service_database_url(), mqtt_url, stack)
        return lambda: True

    _serve(start)


def run_api_workers(config: Settings, workers: int) -> None:
    """``devmeter api --workers N``: N processes, each listening on the port itself
    (SO_REUSEPORT: the kernel spreads connections over them), each with its own connection
    pool, so reads use every core. Each worker builds the app from the environment; the
    console's CSRF key is shared through it, so a form rendered by one worker is accepted by
    another.

    Not uvicorn's own ``workers=``: its supervisor's socket is made without naming the TCP
    protocol, so asyncio leaves Nagle on for its connections and every response waited some
    40 ms for the client's delayed ACK (measured: /healthz 44 ms p50 against 1.2 ms).
    """
    import multiprocessing
    import secrets

    if config.database_url is None:
        raise ConfigError("--workers needs DEVMETER_DATABASE_URL (no embedded database)")
    if config.api_port == 0:
        raise ConfigError("--workers needs a port (DEVMETER_API_PORT or --port), not 0")
    if config.console_secret is None:
        os.environ["DEVMETER_CONSOLE_SECRET"] = secrets.token_urlsafe(32)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    _install_signals(stop)
    spawn = multiprocessing.get_context("spawn")
    processes = [
        spawn.Process(target=_api_worker, args=(config.api_host, config.api_port), name=f"api-{n}")
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    _say(f"API at http://{config.api_host}:{config.api_port}/v1 with {workers} workers")
    while not stop.wait(0.5):
        if any(not p.is_alive() for p in processes):
            log.error("an API worker stopped by itself: stopping the others")
            break
    ended_by_itself = not stop.is_set()
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: uvicorn finishes the requests in flight
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.kill()
    if ended_by_itself:
        raise SystemExit(1)


def _api_worker(host: str, port: int) -> None:
    """One ``--workers`` process: its own listening socket on the shared port, and the app."""
    import socket

    import uvicorn

    from api.app import create_app

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket says IPPROTO_TCP. Without it every response waited for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(),
            log_level="warning",
            access_log=False,
            lifespan="on",
            # As serve_in_thread: the app applies DEVMETER_TRUSTED_PROXIES itself.
            proxy_headers=False,
        )
    )
    server.run(sockets=[sock])


def run_scheduler(config: Settings) -> None:
    """``devmeter scheduler``: month close (and webhooks) alone, against a configured database."""

    def start(stack: ExitStack, _stop: threading.Event) -> Callable[[], bool]:
        _start_scheduler(config, config.service_database_url(), stack)
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


def jetstream_options(config: Settings) -> JetStreamOptions:
    from ingest.jetstream import JetStreamOptions

    return JetStreamOptions(
        url=config.require_nats_url(),
        stream=config.jetstream_stream,
        consumer=config.jetstream_consumer,
        replicas=config.jetstream_replicas,
        ack_wait_s=config.jetstream_ack_wait_s,
        max_ack_pending=config.jetstream_max_ack_pending,
        max_age_s=config.jetstream_max_age_days * 86_400,
        name=config.ingest_client_id,
    )


def _start_ingest(
    config: Settings, database_url: str, mqtt_url: str | None, stop: threading.Event
) -> threading.Thread:
    from ingest.worker import IngestWorker

    if config.ingest_source == "jetstream":
        from ingest.jetstream import JetStreamSource

        options = jetstream_options(config)
        worker = IngestWorker(
            database_url,
            None,
            ingest_options(config),
            source=lambda inbox: JetStreamSource(options, inbox),
        )
    else:
        worker = IngestWorker(database_url, mqtt_url, ingest_options(config))
    if config.ingest_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.ingest_metrics_port, registry=worker.metrics.registry)
    thread = threading.Thread(target=worker.run, args=(stop,), name="ingest", daemon=True)
    thread.start()
    if config.ingest_source == "jetstream":
        _say(f"ingest worker started on NATS JetStream consumer {config.jetstream_consumer!r}")
    else:
        _say(f"ingest worker started, MQTT client id {config.ingest_client_id!r}")
    return thread


def run_ingest(config: Settings, *, stop_on_stdin_eof: bool = False) -> None:
    """``devmeter ingest``: the worker alone, against configured servers."""

    def start(stack: ExitStack, stop: threading.Event) -> Callable[[], bool]:
        database_url = config.service_database_url()
        mqtt_url = config.require_mqtt_url() if config.ingest_source == "mqtt" else None
        if stop_on_stdin_eof:

            def stop_at_eof() -> None:
                sys.stdin.buffer.read()  # returns at EOF: our parent closed it, or died
                stop.set()

            threading.Thread(target=stop_at_eof, name="stdin-eof", daemon=True).start()
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


#: In the data dir of `devmeter up` with the embedded PostgreSQL, beside its data.
SERVICE_PASSWORD_FILE = "service.password"  # noqa: S105 - a file name, not a password


def _embedded_service_password(data_dir: Path) -> SecretStr:
    """The service role's password for the embedded server: read, or made once and kept."""
    import secrets

    path = data_dir / SERVICE_PASSWORD_FILE
    if not path.exists():
        # Written whole under another name, then linked into place: two `up`s starting at once
        # in one folder both end up reading the one that was linked first.
        tmp = path.with_name(f"{SERVICE_PASSWORD_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return SecretStr(path.read_text(encoding="utf-8").strip())


def _write_runtime(path: Path, values: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)


class MosquittoProcess:
    """Mosquitto run by `devmeter broker` in the foreground of its container (production)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    @classmethod
    def start(cls, mosquitto: str, config_file: Path) -> MosquittoProcess:
        proc = subprocess.Popen([mosquitto, "-c", str(config_file)], stdin=subprocess.DEVNULL)  # noqa: S603
        _say(f"mosquitto started (pid {proc.pid}) with {config_file}")
        return cls(proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def reload(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.alive():
            # SIGTERM: Mosquitto saves its persistence database on the way out.
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def broker_config(base: str, auth_dir: Path) -> str:
    """The operator's Mosquitto configuration plus devmeter's authentication lines.

    The operator's file holds listeners, TLS, persistence and limits; authentication is
    devmeter's (docs/protocol.md), so the file must not set it itself.
    """
    from ingest.broker_auth import mosquitto_auth_lines

    own = ("allow_anonymous", "password_file", "acl_file", "use_username_as_clientid", "plugin")
    for number, line in enumerate(base.splitlines(), 1):
        words = line.split()
        if words and words[0] in (*own, "per_listener_settings"):
            if words[0] == "per_listener_settings" and words[1:] == ["false"]:
                continue
            raise ConfigError(
                f"the broker configuration sets {words[0]!r} (line {number}): devmeter broker "
                "sets authentication itself; remove it"
            )
    lines = mosquitto_auth_lines(auth_dir)
    return f"{base.rstrip()}\n\n# Added by `devmeter broker`: devices' keys and topic rights.\n" + (
        "\n".join(lines) + "\n"
    )


def run_broker(config: Settings, base_config: Path) -> None:
    """``devmeter broker``: Mosquitto with devices' keys and topic rights kept current from the
    database, restarted if it dies; the production counterpart of `devmeter up`'s broker."""
    from devmeter.embedded import find_mosquitto
    from ingest.broker_auth import INGEST_USERNAME, CredentialSync
    from ingest.mqtt import parse_mqtt_url

    address = parse_mqtt_url(config.require_mqtt_url())
    if address.username != INGEST_USERNAME or not address.password:
        raise ConfigError(
            f"DEVMETER_MQTT_URL must carry the ingest login, mqtt://{INGEST_USERNAME}:"
            "<password>@host:port: the broker admits devmeter's ingest with that password"
        )
    mosquitto = find_mosquitto()
    if mosquitto is None:
        raise ConfigError("mosquitto is not installed (apt-get install mosquitto)")
    data_dir = config.data_dir.resolve()
    auth_dir = data_dir / "broker-auth"
    config_file = data_dir / "mosquitto.conf"
    try:
        base = base_config.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {base_config}: {exc.strerror or exc}") from None
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(broker_config(base, auth_dir), encoding="utf-8")
    persistence = data_dir / "mosquitto"
    persistence.mkdir(exist_ok=True)
    owner = None
    if os.geteuid() == 0:
        # Started as root (not so in the image), Mosquitto drops to its own user, which must
        # read the credential files and write its persistence under the data directory.
        from devmeter.embedded import mosquitto_user
        from devmeter.embedded._common import _allow_traversal, _chown_to

        owner = mosquitto_user()
        _chown_to(persistence, owner)
        auth_dir.mkdir(exist_ok=True)
        _allow_traversal(auth_dir)
        _allow_traversal(persistence)

    def start(stack: ExitStack, stop: threading.Event) -> Callable[[], bool]:
        current: list[MosquittoProcess] = []
        sync = CredentialSync(
            config.service_database_url(),
            auth_dir,
            reload=lambda: current[-1].reload() if current else None,
            ingest_password=address.password or "",
            owner=owner,
        )
        sync.write()  # before Mosquitto starts: it must know the devices from its first second
        supervisor = Supervisor()
        stack.callback(supervisor.stop)

        def start_mosquitto() -> MosquittoProcess:
            process = MosquittoProcess.start(str(mosquitto), config_file)
            current.append(process)
            return process

        supervisor.add("mosquitto", start_mosquitto)
        supervisor.start()
        thread = threading.Thread(target=sync.run, args=(stop,), name="broker-credentials")
        thread.start()
        stack.callback(thread.join, 10)
        return lambda: True

    _serve(start)


def run_nats_credentials(config: Settings) -> None:
    """``devmeter broker nats``: the NATS credential sync alone, in the foreground (beside each
    nats-server that includes DEVMETER_NATS_AUTH_FILE)."""

    def start(stack: ExitStack, stop: threading.Event) -> Callable[[], bool]:
        sync = nats_credential_sync(config, config.service_database_url())
        thread = threading.Thread(target=sync.run, args=(stop,), name="nats-credentials")
        thread.start()
        stack.callback(thread.join, 10)
        _say(f"keeping {sync.auth_file} current from the database")
        return thread.is_alive

    _serve(start)
