"""Property tests: whatever arrives on the wire, the processor answers, never raises."""

from __future__ import annotations

import json
from datetime import UTC, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.processor import (
    MAX_PAYLOAD_BYTES,
    QUARANTINE_PAYLOAD_BYTES,
    Heartbeat,
    Rejection,
    device_topic,
    gateway_topic,
    process,
)
from tests.unit.test_processor import DIRECTORY, RECEIVED

TOPICS = st.one_of(
    st.sampled_from(
        [
            device_topic("acme", "d1"),
            gateway_topic("acme", "g1"),
            device_topic("acme", "c1"),
            gateway_topic("acme", "d1"),
        ]
    ),
    st.text(max_size=80),
    st.builds(device_topic, st.just("acme"), st.text(max_size=40)),
    st.builds(gateway_topic, st.just("acme"), st.text(max_size=40)),
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)

TS = st.one_of(
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
    st.integers(min_value=-(2**63), max_value=2**63),
)

# Mostly-valid bodies reach the deeper checks (time, binding, children) random JSON rarely hits.
NEAR_VALID = st.fixed_dictionaries(
    {
        "state": st.sampled_from(["active", "inactive", "ACTIVE", "", None]),
        "ts": TS,
        "seq": st.one_of(
            st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.text()
        ),
    },
    optional={
        "devices": st.lists(
            st.fixed_dictionaries(
                {"id": st.sampled_from(["c1", "d1", "g1", "zz", ""]) | st.text(max_size=5)},
                optional={"state": st.sampled_from(["active", "inactive", "x"])},
            ),
            max_size=8,
        ),
        "extra": JSON,
    },
)


def _check(result: list[Heartbeat] | Rejection, payload: bytes) -> None:
    if isinstance(result, Rejection):
        assert result.detail
        assert len(result.payload) <= QUARANTINE_PAYLOAD_BYTES
        assert payload.startswith(result.payload)
        return
    assert isinstance(result, list)
    assert result, "an accepted message yields at least one heartbeat"
    for heartbeat in result:
        assert heartbeat.time.tzinfo is not None
        assert heartbeat.time <= RECEIVED + timedelta(minutes=5)
        assert heartbeat.state in ("active", "inactive")
        assert ("acme", heartbeat.device_id) in DIRECTORY


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(topic=TOPICS, payload=st.binary(max_size=2048))
def test_arbitrary_bytes(topic: str, payload: bytes) -> None:
    _check(process(topic, payload, RECEIVED, DIRECTORY), payload)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(topic=TOPICS, body=JSON)
def test_arbitrary_json(topic: str, body: object) -> None:
    payload = json.dumps(body).encode()
    _check(process(topic, payload, RECEIVED, DIRECTORY), payload)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(topic=TOPICS, body=NEAR_VALID)
def test_near_valid_json(topic: str, body: dict[str, object]) -> None:
    payload = json.dumps(body).encode()
    _check(process(topic, payload, RECEIVED, DIRECTORY), payload)


def test_oversized_payload_is_a_rejection() -> None:
    payload = b"{" + b" " * MAX_PAYLOAD_BYTES + b"}"
    result = process(device_topic("acme", "d1"), payload, RECEIVED, DIRECTORY)
    assert isinstance(result, Rejection)
