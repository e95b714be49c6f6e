"""Members of the caller's account and their API keys (SPEC A1)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from api.deps import DB, allowed
from api.problems import responses
from api.schemas import KeyCreated, KeyOut, MemberCreated, MemberIn, MemberOut
from metering.access import Principal, create_member, issue_key, list_members, revoke_key

router = APIRouter(prefix="/v1/members", tags=["members"])

Owner = Annotated[Principal, Depends(allowed("members:write"))]
Viewer = Annotated[Principal, Depends(allowed("members:read"))]
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.post(
    "",
    status_code=201,
    response_model=MemberCreated,
    responses=responses(400, 401, 403, 409, 415, 422),
    summary="Add a manager or developer (owner only); their API key is in this response only",
)
def add_member(body: MemberIn, caller: Owner, conn: DB) -> JSONResponse:
    with conn.transaction():
        new = create_member(
            conn, caller.account_id, name=body.name, role=body.role, email=body.email
        )
    out = MemberCreated(
        id=new.member.id, name=new.member.name, role=new.member.role, key_id=new.key_id, key=new.key
    )
    return JSONResponse(
        out.model_dump(mode="json"), status_code=201, headers={"Cache-Control": "no-store"}
    )


@router.get(
    "",
    response_model=list[MemberOut],
    responses=responses(401, 403),
    summary="Members and their keys (prefixes only)",
)
def members(caller: Viewer, conn: DB) -> list[MemberOut]:
    return [
        MemberOut(
            id=m.id,
            name=m.name,
            email=m.email,
            role=m.role,
            created_at=m.created_at,
            keys=[
                KeyOut(id=k.id, prefix=k.prefix, created_at=k.created_at, revoked_at=k.revoked_at)
                for k in keys
            ],
        )
        for m, keys in list_members(conn, caller.account_id)
    ]


def _new_key(conn: DB, caller: Principal, member_id: int) -> JSONResponse:
    with conn.transaction():
        key_id, key = issue_key(conn, caller.account_id, member_id)
    out = KeyCreated(id=key_id, member_id=member_id, prefix=key[:10], key=key)
    return JSONResponse(
        out.model_dump(mode="json"),
        status_code=201,
        headers={
            "Cache-Control": "no-store",
            "Location": f"/v1/members/{member_id}/keys/{key_id}",
        },
    )


# Declared before /{member_id}/keys, which would take "me" for an id (and refuse it, 422).
@router.post(
    "/me/keys",
    status_code=201,
    response_model=KeyCreated,
    responses=responses(401, 403),
    summary="Issue a new API key for the owner calling (owner only); in this response only",
    description="Rotation: issue a new key, switch to it, then revoke the old one "
    "(DELETE /v1/members/{member_id}/keys/{key_id}), even if it was the owner's last.",
)
def issue_own_key(caller: Owner, conn: DB) -> JSONResponse:
    return _new_key(conn, caller, caller.member_id)


@router.post(
    "/{member_id}/keys",
    status_code=201,
    response_model=KeyCreated,
    responses=responses(401, 403, 404, 422),
    summary="Issue a new API key for a member (owner only); in this response only",
)
def issue_member_key(member_id: Id, caller: Owner, conn: DB) -> JSONResponse:
    return _new_key(conn, caller, member_id)


@router.delete(
    "/{member_id}/keys/{key_id}",
    response_model=KeyOut,
    responses=responses(401, 403, 404, 409, 422),
    summary="Revoke an API key (owner only; idempotent)",
)
def revoke(member_id: Id, key_id: Id, caller: Owner, conn: DB) -> KeyOut:
    with conn.transaction():
        key = revoke_key(conn, caller.account_id, member_id, key_id, datetime.now(UTC))
    return KeyOut(
        id=key.id, prefix=key.prefix, created_at=key.created_at, revoked_at=key.revoked_at
    )
