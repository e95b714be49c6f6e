"""Device credentials and subject rights at NATS: the ``authorization`` block of nats.conf.

The NATS counterpart of ingest/broker_auth.py's Mosquitto files, on the same rules: a device
publishes its own heartbeat subject and nothing else, a gateway its gateway subject instead,
nobody but devmeter's ingest reads, and no device subscribes to anything (NATS checks
subscriptions at SUBSCRIBE, so a device's ``devmeter.>`` is refused outright). NATS's MQTT
listener applies the same users and permissions to MQTT clients, on the mapped subjects.

NATS has no per-user pattern (Mosquitto's ``%u``) in a static configuration, so each device
gets its own entry; NATS reads passwords in clear or as bcrypt (``$2a$``), not Mosquitto's
PBKDF2 ``$7$`` hash that the database holds. ``render_authorization`` therefore takes each
credential's secret in a form NATS reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from ingest.broker_auth import Credential
from ingest.protocol import TOPIC_ROOT, TOPIC_VERSION


def subject_of(username: str, kind: str) -> str:
    """``acme/d1`` -> ``devmeter.v2.acme.d1.heartbeat`` (NATS's form of the MQTT topic)."""
    return ".".join([TOPIC_ROOT, TOPIC_VERSION, *username.split("/", 1), kind])


def render_authorization(credentials: Iterable[Credential], services: Mapping[str, str]) -> str:
    """The ``authorization`` block. ``services`` maps devmeter's own usernames (the ingest
    workers') to their passwords or bcrypt hashes.

    Written as JSON, which nats.conf reads: quoted strings also keep a bcrypt hash's '$' from
    being taken for a variable.
    """
    users: list[dict[str, object]] = [
        {
            "user": name,
            "password": secret,
            "permissions": {
                # The JetStream API (stream, consumer, pulls) and acknowledgements.
                "publish": {"allow": ["$JS.API.>", "$JS.ACK.>"]},
                "subscribe": {"allow": ["_INBOX.>"]},
            },
        }
        for name, secret in sorted(services.items())
    ]
    for c in sorted(credentials):
        kind = "gateway" if c.is_gateway else "heartbeat"
        users.append(
            {
                "user": c.username,
                "password": c.password_hash,
                "permissions": {
                    "publish": {"allow": [subject_of(c.username, kind)]},
                    "subscribe": {"deny": [">"]},
                },
            }
        )
    body = json.dumps({"users": users}, indent=2)
    header = "# Written by devmeter (ingest/nats_auth.py); edits are overwritten."
    return f"{header}\nauthorization {body}\n"
