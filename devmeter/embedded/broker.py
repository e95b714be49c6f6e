"""Embedded MQTT broker, for `devmeter up` without a broker and for the test suite.

Mosquitto when it is installed (MQTT 5, persistent sessions), run through a small supervisor
process that stops it when its owner goes, however the owner dies; else amqtt in a thread
(MQTT 3.1.1, in memory). Running as root, Mosquitto drops to its own system user.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from devmeter.embedded._common import (
    _POLL_INTERVAL,
    _PORT_ATTEMPTS,
    _STOP_TIMEOUT,
    EmbeddedServerError,
    _allow_traversal,
    _chown_to,
    _read_from,
    _user_exists,
    free_port,
    helper_argv,
)

_MOSQUITTO_CONF = "mosquitto.conf"
_MOSQUITTO_LOG = "mosquitto.log"
_MOSQUITTO_DATA = "mosquitto"

_BROKER_START_TIMEOUT = 15.0
#: Written by the supervisor process: the pid of the mosquitto it runs (tests kill it by pid).
_MOSQUITTO_PID = "mosquitto.pid"

#: Mosquitto saves its in-memory database (sessions, subscriptions, queued messages) every this
#: many seconds. A SIGKILL of the broker loses what changed since the last save: messages
#: queued for a subscriber that was offline or had its in-flight window full (one handed to a
#: connected subscriber is held by that subscriber), and a session or subscription made
#: since. Mosquitto's default is 1800 s. Counting changes instead (autosave_on_changes)
#: would leave a session with no queued messages unsaved indefinitely, and would rewrite the
#: whole database every N messages while a backlog builds; one save a second costs one write
#: of the database a second (docs/protocol.md, "Delivery guarantees").
AUTOSAVE_INTERVAL_S = 1


@dataclass
class EmbeddedBroker:
    url: str
    kind: Literal["mosquitto", "amqtt"]
    protocol: Literal["5", "3.1.1"]
    port: int
    _stop: Callable[[], None] = field(repr=False, compare=False)
    _alive: Callable[[], bool] = field(repr=False, compare=False)
    #: The broker's own process (mosquitto), None for amqtt (a thread of ours).
    pid: int | None = None
    #: Where its password and ACL files are (ingest/broker_auth.py); None: anonymous.
    auth_dir: Path | None = None
    _stopped: bool = field(default=False, repr=False, compare=False)

    def reload(self) -> None:
        """Make Mosquitto re-read its password and ACL files (SIGHUP): it then also closes
        connections whose password no longer matches (a rotated key)."""
        if self.pid is None or self.auth_dir is None:
            raise EmbeddedServerError(f"this {self.kind} broker has no credentials to reload")
        if os.geteuid() == 0:
            _allow_traversal(self.auth_dir)  # see there: a pytest session may have reset it
        with contextlib.suppress(ProcessLookupError):  # it died: its successor reads the files
            os.kill(self.pid, signal.SIGHUP)

    def alive(self) -> bool:
        """Whether the broker still runs; False once it died (or was stopped)."""
        return not self._stopped and self._alive()

    def stop(self) -> None:
        """Stop the broker and wait for it to be gone. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self._stop()


def start_broker(
    data_dir: Path,
    *,
    prefer: Literal["auto", "mosquitto", "amqtt"] = "auto",
    port: int | None = None,
    auth_dir: Path | None = None,
) -> EmbeddedBroker:
    """Start an MQTT broker on 127.0.0.1, on ``port`` or else on a free port.

    Mosquitto (MQTT 5, persistent sessions under ``data_dir``) when it is installed, else
    amqtt in a background thread (MQTT 3.1.1, in memory only). ``prefer`` forces one.
    Starting again with the same ``data_dir`` and ``port`` (a restart after the broker died)
    gives clients the same address and Mosquitto its saved sessions and queued messages.

    With ``auth_dir`` the broker admits only the identities of the password file there and
    enforces its ACL file (ingest/broker_auth.py writes both before this is called); that
    needs Mosquitto. Without it the broker is anonymous, for tests that need no device keys.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    mosquitto = find_mosquitto() if prefer != "amqtt" else None
    if (prefer == "mosquitto" or auth_dir is not None) and mosquitto is None:
        raise EmbeddedServerError(
            "mosquitto is not installed (looked on PATH and in /usr/sbin); devmeter's broker "
            "authentication needs it: apt-get install mosquitto"
        )

    broker: EmbeddedBroker
    if mosquitto is not None:
        bound, pid, proc, stop = _start_mosquitto(mosquitto, data_dir, port, auth_dir)
        broker = EmbeddedBroker(
            f"mqtt://127.0.0.1:{bound}",
            "mosquitto",
            "5",
            bound,
            _stop=stop,
            _alive=lambda: proc.poll() is None,
            pid=pid,
            auth_dir=auth_dir,
        )
    else:
        thread = _start_amqtt(port)
        broker = EmbeddedBroker(
            f"mqtt://127.0.0.1:{thread.port}",
            "amqtt",
            "3.1.1",
            thread.port,
            _stop=thread.stop,
            _alive=thread.is_alive,
        )
    atexit.register(broker.stop)
    return broker


def find_mosquitto() -> Path | None:
    # Debian installs it in /usr/sbin, which is not on a non-root user's PATH.
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path=os.pathsep.join(["/usr/sbin", "/usr/local/sbin"])
    )
    return Path(found) if found else None


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def mosquitto_config(
    data_dir: Path,
    port: int,
    *,
    autosave_interval_s: int = AUTOSAVE_INTERVAL_S,
    auth_dir: Path | None = None,
) -> str:
    """The whole configuration of devmeter's own Mosquitto (``devmeter up``, the tests).

    One function, so that everything the broker is told (listener, persistence, limits,
    and later authentication) is in one place and tests run the broker ``up`` runs.
    """
    from ingest.broker_auth import mosquitto_auth_lines

    persistence = data_dir / _MOSQUITTO_DATA
    lines = [
        "# Written by devmeter.embedded for a local broker; rewritten on every start.",
        f"listener {port} 127.0.0.1",
        # Devices' keys and topic rights (ingest/broker_auth.py), as in production; anonymous
        # only for tests that ask for it (loopback only).
        *(mosquitto_auth_lines(auth_dir) if auth_dir is not None else ["allow_anonymous true"]),
        "persistence true",
        f"persistence_location {persistence}/",
        # Save every second rather than every 30 minutes (the default): what a SIGKILL can
        # lose is what was queued within the last interval (AUTOSAVE_INTERVAL_S).
        f"autosave_interval {autosave_interval_s}",
        # A persistent session (clean_session=false) queues while its subscriber, e.g.
        # devmeter's ingest, is away; mosquitto's default of 1000 would drop the rest.
        "max_queued_messages 100000",
        "max_inflight_messages 1000",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",  # includes the "running" line start_broker waits for
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if os.geteuid() == 0:
        # Named explicitly so that the persistence directory can be given to it.
        lines.append(f"user {mosquitto_user()}")
    return "\n".join(lines) + "\n"


def mosquitto_user() -> str:
    """The user Mosquitto runs as when started by root: it must read the broker's files."""
    return "mosquitto" if _user_exists("mosquitto") else "nobody"  # mosquitto's own fallback


def _start_mosquitto(
    mosquitto: Path, data_dir: Path, fixed_port: int | None, auth_dir: Path | None
) -> tuple[int, int, subprocess.Popen[bytes], Callable[[], None]]:
    """Port, mosquitto's pid, the supervisor process and a stop function."""
    persistence = data_dir / _MOSQUITTO_DATA
    persistence.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        # Mosquitto drops root for this user, which then writes mosquitto.db.
        _chown_to(persistence, mosquitto_user())
        _allow_traversal(persistence)
        if auth_dir is not None:
            # ... and reads the password and ACL files there, at start and on every reload.
            _allow_traversal(auth_dir)
    config = data_dir / _MOSQUITTO_CONF
    log_path = data_dir / _MOSQUITTO_LOG
    pid_path = data_dir / _MOSQUITTO_PID

    log_tail = ""
    for attempt in range(_PORT_ATTEMPTS):
        if fixed_port is not None and attempt:
            # The same port: whatever held it (a dying broker) may let go in a moment.
            time.sleep(0.5)
        port = fixed_port or free_port()
        config.write_text(mosquitto_config(data_dir, port, auth_dir=auth_dir), encoding="utf-8")
        pid_path.unlink(missing_ok=True)
        with log_path.open("ab") as log:
            log_offset = log.tell()
            # Through a supervisor that stops mosquitto when our end of its stdin closes:
            # that happens on stop() and also when this process dies, however it dies.
            proc = subprocess.Popen(  # noqa: S603 - our interpreter, our file, our paths
                helper_argv(
                    "broker", "_supervise", str(pid_path), str(mosquitto), "-c", str(config)
                ),
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + _BROKER_START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            # The port accepting connections alone proves nothing: whoever took the port
            # from under us accepts them too, while our mosquitto exits on "Address already
            # in use". Mosquitto logs "running" only once all its listeners are open.
            if (
                _MOSQUITTO_RUNNING.search(_read_from(log_path, log_offset))
                and _port_accepts(port)
                and pid_path.exists()
            ):
                pid = int(pid_path.read_text(encoding="utf-8"))
                return port, pid, proc, _mosquitto_stopper(proc, persistence)
            time.sleep(_POLL_INTERVAL)
        _supervisor_stopper(proc)()
        log_tail = _read_from(log_path, log_offset)
        if "Address already in use" not in log_tail:
            break
    raise EmbeddedServerError(f"mosquitto did not start ({log_path}):\n{log_tail[-4000:]}")


_MOSQUITTO_RUNNING = re.compile(r"mosquitto version \S+ running")


def _mosquitto_stopper(proc: subprocess.Popen[bytes], persistence: Path) -> Callable[[], None]:
    stop_supervisor = _supervisor_stopper(proc)

    def stop() -> None:
        if os.geteuid() == 0:
            # Mosquitto saves its database at shutdown, as its own user, by full path.
            _allow_traversal(persistence)
        stop_supervisor()

    return stop


def _supervisor_stopper(proc: subprocess.Popen[bytes]) -> Callable[[], None]:
    def stop() -> None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            # Longer than the supervisor's own escalation to SIGKILL: killing the supervisor
            # first would orphan the broker.
            proc.wait(timeout=_STOP_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    return stop


def _supervise(pid_file: str, argv: list[str]) -> int:
    """Run mosquitto until our stdin closes; exits with it, so the owner sees it die."""
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # noqa: S603 - argv from start_broker
    Path(pid_file).write_text(str(child.pid), encoding="utf-8")

    def stop_child_when_parent_goes() -> None:
        sys.stdin.buffer.read()  # returns at EOF: stop() closed it, or the parent died
        # SIGTERM again until it exits: mosquitto 2.0.11 ignored 14 in 200 SIGTERMs sent just
        # after it logged "running" (a start_broker() followed at once by stop()), and
        # SIGKILL would lose its unsaved database.
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline:
            child.terminate()
            try:
                child.wait(timeout=0.25)
                return
            except subprocess.TimeoutExpired:
                continue
        child.kill()

    threading.Thread(target=stop_child_when_parent_goes, daemon=True).start()
    code = child.wait()
    # Straight out: a normal interpreter exit would wait on the thread still reading stdin
    # (when mosquitto died by itself) and abort with "could not acquire lock for <stdin>".
    sys.stdout.flush()
    os._exit(code if code >= 0 else 128 - code)


class _AmqttThread(threading.Thread):
    """amqtt's broker on its own event loop, so it serves whatever the caller's thread does."""

    def __init__(self, port: int) -> None:
        super().__init__(name=f"amqtt-broker-{port}", daemon=True)
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            broker = self.loop.run_until_complete(self._start())
        except BaseException as exc:  # handed to the starting thread, which raises it
            self.error = exc
            self.ready.set()
            self.loop.close()
            return
        self.ready.set()
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(broker.shutdown())
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    async def _start(self) -> Any:
        from amqtt.broker import Broker

        # Plugins listed explicitly: amqtt's defaults include BrokerSysPlugin, whose loading
        # emits a DeprecationWarning (about psutil), and leaving "plugins" out falls back to
        # entry-point loading, which emits another one.
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config)
        await broker.start()
        return broker

    def stop(self) -> None:
        # Not guarded by loop.is_running(): right after `ready` it may not run *yet*, and a
        # stop queued then still ends run_forever() as soon as it starts.
        with contextlib.suppress(RuntimeError):  # loop already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.join(timeout=_STOP_TIMEOUT)


def _start_amqtt(fixed_port: int | None) -> _AmqttThread:
    error: BaseException | None = None
    for _ in range(_PORT_ATTEMPTS):
        thread = _AmqttThread(fixed_port or free_port())
        thread.start()
        if not thread.ready.wait(timeout=_BROKER_START_TIMEOUT):
            thread.stop()
            raise EmbeddedServerError(f"amqtt did not start within {_BROKER_START_TIMEOUT:.0f}s")
        if thread.error is None:
            return thread
        thread.join()
        error = thread.error
        if not _is_address_in_use(error):
            break
    raise EmbeddedServerError(f"amqtt did not start: {error!r}") from error


def _is_address_in_use(error: BaseException | None) -> bool:
    # amqtt wraps the OSError in BrokerError (raise ... from).
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            return True
        error = error.__cause__
    return False


def _main(argv: list[str]) -> int:
    command, *args = argv
    if command == "_supervise":
        pid_file, *argv = args
        return _supervise(pid_file, argv)
    raise SystemExit(f"unknown command {command!r}")
