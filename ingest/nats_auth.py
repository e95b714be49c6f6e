"""Device credentials and subject rights at NATS: the ``authorization`` block of nats.conf.

The NATS counterpart of ingest/broker_auth.py's Mosquitto files, on the same rules: a device
publishes its own heartbeat subject and nothing else, a gateway its gateway subject instead,
nobody but devmeter's ingest reads, and no device subscribes to anything (NATS checks
subscriptions at SUBSCRIBE, so a device's ``devmeter.>`` is refused outright). NATS's MQTT
listener applies the same users and permissions to MQTT clients, on the mapped subjects.

NATS has no per-user pattern (Mosquitto's ``%u``) in a static configuration, so each device
gets its own entry; NATS reads passwords in clear or as bcrypt (``$2a$``), not Mosquitto's
PBKDF2 ``$7$`` hash that the database holds. ``render_authorization`` therefore takes each
credential's secret in a form NATS reads: the bcrypt hash that registration and rotation store
beside the Mosquitto one (migration 0017, view ``nats_device_credentials``).

``NatsCredentialSync`` keeps that block in a file nats.conf includes (``include
devmeter-auth.conf``) and reloads nats-server when a registration or rotation commits, with
the machinery of Mosquitto's sync (ingest/broker_auth.py): LISTEN/NOTIFY, reads of what changed
since the last one, a full read every minute, atomic replace, at most one reload a second.
The reload is SIGHUP to each server's pid (what ``nats-server --signal reload=<pid>`` sends):
nats-server re-reads its users and closes the connections whose password no longer checks out,
so a rotated key is refused from then on. Several servers may include one file (a cluster on
one host; the tests'); on separate hosts each runs its own sync beside its server.

Devices registered before migration 0017 have no bcrypt hash (keys are never stored): they are
left out of NATS's users, keep connecting to Mosquitto, and are admitted at NATS once their key
is rotated. The sync logs how many there are when that number changes, and never a key.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, LiteralString

import orjson

from ingest.broker_auth import Credential, CredentialFiles
from ingest.protocol import TOPIC_ROOT, TOPIC_VERSION
from metering.secrets import nats_hash

log = logging.getLogger("devmeter.broker")

#: The include file's name when none is configured (DEVMETER_NATS_AUTH_FILE).
AUTH_FILE = "devmeter-auth.conf"
#: bcrypt's cost for devmeter's own password at NATS. Unlike a device key, an operator's
#: password may be guessable, and it is checked only when a worker connects: NATS's default.
SERVICE_BCRYPT_COST = 11


def subject_of(username: str, kind: str) -> str:
    """``acme/d1`` -> ``devmeter.v2.acme.d1.heartbeat`` (NATS's form of the MQTT topic)."""
    return ".".join([TOPIC_ROOT, TOPIC_VERSION, *username.split("/", 1), kind])


def render_authorization(credentials: Iterable[Credential], services: Mapping[str, str]) -> str:
    """The ``authorization`` block. ``services`` maps devmeter's own usernames (the ingest
    workers') to their passwords or bcrypt hashes.

    Written as JSON, which nats.conf reads: quoted strings also keep a bcrypt hash's '$' from
    being taken for a variable. One user per line, each encoded by orjson: ``json.dumps`` with
    ``indent`` runs in pure Python and took ~4 s of a sync at 100,000 devices.
    """
    # Each user is encoded as soon as it is made: holding 100,000 nested dicts until the end
    # kept the garbage collector scanning them (1.0 s of a 1.2 s render).
    lines = [
        orjson.dumps(
            {
                "user": name,
                "password": secret,
                "permissions": {
                    # The JetStream API (stream, consumer, pulls) and acknowledgements.
                    "publish": {"allow": ["$JS.API.>", "$JS.ACK.>"]},
                    "subscribe": {"allow": ["_INBOX.>"]},
                },
            }
        ).decode()
        for name, secret in sorted(services.items())
    ]
    for c in sorted(credentials):
        kind = "gateway" if c.is_gateway else "heartbeat"
        user = {
            "user": c.username,
            "password": c.password_hash,
            "permissions": {
                "publish": {"allow": [subject_of(c.username, kind)]},
                "subscribe": {"deny": [">"]},
            },
        }
        lines.append(orjson.dumps(user).decode())
    body = ",\n".join(lines)
    header = "# Written by devmeter (ingest/nats_auth.py); edits are overwritten."
    return f'{header}\nauthorization {{"users": [\n{body}\n]}}\n'


def signal_reload(pids: Sequence[str]) -> int:
    """SIGHUP each nats-server named by a pid or a pid file (nats.conf's ``pid_file``): what
    ``nats-server --signal reload=<pid>`` does, without needing the binary beside the sync.

    A pid file is read at each reload: a restarted server has a new pid. A server that is not
    running is skipped with a warning (it reads the file when it starts). Returns how many
    servers were signalled.
    """
    signalled = 0
    for source in pids:
        try:
            pid = int(source) if source.isdigit() else int(Path(source).read_text().split()[0])
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError, IndexError) as exc:
            log.warning("nats-server %s not reloaded: %s", source, exc)
            continue
        signalled += 1
    return signalled


@dataclass
class NatsCredentialSync(CredentialFiles):
    """nats.conf's ``authorization`` block in ``directory / file_name``, kept equal to the
    database; ``reload`` is usually ``lambda: signal_reload(pids)``."""

    VIEW: ClassVar[LiteralString] = "nats_device_credentials"
    BROKER: ClassVar[str] = "NATS"

    file_name: str = AUTH_FILE
    #: How many servers the last reload signalled (``for_servers``).
    signalled: int = 0

    @classmethod
    def for_servers(
        cls, database_url: str, auth_file: Path, pids: Sequence[str], ingest_password: str
    ) -> NatsCredentialSync:
        """Writes ``auth_file`` and reloads the servers ``pids`` names (``signal_reload``)."""
        made: list[NatsCredentialSync] = []

        def reload() -> None:
            made[0].signalled = signal_reload(pids)

        made.append(
            cls(
                database_url,
                auth_file.parent,
                reload=reload,
                ingest_password=ingest_password,
                file_name=auth_file.name,
            )
        )
        return made[0]

    @property
    def auth_file(self) -> Path:
        return self.directory / self.file_name

    def service_hash(self, password: str) -> str:
        return nats_hash(password, cost=SERVICE_BCRYPT_COST)

    def render(self, credentials: list[Credential], ingest_hash: str) -> dict[str, str]:
        return {
            self.file_name: render_authorization(credentials, {self.ingest_username: ingest_hash})
        }

    def _report_unhashed(self) -> None:
        if self.unhashed == 0:
            log.info("NATS: every device has a bcrypt hash now")
            return
        # A count, never a name list: at 100,000 devices a list would flood the log, and the
        # operator finds them in the view (password_hash IS NULL).
        log.warning(
            "NATS: %d devices have no bcrypt hash (registered before migration 0017, keys are "
            "never stored): they connect to Mosquitto only, and are admitted at NATS once their "
            "key is rotated (devmeter devices rotate-key)",
            self.unhashed,
        )
