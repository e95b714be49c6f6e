"""Device credentials and topic rights at the broker (Mosquitto's password_file and acl_file).

The database is the source of truth (view ``mqtt_device_credentials``, migration 0009); this
module renders the two files Mosquitto reads, keeps them current and reloads the broker:

* ``password_file``: one line per device, ``<account>/<device>:$7$...`` (the PBKDF2 hash stored
  at registration or rotation, never the key), plus devmeter's own ingest identity.
* ``acl_file``: one pattern gives every device write access to its own heartbeat topic and
  nothing else; each gateway gets its gateway topic instead; the ingest identity alone reads
  ``devmeter/#``. No device may read anything, so a subscription (``devmeter/#``,
  ``$share/...``, ``$SYS/#``) delivers it nothing (Mosquitto 2.0's acl_file checks reads when
  it delivers, not at SUBSCRIBE).

Why files and not the dynamic-security plugin: it needs one role per device (its ACLs take no
``%u``) and rewrites its whole JSON on every change; at 100,000 devices that is tens of MB per
registration. Patterns keep the ACL file independent of the fleet's size, and Mosquitto looks
up password entries in a hash table. ``CredentialSync`` rewrites the files when a registration
or rotation commits (LISTEN/NOTIFY) and sends the broker SIGHUP: Mosquitto then re-reads both
and disconnects clients whose password no longer matches (a rotated key).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, LiteralString

import psycopg

from ingest.protocol import TOPIC_ROOT, TOPIC_VERSION
from metering.secrets import broker_hash

log = logging.getLogger("devmeter.broker")

#: devmeter's own subscriber. No device username can equal it: device usernames hold a '/'.
INGEST_USERNAME = "devmeter-ingest"
CHANNEL = "devmeter_mqtt_credentials"
PASSWORD_FILE = "passwd"  # noqa: S105 - a file name, not a password
ACL_FILE = "acl"

# The oldest transaction still running now: every row a later read could miss was written by
# it or a younger one (xids of transactions that start later are larger still).
_SELECT_HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"


@dataclass(frozen=True, slots=True, order=True)
class Credential:
    username: str
    password_hash: str
    is_gateway: bool


#: Where the subscribe guard (ingest/broker_guard/devmeter_guard.c) is looked for: built by
#: ./dev into .tools/, by the Dockerfile into /usr/local/lib/devmeter/.
GUARD_ENV = "DEVMETER_MOSQUITTO_GUARD"
_GUARD_PATHS = (
    Path(__file__).resolve().parent.parent / ".tools" / "devmeter_guard.so",
    Path("/usr/local/lib/devmeter/devmeter_guard.so"),
)


def guard_plugin() -> Path | None:
    """The built subscribe guard, or None (then subscriptions are granted but deliver
    nothing: the ACL file gives devices no read rights)."""
    named = os.environ.get(GUARD_ENV)
    if named:
        return Path(named) if Path(named).is_file() else None
    return next((p for p in _GUARD_PATHS if p.is_file()), None)


def mosquitto_auth_lines(directory: Path, reader: str = INGEST_USERNAME) -> list[str]:
    """The lines of mosquitto.conf that turn authentication and topic rights on."""
    lines = [
        # No anonymous clients: a heartbeat without a device key would be billed.
        "allow_anonymous false",
        f"password_file {directory / PASSWORD_FILE}",
        f"acl_file {directory / ACL_FILE}",
        # The client id is the username: nobody can take over another client's session
        # (ingest's persistent session included) by connecting under its client id.
        "use_username_as_clientid true",
    ]
    guard = guard_plugin()
    if guard is None:
        log.warning(
            "Mosquitto subscribe guard not built (%s): devices' subscriptions are granted "
            "but deliver nothing",
            _GUARD_PATHS[0],
        )
    else:
        # Refuses every SUBSCRIBE but the reader's at SUBACK (Mosquitto 2.0's acl_file
        # checks reads only on delivery).
        lines += [f"plugin {guard}", f"plugin_opt_reader {reader}"]
    return lines


def render_password_file(credentials: Iterable[Credential], services: dict[str, str]) -> str:
    """``username:hash`` lines; ``services`` maps devmeter's own usernames to their hashes."""
    lines = [f"{name}:{hashed}" for name, hashed in sorted(services.items())]
    lines += [f"{c.username}:{c.password_hash}" for c in credentials]
    return "\n".join(lines) + "\n"


def render_acl_file(credentials: Iterable[Credential], reader: str = INGEST_USERNAME) -> str:
    prefix = f"{TOPIC_ROOT}/{TOPIC_VERSION}"
    lines = [
        "# Written by devmeter from its database (ingest/broker_auth.py); edits are overwritten.",
        "# Every device publishes its own heartbeats, and nothing else.",
        f"pattern write {prefix}/%u/heartbeat",
        "",
        "# devmeter's ingest is the only reader.",
        f"user {reader}",
        f"topic read {TOPIC_ROOT}/#",
    ]
    for c in credentials:
        if c.is_gateway:
            # Deny first: Mosquitto checks a user's own lines before the patterns.
            lines += [
                "",
                f"user {c.username}",
                f"topic deny {prefix}/{c.username}/heartbeat",
                f"topic write {prefix}/{c.username}/gateway",
            ]
    return "\n".join(lines) + "\n"


@dataclass
class CredentialFiles:
    """Keeps a broker's credential files equal to the database, and reloads the broker.

    What both brokers share (Mosquitto: ``CredentialSync`` below; NATS: ingest/nats_auth.py):
    each reads the devices' credentials from its own view (``username, password_hash,
    is_gateway, written_xact``) and renders its own files from them with ``render``.

    ``run`` waits for NOTIFY on ``devmeter_mqtt_credentials`` (sent when a registration or key
    rotation commits) and also resyncs every ``resync_s``, so a missed notification (database
    restart) only delays a change. Files are replaced atomically; the broker is reloaded only
    when their content changed. A failing database leaves the last files in place: devices
    already known keep connecting.
    """

    #: The view a subclass reads, and the broker's name in logs.
    VIEW: ClassVar[LiteralString]
    BROKER: ClassVar[str]

    database_url: str
    directory: Path
    reload: Callable[[], None]
    ingest_password: str
    ingest_username: str = INGEST_USERNAME
    #: Unix user that must read the files (Mosquitto drops root for it).
    owner: str | None = None
    resync_s: float = 60.0
    #: Several changes committed within this window are written (and reloaded) once.
    debounce_s: float = 0.05
    #: At least this long between two reloads: a broker re-reading 100,000 credentials serves
    #: nothing meanwhile (Mosquitto: about a second), so a stream of registrations must not
    #: keep it reloading. The first change after a quiet spell is applied at once.
    min_interval_s: float = 1.0
    syncs: int = 0
    reloads: int = 0
    last_sync_s: float = 0.0
    #: Devices the view lists without a hash this broker reads (NATS: registered before
    #: migration 0017); left out of the files.
    unhashed: int = 0
    _last_reload: float = field(default=float("-inf"), repr=False)
    _digest: str = field(default="", repr=False)
    #: What the files hold, by username; None until the first full read.
    _known: dict[str, Credential] | None = field(default=None, repr=False)
    _unhashed: set[str] = field(default_factory=set, repr=False)
    _horizon: str = field(default="", repr=False)
    _ingest_hash: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # One salt for the process's lifetime, so an unchanged fleet renders the same bytes.
        self._ingest_hash = self.service_hash(self.ingest_password)

    @property
    def devices(self) -> int:
        """Devices in the files (as of the last read)."""
        return len(self._known or {})

    def service_hash(self, password: str) -> str:
        """devmeter's own password as the broker reads it."""
        raise NotImplementedError

    def render(self, credentials: list[Credential], ingest_hash: str) -> dict[str, str]:
        """The files' contents by file name, from the credentials sorted by username."""
        raise NotImplementedError

    def write(
        self, conn: psycopg.Connection[tuple[object, ...]] | None = None, *, full: bool = True
    ) -> bool:
        """Render the files from the database; True when they changed (and were written).

        ``full=False`` reads only the credentials written since the previous read (a
        registration or rotation) and merges them into what the files hold: at 100,000
        devices that is milliseconds instead of the second a full read takes. Credentials are
        never deleted and a username never changes, so a merge misses nothing; the periodic
        full read is the safety net all the same.
        """
        started = time.perf_counter()
        if conn is None:
            with psycopg.connect(self.database_url) as own:
                self._read(own, full=full)
        else:
            self._read(conn, full=full)
        assert self._known is not None
        credentials = sorted(self._known.values())
        files = self.render(credentials, self._ingest_hash)
        digest = hashlib.sha256()
        for name, text in sorted(files.items()):
            digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        self.syncs += 1
        self.last_sync_s = time.perf_counter() - started
        if len(self._unhashed) != self.unhashed:
            self.unhashed = len(self._unhashed)
            self._report_unhashed()
        if digest.hexdigest() == self._digest:
            return False
        for name, text in files.items():
            self._replace(self.directory / name, text)
        self._digest = digest.hexdigest()
        log.info(
            "%s credentials written: %d devices (%d gateways) in %.3f s",
            self.BROKER,
            len(credentials),
            sum(c.is_gateway for c in credentials),
            time.perf_counter() - started,
        )
        return True

    def _report_unhashed(self) -> None:
        """Said when the number of devices without a hash changes (a count, never a key)."""
        log.warning("%s: %d devices have no hash it reads", self.BROKER, self.unhashed)

    def _read(self, conn: psycopg.Connection[tuple[object, ...]], *, full: bool) -> None:
        row = conn.execute(_SELECT_HORIZON).fetchone()
        assert row is not None
        horizon = str(row[0])
        # Unordered, sorted in Python: the query with ORDER BY on the username built from a
        # join took 1.2 s of a 1.9 s sync at 100,000 devices (docs/benchmarks.md, Provisioning).
        select: LiteralString = "SELECT username, password_hash, is_gateway FROM " + self.VIEW
        if full or self._known is None:
            rows = conn.execute(select).fetchall()
            self._known = {}
            self._unhashed = set()
        else:
            since = select + " WHERE written_xact >= %s::xid8"
            rows = conn.execute(since, (self._horizon,)).fetchall()
        for u, h, g in rows:
            name = str(u)
            if h is None:
                self._known.pop(name, None)
                self._unhashed.add(name)
            else:
                self._unhashed.discard(name)
                self._known[name] = Credential(name, str(h), bool(g))
        self._horizon = horizon

    def sync(
        self, conn: psycopg.Connection[tuple[object, ...]] | None = None, *, full: bool = True
    ) -> bool:
        """``write``, then reload the broker if anything changed."""
        changed = self.write(conn, full=full)
        if changed:
            self.reload()
            self.reloads += 1
            self._last_reload = time.monotonic()
        return changed

    def run(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                with psycopg.connect(self.database_url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.5
                    self.sync(conn)
                    self._listen(conn, stop)
            except psycopg.Error as exc:
                log.warning("%s credential sync: %s; retrying in %.1f s", self.BROKER, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _listen(self, conn: psycopg.Connection[tuple[object, ...]], stop: threading.Event) -> None:
        next_resync = time.monotonic() + self.resync_s
        while not stop.is_set():
            # Short waits, so that `stop` is seen within a second.
            woke = any(True for _ in conn.notifies(timeout=1.0, stop_after=1))
            if woke:
                # Drain what else committed meanwhile: one write for a burst.
                since = time.monotonic() - self._last_reload
                stop.wait(max(self.debounce_s, self.min_interval_s - since))
                for _ in conn.notifies(timeout=0.001):
                    pass
            if time.monotonic() >= next_resync:
                self.sync(conn)
                next_resync = time.monotonic() + self.resync_s
            elif woke:
                self.sync(conn, full=False)

    def _replace(self, path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o640)
        if self.owner is not None and os.geteuid() == 0:
            import pwd

            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(self.owner)
                os.chown(tmp, entry.pw_uid, entry.pw_gid)
        os.replace(tmp, path)


@dataclass
class CredentialSync(CredentialFiles):
    """Mosquitto's password and ACL files (see the module's docstring); Mosquitto re-reads
    both on SIGHUP and disconnects clients whose password no longer matches (a rotated key)."""

    VIEW: ClassVar[LiteralString] = "mqtt_device_credentials"
    BROKER: ClassVar[str] = "broker"

    @property
    def password_file(self) -> Path:
        return self.directory / PASSWORD_FILE

    @property
    def acl_file(self) -> Path:
        return self.directory / ACL_FILE

    def service_hash(self, password: str) -> str:
        return broker_hash(password)

    def render(self, credentials: list[Credential], ingest_hash: str) -> dict[str, str]:
        return {
            PASSWORD_FILE: render_password_file(credentials, {self.ingest_username: ingest_hash}),
            ACL_FILE: render_acl_file(credentials, self.ingest_username),
        }
