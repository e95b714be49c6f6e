"""Devices of the caller's account (SPEC D1-D3): register, list, read, activate, deactivate.

There is no DELETE (D2). Another account's device is answered 404, exactly like a device that
does not exist, so ids of other tenants cannot even be probed (A4).
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query
from fastapi.responses import JSONResponse

from api.deps import DB, AppState, State, allowed
from api.problems import responses
from api.schemas import (
    NO_NUL,
    DeviceCreated,
    DeviceIn,
    DeviceOut,
    DevicePage,
    HeartbeatHourOut,
    MqttConnectionOut,
    StateEventOut,
)
from devmeter.errors import InvalidError
from ingest.protocol import connection
from metering import idempotency
from metering.access import Principal
from metering.registry import (
    DEVICE_ID,
    GATEWAY_CLASS,
    Device,
    RegisteredDevice,
    device_events,
    get_device,
    heartbeat_hours,
    register_device,
    rotate_device_key,
    search_devices,
    set_device_state,
)

router = APIRouter(prefix="/v1/devices", tags=["devices"])

Reader = Annotated[Principal, Depends(allowed("devices:read"))]
Writer = Annotated[Principal, Depends(allowed("devices:write"))]
DeviceId = Annotated[str, Path(pattern=NO_NUL)]


def device_out(device: Device) -> DeviceOut:
    return DeviceOut.model_validate(
        {
            "id": device.id,
            "class": device.device_class,
            "name": device.name,
            "gateway_id": device.gateway_id,
            "state": device.state,
            "state_at": device.state_at,
            "state_since": device.state_since,
            "registered_at": device.registered_at,
            "last_seen_at": device.last_seen_at,
            "key_prefix": device.key_prefix,
        }
    )


def encode_cursor(device_id: str) -> str:
    return base64.urlsafe_b64encode(device_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        after = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        after = ""
    if not DEVICE_ID.match(after):
        raise InvalidError("invalid cursor: pass next_cursor back unchanged", field="cursor")
    return after


@router.post(
    "",
    status_code=201,
    response_model=DeviceCreated,
    responses=responses(400, 401, 403, 404, 409, 415, 422),
    summary="Register a device (Active from now); its key is in this response only",
    description="Honours `Idempotency-Key` (Stripe's semantics, see the header).",
)
def create_device(
    body: DeviceIn,
    caller: Writer,
    conn: DB,
    app: State,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=idempotency.HEADER,
            pattern=idempotency.KEY_PATTERN,
            description="Send the same key again to retry safely: the same request gets the "
            "first response (without the device key, shown once) and registers nothing more, "
            "with `Idempotent-Replayed: true`; another request with the key is 409. Keys "
            "are per account and kept 24 hours.",
        ),
    ] = None,
) -> JSONResponse:
    payload = body.model_dump(mode="json", by_alias=True)
    with conn.transaction():
        if idempotency_key is not None:
            replay = idempotency.claim(
                conn,
                caller.account_id,
                idempotency_key,
                idempotency.request_hash("POST /v1/devices", payload),
                now=datetime.now(UTC),
            )
            if replay is not None:
                return JSONResponse(
                    replay.body,
                    status_code=replay.status,
                    headers={
                        "Location": f"/v1/devices/{replay.body['id']}",
                        "Cache-Control": "no-store",
                        idempotency.REPLAYED_HEADER: "true",
                    },
                )
        created = register_device(
            conn,
            app.catalog,
            account_ref=caller.account_ref,
            device_class=body.device_class,
            at=datetime.now(UTC),
            device_id=body.id,
            gateway_id=body.gateway_id,
            name=body.name,
            source="api",
        )
        out = _with_key(created, app)
        if idempotency_key is not None:
            # Everything but the key: a device key is stored only as a hash (D1). The replay
            # still says how to connect; the key itself must then be rotated.
            stored = out.model_dump(mode="json", by_alias=True)
            stored = stored | {"key": None, "mqtt": stored["mqtt"] | {"password": None}}
            idempotency.record(conn, caller.account_id, idempotency_key, 201, stored)
    return JSONResponse(
        out.model_dump(mode="json", by_alias=True),
        status_code=201,
        headers={"Location": f"/v1/devices/{created.device.id}", "Cache-Control": "no-store"},
    )


def _with_key(registered: RegisteredDevice, app: AppState) -> DeviceCreated:
    device = registered.device
    mqtt = connection(
        app.config.device_mqtt_url(),
        device.account_ref,
        device.id,
        registered.key,
        is_gateway=device.device_class == GATEWAY_CLASS,
    )
    return DeviceCreated(
        **device_out(device).model_dump(by_alias=True),
        key=registered.key,
        mqtt=MqttConnectionOut.model_validate(mqtt),
    )


@router.post(
    "/{device_id}/rotate-key",
    response_model=DeviceCreated,
    responses=responses(401, 403, 404, 422),
    summary="Issue a new device key; the old one is refused from now on",
)
def rotate_key(device_id: DeviceId, caller: Writer, conn: DB, app: State) -> JSONResponse:
    with conn.transaction():
        rotated = rotate_device_key(
            conn, device_id=device_id, account_id=caller.account_id, at=datetime.now(UTC)
        )
    return JSONResponse(
        _with_key(rotated, app).model_dump(mode="json", by_alias=True),
        headers={"Cache-Control": "no-store"},
    )


@router.get(
    "",
    response_model=DevicePage,
    responses=responses(401, 403, 422),
    summary="List devices, filtered, in id order, one page at a time",
)
def list_devices(
    caller: Reader,
    conn: DB,
    state: Annotated[Literal["active", "inactive"] | None, Query()] = None,
    device_class: Annotated[str | None, Query(alias="class", max_length=64, pattern=NO_NUL)] = None,
    gateway_id: Annotated[
        str | None,
        Query(max_length=64, pattern=NO_NUL, description="devices bound to this gateway"),
    ] = None,
    gateway: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=NO_NUL,
            deprecated=True,
            description="the older name of gateway_id",
        ),
    ] = None,
    q: Annotated[
        str | None, Query(max_length=100, pattern=NO_NUL, description="text in the id or name")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DevicePage:
    after = decode_cursor(cursor) if cursor else None
    if gateway is not None and gateway_id is not None and gateway != gateway_id:
        raise InvalidError("gateway is the older name of gateway_id: send one", field="gateway_id")
    rows = search_devices(
        conn,
        caller.account_id,
        state=state,
        device_class=device_class,
        gateway_id=gateway_id or gateway,
        text=q,
        after=after,
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return DevicePage(
        items=[device_out(d) for d in rows],
        next_cursor=encode_cursor(rows[-1].id) if more and rows else None,
    )


@router.get(
    "/{device_id}",
    response_model=DeviceOut,
    responses=responses(401, 403, 404, 422),
    summary="One device",
)
def read_device(device_id: DeviceId, caller: Reader, conn: DB) -> DeviceOut:
    return device_out(get_device(conn, device_id, caller.account_id))


def _set_state(
    conn: DB, caller: Principal, device_id: str, state: Literal["active", "inactive"]
) -> DeviceOut:
    with conn.transaction():
        device = set_device_state(
            conn,
            device_id=device_id,
            state=state,
            at=datetime.now(UTC),
            source="api",
            account_id=caller.account_id,
        )
    return device_out(device)


@router.post(
    "/{device_id}/activate",
    response_model=DeviceOut,
    responses=responses(401, 403, 404, 422),
    summary="Set the device Active (idempotent: a repeat records no second event)",
)
def activate(device_id: DeviceId, caller: Writer, conn: DB) -> DeviceOut:
    return _set_state(conn, caller, device_id, "active")


@router.post(
    "/{device_id}/deactivate",
    response_model=DeviceOut,
    responses=responses(401, 403, 404, 422),
    summary="Set the device Inactive (idempotent: a repeat records no second event); "
    "it stops counting from now",
)
def deactivate(device_id: DeviceId, caller: Writer, conn: DB) -> DeviceOut:
    return _set_state(conn, caller, device_id, "inactive")


@router.get(
    "/{device_id}/events",
    response_model=list[StateEventOut],
    responses=responses(401, 403, 404, 422),
    summary="The device's state timeline, oldest first",
)
def events(device_id: DeviceId, caller: Reader, conn: DB) -> list[StateEventOut]:
    with conn.transaction():
        timeline = device_events(conn, device_id, caller.account_id)
    return [
        StateEventOut(
            time=e.time, state=e.state, source=e.source, seq=e.seq, received_at=e.received_at
        )
        for e in timeline
    ]


@router.get(
    "/{device_id}/heartbeats",
    response_model=list[HeartbeatHourOut],
    responses=responses(401, 403, 404, 422),
    summary="The device's heartbeats per hour over the last hours, oldest first",
)
def heartbeats(
    device_id: DeviceId,
    caller: Reader,
    conn: DB,
    hours: Annotated[
        int, Query(ge=1, le=24 * 31, description="how many hours back from now (default 24)")
    ] = 24,
) -> list[HeartbeatHourOut]:
    now = datetime.now(UTC)
    since = now - timedelta(hours=hours - 1)
    return [
        HeartbeatHourOut(hour=h.hour, heartbeats=h.heartbeats, active=h.active, last_at=h.last_at)
        for h in heartbeat_hours(conn, device_id, caller.account_id, since, now)
    ]
