"""Members, their roles and API keys (SPEC A1, A4): who may do what in which account.

An API key belongs to one member of one account and carries that member's role. Keys are
256-bit random strings stored as SHA-256 (metering/secrets.py), so authenticating is one
indexed lookup by digest; the plaintext exists only in the response that created it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import psycopg
from psycopg.rows import class_row

from devmeter.errors import ConflictError, ForbiddenError, InvalidError, NotFoundError
from metering.secrets import API_KEY_PREFIX, digest, new_secret

Conn = psycopg.Connection[Any]
Role = Literal["owner", "manager", "developer"]
ROLES: Final = ("owner", "manager", "developer")

#: What each role may do (A1). Developers manage devices; managers and the owner see usage and
#: statements (developers do not: usage is what the account is billed); every role sees its
#: account's refused heartbeats; only the owner manages members and sets the payment method,
#: which managers may see, as they see what it pays.
PERMISSIONS: Final[dict[str, frozenset[Role]]] = {
    "devices:read": frozenset({"owner", "manager", "developer"}),
    "devices:write": frozenset({"owner", "developer"}),
    "usage:read": frozenset({"owner", "manager"}),
    # Developers above all: they are who debug a device's payloads.
    "rejections:read": frozenset({"owner", "manager", "developer"}),
    "statements:read": frozenset({"owner", "manager"}),
    "members:read": frozenset({"owner", "manager"}),
    "members:write": frozenset({"owner"}),
    "payment_method:read": frozenset({"owner", "manager"}),
    "payment_method:write": frozenset({"owner"}),
    "plan:write": frozenset({"owner"}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller behind an API key."""

    account_id: int
    account_ref: str
    account_name: str
    account_status: str
    timezone: str
    plan: str
    member_id: int
    member_name: str
    role: Role
    key_id: int

    def may(self, permission: str) -> bool:
        return self.role in PERMISSIONS[permission]

    def require(self, permission: str) -> None:
        if not self.may(permission):
            raise ForbiddenError(
                f"a {self.role} may not do this ({permission}); "
                f"allowed: {', '.join(sorted(PERMISSIONS[permission]))}",
                field="role",
            )


@dataclass(frozen=True, slots=True)
class Member:
    id: int
    name: str
    email: str | None
    role: Role
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    member_id: int
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewMember:
    member: Member
    key_id: int
    key: str

    def __repr__(self) -> str:
        return f"NewMember(member={self.member!r}, key_id={self.key_id})"


_AUTH_SQL: Final = """
SELECT a.id AS account_id, a.ref AS account_ref, a.name AS account_name,
       a.status AS account_status, a.timezone, a.plan,
       m.id AS member_id, m.name AS member_name, m.role, k.id AS key_id
FROM api_keys k
JOIN members m ON m.id = k.member_id
JOIN accounts a ON a.id = k.account_id
WHERE k.key_hash = %s AND k.revoked_at IS NULL
"""


def authenticate(conn: Conn, key: str) -> Principal | None:
    """The principal of a live key, or None: the caller answers 401 without saying why."""
    if not key.startswith(API_KEY_PREFIX) or len(key) > 200:
        return None
    with conn.cursor(row_factory=class_row(Principal)) as cur:
        return cur.execute(_AUTH_SQL, (digest(key),)).fetchone()


def create_member(
    conn: Conn, account_id: int, *, name: str, role: str, email: str | None = None
) -> NewMember:
    if role not in ROLES:
        raise InvalidError(f"invalid role {role!r}: one of {', '.join(ROLES)}", field="role")
    if role == "owner":
        raise ConflictError("an account has exactly one owner, its first member", field="role")
    if not name.strip() or len(name) > 200:
        raise InvalidError("member name must be 1 to 200 characters", field="name")
    if email is not None and ("@" not in email or len(email) > 254):
        raise InvalidError(f"invalid e-mail address {email!r}", field="email")
    with conn.cursor(row_factory=class_row(Member)) as cur:
        member = cur.execute(
            "INSERT INTO members (account_id, name, email, role) VALUES (%s, %s, %s, %s)"
            " RETURNING id, name, email, role, created_at",
            (account_id, name, email, role),
        ).fetchone()
    assert member is not None
    key_id, key = _issue_key(conn, account_id, member.id)
    return NewMember(member, key_id, key)


def issue_key(conn: Conn, account_id: int, member_id: int) -> tuple[int, str]:
    """A further key for an existing member (e.g. to rotate): (key id, plaintext shown once)."""
    _member(conn, account_id, member_id)
    return _issue_key(conn, account_id, member_id)


def _issue_key(conn: Conn, account_id: int, member_id: int) -> tuple[int, str]:
    key = new_secret(API_KEY_PREFIX)
    row = conn.execute(
        "INSERT INTO api_keys (member_id, account_id, prefix, key_hash) VALUES (%s, %s, %s, %s)"
        " RETURNING id",
        (member_id, account_id, key.prefix, key.digest),
    ).fetchone()
    assert row is not None
    return int(row["id"]), key.plaintext


def list_members(conn: Conn, account_id: int) -> list[tuple[Member, list[ApiKey]]]:
    with conn.cursor(row_factory=class_row(Member)) as cur:
        members = cur.execute(
            "SELECT id, name, email, role, created_at FROM members WHERE account_id = %s"
            " ORDER BY id",
            (account_id,),
        ).fetchall()
    with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        keys = cur.execute(
            "SELECT id, member_id, prefix, created_at, revoked_at FROM api_keys"
            " WHERE account_id = %s ORDER BY id",
            (account_id,),
        ).fetchall()
    return [(m, [k for k in keys if k.member_id == m.id]) for m in members]


def revoke_key(conn: Conn, account_id: int, member_id: int, key_id: int, at: datetime) -> ApiKey:
    """Revoke a key; idempotent (revoking a revoked key keeps its first revocation time).

    The owner's last live key is refused: without it nobody could manage the account's
    members again short of the operator.
    """
    member = _member(conn, account_id, member_id)
    if member.role == "owner":
        # Locked, so that two revocations of the owner's last two keys cannot both pass.
        live = [
            row["id"]
            for row in conn.execute(
                "SELECT id FROM api_keys WHERE member_id = %s AND revoked_at IS NULL"
                " ORDER BY id FOR UPDATE",
                (member_id,),
            )
        ]
        if live == [key_id]:
            raise ConflictError(
                "this is the owner's last live key: issue another before revoking it",
                field="key_id",
            )
    with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        key = cur.execute(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, %s)"
            " WHERE id = %s AND member_id = %s AND account_id = %s"
            " RETURNING id, member_id, prefix, created_at, revoked_at",
            (at, key_id, member_id, account_id),
        ).fetchone()
    if key is None:
        raise NotFoundError(f"unknown key {key_id} of member {member_id}", field="key_id")
    return key


def _member(conn: Conn, account_id: int, member_id: int) -> Member:
    with conn.cursor(row_factory=class_row(Member)) as cur:
        member = cur.execute(
            "SELECT id, name, email, role, created_at FROM members"
            " WHERE id = %s AND account_id = %s",
            (member_id, account_id),
        ).fetchone()
    if member is None:
        raise NotFoundError(f"unknown member {member_id}", field="member_id")
    return member
