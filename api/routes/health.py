"""Liveness, readiness and metrics: for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

import socket

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import State
from api.metrics import REGISTRY
from api.schemas import Health
from ingest.mqtt import parse_mqtt_url

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "The database or the broker is unreachable"}},
    summary="The database and the MQTT broker are reachable",
)
def readyz(app: State) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with app.pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # any failure means "not ready"; say which
        checks["database"] = f"unreachable: {type(exc).__name__}"
    if app.mqtt_url:
        address = parse_mqtt_url(app.mqtt_url)
        try:
            with socket.create_connection((address.host, address.port), timeout=2):
                checks["broker"] = "ok"
        except OSError as exc:
            checks["broker"] = f"unreachable: {exc.strerror or type(exc).__name__}"
    else:
        checks["broker"] = "not configured"
    ok = all(v in ("ok", "not configured") for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}
    },
    summary="Prometheus metrics of the API, and heartbeats refused by ingest (by reason)",
)
def metrics(app: State) -> Response:
    # Two registries, two exposition blocks: the text format allows families in any order.
    body = generate_latest(REGISTRY) + generate_latest(app.database_metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
