"""Database access: connections and named SQL queries.

Queries live in a ``queries.sql`` beside the code that runs them, each under a
``-- name: <query_name>`` header, so the SQL can be read (and reviewed) as SQL.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

_NAME_HEADER = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)

#: Application name in pg_stat_activity, so an operator can tell devmeter's sessions apart.
APPLICATION_NAME = "devmeter"


def load_queries(package: str, filename: str = "queries.sql") -> dict[str, LiteralString]:
    """Split a package's SQL file into named queries.

    The text comes from a file we ship, never from input, which is why it may be typed as
    ``LiteralString`` (what psycopg asks of a query).
    """
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    headers = list(_NAME_HEADER.finditer(text))
    if not headers:
        raise ValueError(f"{package}/{filename}: no '-- name: ...' headers")
    queries: dict[str, LiteralString] = {}
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        end = following.start() if following else len(text)
        name = header.group("name")
        if name in queries:
            raise ValueError(f"{package}/{filename}: query {name!r} defined twice")
        body = text[header.end() : end].strip()
        queries[name] = body
    return queries


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection[dict[str, object]]:
    """One connection, rows as dicts, session in UTC so timestamps never depend on the host."""
    return psycopg.connect(
        url,
        autocommit=autocommit,
        row_factory=dict_row,
        application_name=APPLICATION_NAME,
        options="-c timezone=UTC",
    )


def url_user(url: str) -> str | None:
    """The role a libpq URL logs in as, when it names one."""
    user = conninfo_to_dict(url).get("user")
    return str(user) if user else None


def service_url(url: str, role: str, password: str | None) -> str:
    """``url``'s server and database, logged in as the service role ``role``.

    The service logs in as that role rather than ``SET ROLE`` from the owner's session, which
    any statement it runs could undo with ``RESET ROLE``. A URL that already names ``role`` is
    kept (with ``password`` added when it carries none); any other user and its password are
    replaced, so an owner or superuser URL given to ``devmeter up`` never reaches the service.
    """
    params = conninfo_to_dict(url)
    if params.get("user") != role:
        params.pop("password", None)
        params["user"] = role
    if password and not params.get("password"):
        params["password"] = password
    return make_conninfo("", **params)
