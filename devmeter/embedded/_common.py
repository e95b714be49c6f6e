"""What the embedded servers share: errors, ports, locks, users, processes. Standard library only.

The helper processes (the PostgreSQL reaper, the broker's supervisor) run in a fresh
interpreter (``helper_argv``), so nothing under ``devmeter.embedded`` imports anything outside
the standard library at module level.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.02
_PORT_ATTEMPTS = 4
_PERMISSION_ATTEMPTS = 3
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


def _read_from(path: Path, offset: int) -> str:
    with path.open(encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return f.read()


def helper_argv(module: str, *args: str) -> list[str]:
    """The argv that runs ``devmeter.embedded.<module>._main(args)`` in a fresh interpreter.

    ``-I`` keeps the caller's environment (PYTHONPATH, user site) out of a process that may
    outlive it; it also leaves the script's own folder off ``sys.path``, so the folder holding
    the ``devmeter`` package is put there explicitly: the helper runs the caller's code,
    installed or not.
    """
    root = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        f"from devmeter.embedded.{module} import _main; sys.exit(_main(sys.argv[1:]))"
    )
    return [sys.executable, "-I", "-c", code, *args]
