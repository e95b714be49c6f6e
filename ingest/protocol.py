"""The MQTT identity of a device: its username, client id and topic (docs/protocol.md, v2).

Pure: the CLI, API and console use it to tell a device how to connect, the processor to read a
topic, the broker sync to grant each identity its topic.
"""

from __future__ import annotations

from typing import TypedDict
from urllib.parse import urlsplit

TOPIC_ROOT = "devmeter"
TOPIC_VERSION = "v2"


class MqttConnection(TypedDict):
    url: str | None
    username: str
    password: str
    client_id: str
    topic: str


def mqtt_username(account_ref: str, device_id: str) -> str:
    """A device's MQTT username and client id: its account and its id (ids repeat across
    accounts, D1a). Account refs hold no '/', so the first '/' splits the two."""
    return f"{account_ref}/{device_id}"


def device_topic(account_ref: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{TOPIC_VERSION}/{mqtt_username(account_ref, device_id)}/heartbeat"


def gateway_topic(account_ref: str, gateway_id: str) -> str:
    return f"{TOPIC_ROOT}/{TOPIC_VERSION}/{mqtt_username(account_ref, gateway_id)}/gateway"


def parse_topic(topic: str) -> tuple[str, str, bool] | None:
    """(account ref, device id, is a gateway topic), or None for any other topic."""
    parts = topic.split("/")
    if (
        len(parts) != 5
        or parts[0] != TOPIC_ROOT
        or parts[1] != TOPIC_VERSION
        or parts[4] not in ("heartbeat", "gateway")
        or not parts[2]
        or not parts[3]
    ):
        return None
    return parts[2], parts[3], parts[4] == "gateway"


def connection(
    url: str | None, account_ref: str, device_id: str, key: str, *, is_gateway: bool
) -> MqttConnection:
    """Everything a device needs to connect and publish (shown once, with its key)."""
    username = mqtt_username(account_ref, device_id)
    topic = (gateway_topic if is_gateway else device_topic)(account_ref, device_id)
    return {
        "url": url,
        "username": username,
        "password": key,
        "client_id": username,
        "topic": topic,
    }


def mosquitto_pub_command(conn: MqttConnection) -> str:
    """A ready command line that publishes one heartbeat as this device (console, docs)."""
    parts = urlsplit(conn["url"] or "mqtt://localhost")
    host = parts.hostname or "localhost"
    port = parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)
    tls = " --capath /etc/ssl/certs" if parts.scheme in ("mqtts", "ssl") else ""
    # Epoch milliseconds from the shell, so the heartbeat is dated now when it is run.
    payload = '{\\"state\\":\\"active\\",\\"ts\\":$(date +%s%3N),\\"seq\\":1}'
    return (
        f"mosquitto_pub -h {host} -p {port}{tls} -V mqttv5 -q 1 "
        f"-i '{conn['client_id']}' -u '{conn['username']}' -P '{conn['password']}' "
        f"-t '{conn['topic']}' -m \"{payload}\""
    )
