"""Pure heartbeat processing: ``(topic, payload, received_at)`` -> heartbeats or a rejection.

No I/O here. The device directory (who exists, which gateway a device is bound to) is passed
in, so this runs the same in the worker, in tests and in benchmarks. See docs/protocol.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Literal

import msgspec

from ingest.protocol import TOPIC_ROOT, TOPIC_VERSION
from ingest.protocol import device_topic as device_topic
from ingest.protocol import gateway_topic as gateway_topic
from ingest.protocol import parse_topic as _parse_topic

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_CHILDREN = 1000
MAX_FUTURE = timedelta(minutes=5)
#: Rejected payloads are kept in quarantine up to this size: enough to diagnose, bounded.
QUARANTINE_PAYLOAD_BYTES = 4096

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_MAX_SEQ = 2**63 - 1

State = Literal["active", "inactive"]


log = logging.getLogger("devmeter.ingest")


class Reason(StrEnum):
    BAD_TOPIC = "bad_topic"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    MALFORMED_JSON = "malformed_json"
    SCHEMA = "schema"
    TOO_MANY_CHILDREN = "too_many_children"
    UNKNOWN_DEVICE = "unknown_device"
    NOT_A_GATEWAY = "not_a_gateway"
    NOT_BOUND = "not_bound"
    TS_IN_FUTURE = "ts_in_future"
    BEFORE_REGISTRATION = "before_registration"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    account_id: int
    device_class: str
    gateway_id: str | None
    registered_at: datetime


@dataclass(frozen=True, slots=True)
class Heartbeat:
    time: datetime
    device_id: str
    account_id: int
    device_class: str
    state: State
    seq: int
    #: Who published it: the device itself, or the gateway it is bound to.
    reporter: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str
    topic: str
    payload: bytes
    received_at: datetime
    #: The account and device the topic names, when that device is registered: the account
    #: sees its own rejections (GET /v1/rejections), never another's.
    account_id: int | None = None
    device_id: str | None = None


#: Who a topic is about: (account ref, device id). Device ids are unique per account (D1a).
DeviceKey = tuple[str, str]


class _Child(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    state: State


class _DevicePayload(msgspec.Struct, forbid_unknown_fields=True):
    state: State
    ts: str | int
    seq: int


class _GatewayPayload(msgspec.Struct, forbid_unknown_fields=True):
    state: State
    ts: str | int
    seq: int
    devices: list[_Child] = []


_decode_device = msgspec.json.Decoder(_DevicePayload).decode
_decode_gateway = msgspec.json.Decoder(_GatewayPayload).decode


class _Refused(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def process(
    topic: str, payload: bytes, received_at: datetime, directory: Mapping[DeviceKey, DeviceInfo]
) -> list[Heartbeat] | Rejection:
    """Turn one MQTT message into the heartbeats it reports, or say why it is refused.

    A message is accepted or refused whole: a gateway batch with one bad child is refused,
    and kept in quarantine, rather than stored in part.
    """
    try:
        return _process(topic, payload, received_at, directory)
    except _Refused as refused:
        reason, detail = refused.reason, refused.detail
    except Exception as exc:  # a case this module did not foresee must not stop ingest
        log.exception("unforeseen error processing a message on %r; quarantined", topic)
        reason, detail = Reason.SCHEMA, f"unprocessable: {type(exc).__name__}: {exc}"
    account_id, device_id = _subject(topic, directory)
    return Rejection(
        reason,
        _storable(detail)[:_DETAIL_CHARS],
        _storable(topic),
        payload[:QUARANTINE_PAYLOAD_BYTES],
        received_at,
        account_id,
        device_id,
    )


def _subject(
    topic: str, directory: Mapping[DeviceKey, DeviceInfo]
) -> tuple[int, str] | tuple[None, None]:
    """The registered device (its account id and id) a topic names, or (None, None)."""
    about = _parse_topic(topic)
    info = directory.get(about[:2]) if about is not None else None
    if about is None or info is None:
        return None, None
    return info.account_id, about[1]


#: Quarantine keeps the start of a long detail (msgspec quotes unknown field names whole).
_DETAIL_CHARS = 500


def _storable(text: str) -> str:
    """``text`` as PostgreSQL can store it: NUL, which text columns refuse (msgspec copies
    field names into its messages as they are), and unpaired surrogates written out."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _process(
    topic: str, payload: bytes, received_at: datetime, directory: Mapping[DeviceKey, DeviceInfo]
) -> list[Heartbeat]:
    about = _parse_topic(topic)
    if about is None:
        raise _Refused(
            Reason.BAD_TOPIC,
            f"expected {TOPIC_ROOT}/{TOPIC_VERSION}/{{account}}/{{device}}/heartbeat or "
            f"{TOPIC_ROOT}/{TOPIC_VERSION}/{{account}}/{{gateway}}/gateway",
        )
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _Refused(
            Reason.PAYLOAD_TOO_LARGE, f"{len(payload)} bytes, at most {MAX_PAYLOAD_BYTES}"
        )
    account_ref, reporter_id, is_gateway = about
    message = _decode(payload, is_gateway)
    if message.seq < 0 or message.seq > _MAX_SEQ:
        raise _Refused(Reason.SCHEMA, "seq must be between 0 and 2^63-1 - at `$.seq`")
    time = _parse_ts(message.ts)
    if time > received_at + MAX_FUTURE:
        raise _Refused(
            Reason.TS_IN_FUTURE,
            f"ts {time.isoformat()} is more than {MAX_FUTURE} after receipt "
            f"({received_at.isoformat()})",
        )

    reporter = _known(directory, account_ref, reporter_id, time)
    beats = [
        Heartbeat(
            time,
            reporter_id,
            reporter.account_id,
            reporter.device_class,
            message.state,
            message.seq,
            reporter_id,
            received_at,
        )
    ]
    if not isinstance(message, _GatewayPayload):
        return beats
    if reporter.device_class != "gateway":
        raise _Refused(
            Reason.NOT_A_GATEWAY,
            f"device {reporter_id!r} is of class {reporter.device_class!r}, not a gateway",
        )
    if len(message.devices) > MAX_CHILDREN:
        raise _Refused(
            Reason.TOO_MANY_CHILDREN, f"{len(message.devices)} devices, at most {MAX_CHILDREN}"
        )
    seen: set[str] = set()
    for index, child in enumerate(message.devices):
        if child.id in seen:
            raise _Refused(
                Reason.SCHEMA, f"device {child.id!r} listed twice - at `$.devices[{index}]`"
            )
        seen.add(child.id)
        # A gateway names children of its own account only: the topic's account.
        info = _known(directory, account_ref, child.id, time)
        if info.gateway_id != reporter_id:
            raise _Refused(
                Reason.NOT_BOUND,
                f"device {child.id!r} is not bound to gateway {reporter_id!r}"
                f" - at `$.devices[{index}]`",
            )
        beats.append(
            Heartbeat(
                time,
                child.id,
                info.account_id,
                info.device_class,
                child.state,
                message.seq,
                reporter_id,
                received_at,
            )
        )
    return beats


def _decode(payload: bytes, is_gateway: bool) -> _DevicePayload | _GatewayPayload:
    try:
        return _decode_gateway(payload) if is_gateway else _decode_device(payload)
    except msgspec.ValidationError as exc:
        raise _Refused(Reason.SCHEMA, str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a string.
        raise _Refused(Reason.MALFORMED_JSON, str(exc)) from None


def _parse_ts(ts: str | int) -> datetime:
    try:
        if isinstance(ts, int):
            # Exact: a float division would round some milliseconds.
            time = _EPOCH + timedelta(milliseconds=ts)
        else:
            time = datetime.fromisoformat(ts)
    except (ValueError, OverflowError):
        raise _Refused(
            Reason.SCHEMA, "ts must be RFC 3339 or epoch milliseconds - at `$.ts`"
        ) from None
    if time.tzinfo is None or time.utcoffset() is None:
        raise _Refused(Reason.SCHEMA, "ts must carry a UTC offset (e.g. Z) - at `$.ts`")
    if time < _EARLIEST:
        raise _Refused(Reason.SCHEMA, "ts is before 2000-01-01 - at `$.ts`")
    try:
        return time.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00 is past year 9999 in UTC
        raise _Refused(Reason.SCHEMA, "ts is out of range - at `$.ts`") from None


def _known(
    directory: Mapping[DeviceKey, DeviceInfo], account_ref: str, device_id: str, time: datetime
) -> DeviceInfo:
    info = directory.get((account_ref, device_id))
    if info is None:
        raise _Refused(Reason.UNKNOWN_DEVICE, f"no device {device_id!r}")
    # A heartbeat dated before registration would make the device billable before it existed.
    if time < info.registered_at:
        raise _Refused(
            Reason.BEFORE_REGISTRATION,
            f"ts {time.isoformat()} is before device {device_id!r} was registered "
            f"({info.registered_at.isoformat()})",
        )
    return info
