"""The developer console against a real PostgreSQL: sign-in, CSRF, devices, usage, statements.

Drives the pages as a browser without script would (forms, redirects, cookies) and the
in-place path the console's script uses (fetch with X-CSRF-Token, a row fragment back).
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from markupsafe import escape

from api.app import create_app
from devmeter.config import Settings
from devmeter.db import connect
from tests.integration.test_api import ADMIN, add_member, bearer, make_account
from tests.integration.test_close import worked_example

XSS = "<script>alert(1)</script>"
XSS_ATTR = '"><img src=x onerror=alert(2)>'
FRAGMENT = {"X-Console-Fragment": "row"}


@pytest.fixture
def client(database_url: str, mqtt_url: str) -> Iterator[TestClient]:
    config = Settings(admin_token="op-token-for-tests", env="test")  # type: ignore[arg-type]
    app = create_app(config, database_url=database_url, mqtt_url=mqtt_url)
    with TestClient(app, follow_redirects=False) as c:
        yield c


def browser(client: TestClient, base_url: str = "http://testserver") -> TestClient:
    """A second browser (its own cookie jar) on the same running app."""
    return TestClient(client.app, base_url=base_url, follow_redirects=False)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF field on the page"
    return match.group(1)


def sign_in(c: TestClient, key: str, next_url: str | None = None) -> str:
    """Sign in through the form; returns the session's CSRF token."""
    form = c.get("/console/sign-in")
    assert form.status_code == 200, form.text
    data = {"key": key, "csrf_token": csrf_of(form.text)}
    if next_url is not None:
        data["next"] = next_url
    r = c.post("/console/sign-in", data=data)
    assert r.status_code == 303, r.text
    page = c.get("/console/devices")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)


def set_cookies(r: Response) -> list[str]:
    return r.headers.get_list("set-cookie")


def session_cookie(r: Response) -> str:
    found = [c for c in set_cookies(r) if c.startswith("devmeter_console=")]
    assert len(found) == 1, set_cookies(r)
    return found[0]


def device_rows(url: str) -> list[tuple[str, str, str | None]]:
    with connect(url) as conn:
        rows = conn.execute("SELECT id, state, name FROM devices ORDER BY id").fetchall()
    return [(r["id"], r["state"], r["name"]) for r in rows]


def event_count(url: str) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT count(*) AS n FROM device_state_events").fetchone()
    assert row is not None
    return int(row["n"])


def api_device(c: TestClient, key: str, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/devices", json=body, headers=bearer(key))
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


def assert_page(r: Response, status: int = 200) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    Markup().check(r.text)
    return r.text


class Markup(HTMLParser):
    """What a browser would parse: no inline script, style or handlers (the policy would block
    them, so none may be needed), and no tags a device or member name could have smuggled in."""

    def __init__(self) -> None:
        super().__init__()
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        assert tag not in ("img", "style", "iframe", "object"), tag
        assert "style" not in names, (tag, attrs)
        assert not [n for n in names if n.startswith("on")], (tag, attrs)
        if tag == "script":
            assert "src" in names, attrs
            self.in_script = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        assert not (self.in_script and data.strip()), data

    def check(self, text: str) -> None:
        self.feed(text)
        self.close()


# --- sign-in and the session cookie ------------------------------------------------------


def test_sign_in_with_good_bad_and_revoked_keys(client: TestClient) -> None:
    owner = make_account(client, "acme")
    member_id, key_id, developer = add_member(client, owner, "developer")

    form = client.get("/console/sign-in")
    page = assert_page(form)
    assert 'for="api-key"' in page
    assert 'type="password"' in page
    token = csrf_of(page)

    bad = client.post("/console/sign-in", data={"key": "dma_wrong-key", "csrf_token": token})
    text = assert_page(bad, 401)
    assert "unknown or has been revoked" in text
    assert "dma_wrong-key" not in text, "a key is never echoed back"
    assert not [c for c in set_cookies(bad) if c.startswith("devmeter_console=")]

    # The sign-in form has its own token, bound to a cookie the page set: a cross-site post
    # (no cookie, no token) cannot sign a victim into the attacker's account.
    stranger = browser(client)
    forged = stranger.post("/console/sign-in", data={"key": developer, "csrf_token": token})
    assert_page(forged, 403)
    assert not [c for c in set_cookies(forged) if c.startswith("devmeter_console=")]
    no_token = client.post("/console/sign-in", data={"key": developer})
    assert_page(no_token, 403)

    good = client.post("/console/sign-in", data={"key": developer, "csrf_token": token})
    assert good.status_code == 303
    assert good.headers["location"] == "/console/devices"
    cookie = session_cookie(good)
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags
    assert "samesite=strict" in flags
    assert "path=/console" in flags
    assert "secure" not in flags, "plain http in tests: Secure only over https"
    home = client.get("/console/devices")
    assert "developer" in assert_page(home)
    assert developer not in home.text, "the key stays in the cookie, never in a page"

    # Revoking the key signs the browser out on its next request and drops the cookie.
    revoked = client.delete(f"/v1/members/{member_id}/keys/{key_id}", headers=bearer(owner))
    assert revoked.status_code == 200
    r = client.get("/console/devices")
    assert r.status_code == 303
    assert r.headers["location"] == "/console/sign-in?next=%2Fconsole%2Fdevices"
    assert 'devmeter_console=""' in session_cookie(r) or "max-age=0" in session_cookie(r).lower()
    again = client.get("/console/sign-in")
    refused = client.post(
        "/console/sign-in", data={"key": developer, "csrf_token": csrf_of(again.text)}
    )
    assert_page(refused, 401)


def test_cookie_is_secure_over_https(client: TestClient) -> None:
    owner = make_account(client, "acme")
    secure = browser(client, "https://testserver")
    form = secure.get("/console/sign-in")
    r = secure.post("/console/sign-in", data={"key": owner, "csrf_token": csrf_of(form.text)})
    assert r.status_code == 303
    flags = [part.strip().lower() for part in session_cookie(r).split(";")]
    assert "secure" in flags
    assert "httponly" in flags
    assert "samesite=strict" in flags


def test_the_cookie_is_a_server_side_session_that_sign_out_revokes(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme")
    form = client.get("/console/sign-in")
    r = client.post("/console/sign-in", data={"key": owner, "csrf_token": csrf_of(form.text)})
    value = session_cookie(r).split(";")[0].split("=", 1)[1]
    assert value != owner, "the cookie is not the API key"
    assert owner not in session_cookie(r)
    assert value.startswith("dmc_")
    with connect(database_url) as conn:
        row = conn.execute("SELECT token_hash FROM console_sessions").fetchone()
    assert row is not None
    assert bytes(row["token_hash"]) == hashlib.sha256(value.encode()).digest(), "hash only"

    # Someone who copied the cookie (a second browser) is signed in, until the owner signs out.
    thief = browser(client)
    thief.cookies.set("devmeter_console", value, path="/console")
    assert thief.get("/console/devices").status_code == 200
    csrf = csrf_of(client.get("/console/devices").text)
    assert client.post("/console/sign-out", data={"csrf_token": csrf}).status_code == 303
    r = thief.get("/console/devices")
    assert r.status_code == 303, "a signed-out session is dead server-side, not just forgotten"
    assert r.headers["location"].startswith("/console/sign-in")
    # The API key itself as a cookie (the old scheme) signs nobody in.
    thief.cookies.set("devmeter_console", owner, path="/console")
    assert thief.get("/console/devices").status_code == 303
    # The key still works for the API and for a new sign-in.
    assert client.get("/v1/devices", headers=bearer(owner)).status_code == 200
    sign_in(client, owner)


def test_sessions_end_when_idle_or_old_and_with_their_key(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme")
    member_id, key_id, developer = add_member(client, owner, "developer")
    other = browser(client)
    sign_in(client, owner)
    sign_in(other, developer)

    with connect(database_url) as conn:
        conn.execute(
            "UPDATE console_sessions SET last_used_at = now() - interval '31 minutes'"
            " WHERE api_key_id <> %s",
            (key_id,),
        )
    assert client.get("/console/devices").status_code == 303, "idle for 31 min (limit 30)"
    sign_in(client, owner)
    with connect(database_url) as conn:
        conn.execute(
            "UPDATE console_sessions SET expires_at = now() - interval '1 second'"
            " WHERE api_key_id <> %s AND revoked_at IS NULL",
            (key_id,),
        )
    assert client.get("/console/devices").status_code == 303, "past its absolute lifetime"

    # Revoking the developer's key ends the session opened with it, on its next request.
    assert other.get("/console/devices").status_code == 200
    r = client.delete(f"/v1/members/{member_id}/keys/{key_id}", headers=bearer(owner))
    assert r.status_code == 200
    assert other.get("/console/devices").status_code == 303


def _behind(client: TestClient, peer: str, **settings: Any) -> TestClient:
    # Production requires the service role's password; the test database trusts it anyway.
    settings = {
        "admin_token": "op-token-for-tests",
        "env": "test",
        "service_password": "service-password-for-tests",
        **settings,
    }
    config = Settings(**settings)
    app = create_app(config, database_url=client.app.state.devmeter.database_url)  # type: ignore[attr-defined]
    return TestClient(app, follow_redirects=False, client=(peer, 40000))


def test_secure_cookie_and_hsts_behind_a_trusted_tls_proxy(client: TestClient) -> None:
    owner = make_account(client, "acme")
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    cases = (
        ("10.1.2.3", "10.0.0.0/8, 192.0.2.1", True),  # the proxy is in a trusted network
        ("192.0.2.1", "10.0.0.0/8, 192.0.2.1", True),  # a trusted address
        ("198.51.100.7", "10.0.0.0/8", False),  # anybody else only claims to be HTTPS
        ("10.1.2.3", "", False),  # nobody is trusted by default
    )
    for peer, trusted, secure in cases:
        with _behind(client, peer, trusted_proxies=trusted, env="production") as c:
            form = c.get("/console/sign-in", headers=https)
            # The test client speaks plain HTTP to the "proxy side", so it would not send back
            # a Secure cookie by itself: as the browser (on HTTPS) would, send it explicitly.
            nonce = form.cookies.get("devmeter_console_sign_in") or ""
            c.cookies.clear()
            r = c.post(
                "/console/sign-in",
                data={"key": owner, "csrf_token": csrf_of(form.text)},
                headers=https | {"Cookie": f"devmeter_console_sign_in={nonce}"},
            )
            assert r.status_code == 303, (peer, trusted, r.text)
            flags = [part.strip().lower() for part in session_cookie(r).split(";")]
            assert ("secure" in flags) is secure, (peer, trusted, flags)
            hsts = r.headers.get("strict-transport-security")
            assert (hsts == "max-age=63072000; includeSubDomains") is secure, (peer, hsts)
            api = c.get("/healthz", headers=https)
            assert ("strict-transport-security" in api.headers) is secure
    # HSTS only in production; Secure whenever the request is HTTPS.
    with _behind(client, "10.1.2.3", trusted_proxies="10.1.2.3") as c:
        form = c.get("/console/sign-in", headers=https)
        assert "strict-transport-security" not in form.headers
    with pytest.raises(ValueError, match="not an IP address"):
        Settings(trusted_proxies="proxy.internal")


def test_sign_in_returns_to_the_page_asked_for_but_never_off_site(client: TestClient) -> None:
    owner = make_account(client, "acme")
    r = client.get("/console/usage", params={"month": "2026-10"})
    assert r.status_code == 303
    assert r.headers["location"] == "/console/sign-in?next=%2Fconsole%2Fusage%3Fmonth%3D2026-10"
    form = client.get(r.headers["location"])
    assert 'name="next" value="/console/usage?month=2026-10"' in form.text
    signed = client.post(
        "/console/sign-in",
        data={
            "key": owner,
            "csrf_token": csrf_of(form.text),
            "next": "/console/usage?month=2026-10",
        },
    )
    assert signed.headers["location"] == "/console/usage?month=2026-10"
    for evil in (
        "https://evil.example/",
        "//evil.example/console",
        "/console/../v1/devices",
        "/console/%2e%2e/v1",
        "/console\\evil",
        "/v1",
    ):
        other = browser(client)
        page = other.get("/console/sign-in", params={"next": evil})
        r = other.post(
            "/console/sign-in", data={"key": owner, "csrf_token": csrf_of(page.text), "next": evil}
        )
        assert r.headers["location"] == "/console/devices", evil


def test_sign_out_needs_the_token_and_clears_the_cookie(client: TestClient) -> None:
    owner = make_account(client, "acme")
    csrf = sign_in(client, owner)

    assert_page(client.post("/console/sign-out"), 403)
    assert_page(client.post("/console/sign-out", data={"csrf_token": "0" * 64}), 403)
    assert client.get("/console/devices").status_code == 200, "still signed in"

    out = client.post("/console/sign-out", data={"csrf_token": csrf})
    assert out.status_code == 303
    assert out.headers["location"] == "/console/sign-in?signed_out=1"
    cleared = [part.strip().lower() for part in session_cookie(out).split(";")]
    assert "max-age=0" in cleared
    assert "path=/console" in cleared
    assert "devmeter_console" not in client.cookies
    assert client.get("/console/devices").status_code == 303
    assert "You have signed out." in client.get("/console/sign-in?signed_out=1").text


def test_unauthenticated_pages_redirect_to_sign_in(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme")
    api_device(client, owner, **{"class": "lte-m", "id": "d1"})
    for path in (
        "/console",
        "/console/devices",
        "/console/devices/d1",
        "/console/new-device",
        "/console/usage",
        "/console/rejections",
        "/console/statements",
        "/console/statements/2026-10",
    ):
        r = client.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/console/sign-in"), path
    before = device_rows(database_url)
    for path, data in (
        ("/console/devices", {"class": "lte-m", "device_id": "d2"}),
        ("/console/devices/d1/deactivate", {"confirm": "yes"}),
        ("/console/sign-out", {}),
    ):
        r = client.post(path, data=data)
        assert r.status_code == 303, path
        assert r.headers["location"] == "/console/sign-in", path
    # The script's in-place path gets a 401 it can act on, not a sign-in page as a row.
    r = client.post("/console/devices/d1/deactivate", data={"confirm": "yes"}, headers=FRAGMENT)
    assert r.status_code == 401
    assert device_rows(database_url) == before
    # A forged cookie is no session either.
    client.cookies.set("devmeter_console", "dma_forged", path="/console")
    assert client.get("/console/devices").status_code == 303


# --- CSRF ----------------------------------------------------------------------------------


def test_every_post_without_the_right_token_is_refused(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme")
    _, _, developer = add_member(client, owner, "developer")
    api_device(client, owner, **{"class": "lte-m", "id": "on"})
    api_device(client, owner, **{"class": "lte-m", "id": "off"})
    client.post("/v1/devices/off/deactivate", headers=bearer(owner))
    owner_csrf = sign_in(browser(client), owner)
    csrf = sign_in(client, developer)
    assert csrf != owner_csrf, "tokens are per key"

    before = (device_rows(database_url), event_count(database_url))
    posts: list[tuple[str, dict[str, str]]] = [
        ("/console/devices", {"class": "lte-m", "device_id": "new1", "name": "x"}),
        ("/console/devices/on/deactivate", {"confirm": "yes"}),
        ("/console/devices/off/activate", {}),
        ("/console/sign-out", {}),
    ]
    for path, data in posts:
        for token in (None, "", "nope", csrf[:-1] + ("0" if csrf[-1] != "0" else "1"), owner_csrf):
            body = dict(data) if token is None else {**data, "csrf_token": token}
            r = client.post(path, data=body)
            assert_page(r, 403)
            assert "nothing was changed" in r.text
            # The same through the script's path, with the header instead of the field.
            headers = FRAGMENT | ({"X-CSRF-Token": token} if token else {})
            r = client.post(path, data=data, headers=headers)
            assert r.status_code == 403, (path, token)
    assert (device_rows(database_url), event_count(database_url)) == before
    assert client.get("/console/devices").status_code == 200, "still signed in"


# --- devices -------------------------------------------------------------------------------


def test_register_shows_the_key_once(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme")
    csrf = sign_in(client, owner)

    form = assert_page(client.get("/console/new-device"))
    for label in ('for="device-class"', 'for="device-id"', 'for="device-name"', 'for="gateway-id"'):
        assert label in form
    assert '<option value="lte-m"' in form

    r = client.post(
        "/console/devices",
        data={"csrf_token": csrf, "class": "lte-m", "device_id": "d1", "name": "pump 1"},
    )
    page = assert_page(r, 201)
    assert r.headers["cache-control"] == "no-store"
    match = re.search(r'id="device-key" data-testid="device-key" [^>]*value="(dmk_[^"]+)"', page)
    assert match, page
    key = match.group(1)
    assert "shown only once" in page
    assert 'id="copy-key"' in page
    with connect(database_url) as conn:
        stored = conn.execute("SELECT key_hash FROM devices WHERE id = 'd1'").fetchone()
    assert stored is not None
    assert bytes(stored["key_hash"]) == hashlib.sha256(key.encode()).digest()
    with connect(database_url) as conn:
        events = conn.execute(
            "SELECT state, source FROM device_state_events WHERE device_id = 'd1'"
        ).fetchall()
    assert [(e["state"], e["source"]) for e in events] == [("active", "console")]

    listing = assert_page(client.get("/console/devices"))
    assert 'data-device-id="d1"' in listing
    assert key not in listing
    detail = assert_page(client.get("/console/devices/d1"))
    assert key not in detail
    assert key[:10] in detail, "the prefix tells keys apart"
    assert '<dd id="device-heartbeats">0</dd>' in detail

    # Generated id when none is given.
    generated = client.post("/console/devices", data={"csrf_token": csrf, "class": "wifi"})
    assert re.search(
        r'id="created-device-id" href="/console/devices/dev-[0-9a-f]{16}"', generated.text
    )

    # Refusals keep what was typed and say what is wrong, without a key anywhere.
    dup = client.post(
        "/console/devices",
        data={"csrf_token": csrf, "class": "lte-m", "device_id": "d1", "name": "again"},
    )
    text = assert_page(dup, 409)
    assert "already exists" in text
    assert 'value="again"' in text
    assert "dmk_" not in text
    bad_id = client.post(
        "/console/devices", data={"csrf_token": csrf, "class": "lte-m", "device_id": "a/b"}
    )
    assert 'id="device-id" name="device_id" value="a/b"' in assert_page(bad_id, 422)
    assert 'aria-invalid="true"' in bad_id.text
    assert_page(client.post("/console/devices", data={"csrf_token": csrf, "class": "zigbee"}), 422)
    assert_page(client.post("/console/devices", data={"csrf_token": csrf}), 422)
    assert [d[0] for d in device_rows(database_url)][:1] == ["d1"]
    assert len(device_rows(database_url)) == 2


def test_managers_see_devices_but_cannot_change_them(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme")
    _, _, manager = add_member(client, owner, "manager")
    api_device(client, owner, **{"class": "lte-m", "id": "d1"})
    csrf = sign_in(client, manager)
    listing = assert_page(client.get("/console/devices"))
    assert 'data-device-id="d1"' in listing
    assert "Register device" not in listing
    assert 'data-testid="deactivate"' not in listing
    assert "not available for your role" in client.get("/console/new-device").text.lower()
    before = (device_rows(database_url), event_count(database_url))
    assert_page(client.post("/console/devices", data={"csrf_token": csrf, "class": "lte-m"}), 403)
    assert_page(
        client.post("/console/devices/d1/deactivate", data={"csrf_token": csrf, "confirm": "yes"}),
        403,
    )
    r = client.post(
        "/console/devices/d1/deactivate",
        data={"confirm": "yes"},
        headers=FRAGMENT | {"X-CSRF-Token": csrf},
    )
    assert r.status_code == 403
    assert (device_rows(database_url), event_count(database_url)) == before


def test_deactivate_asks_first_then_toggles_by_form(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme")
    api_device(client, owner, **{"class": "lte-m", "id": "d1", "name": "pump"})
    csrf = sign_in(client, owner)

    listing = assert_page(client.get("/console/devices"))
    assert 'id="confirm-dialog"' in listing
    assert 'data-confirm="deactivate"' in listing

    # Without script: the first post only asks, on a page of its own.
    ask = client.post(
        "/console/devices/d1/deactivate",
        data={"csrf_token": csrf, "return_to": "/console/devices?state=active"},
    )
    page = assert_page(ask)
    assert "Confirm deactivate" in page
    assert 'name="confirm" value="yes"' in page
    assert 'name="return_to" value="/console/devices?state=active"' in page
    assert device_rows(database_url) == [("d1", "active", "pump")]

    done = client.post(
        "/console/devices/d1/deactivate",
        data={"csrf_token": csrf, "confirm": "yes", "return_to": "/console/devices?state=active"},
    )
    assert done.status_code == 303
    assert done.headers["location"] == "/console/devices?state=active"
    assert device_rows(database_url) == [("d1", "inactive", "pump")]

    on = client.post(
        "/console/devices/d1/activate",
        data={"csrf_token": csrf, "return_to": "https://evil.example/"},
    )
    assert on.status_code == 303
    assert on.headers["location"] == "/console/devices/d1", "never redirects off the console"
    assert device_rows(database_url) == [("d1", "active", "pump")]

    timeline = assert_page(client.get("/console/devices/d1"))
    states = re.findall(r'data-testid="timeline-event" data-state="(\w+)"', timeline)
    assert states == ["active", "inactive", "active"], "newest first"
    assert timeline.count("console") >= 2
    assert_page(client.get("/console/devices/nope"), 404)


def test_the_register_form_starts_on_the_class_the_account_uses_most(client: TestClient) -> None:
    owner = make_account(client, "acme")
    sign_in(client, owner)

    def selected() -> list[str]:
        page = assert_page(client.get("/console/new-device"))
        return re.findall(r'<option value="([^"]+)" selected>', page)

    # No devices yet: the plan's first class that is not a gateway (not `gateway`, first by name).
    assert selected() == ["lte-m"]
    api_device(client, owner, **{"class": "gateway", "id": "g1"})
    for n in range(2):
        api_device(client, owner, **{"class": "wifi", "id": f"w{n}"})
    api_device(client, owner, **{"class": "lte-m", "id": "l1"})
    assert selected() == ["wifi"]


def test_state_since_shows_the_last_change_not_the_last_heartbeat(
    client: TestClient, database_url: str
) -> None:
    owner = make_account(client, "acme")
    api_device(client, owner, **{"class": "lte-m", "id": "d1"})
    off = client.post("/v1/devices/d1/deactivate", headers=bearer(owner)).json()
    # An Inactive heartbeat an hour later repeats the state: it moves state_at and last seen
    # (what ingest does), not when the state began.
    with connect(database_url) as conn:
        conn.execute(
            "UPDATE devices SET state_at = state_at + interval '1 hour',"
            " last_seen_at = state_at + interval '1 hour' WHERE id = 'd1'"
        )
    device = client.get("/v1/devices/d1", headers=bearer(owner)).json()
    assert device["state_since"] == off["state_since"] == off["state_at"]
    assert device["state_at"] != device["state_since"]
    sign_in(client, owner)
    page = assert_page(client.get("/console/devices/d1"))
    since = re.search(r'<dd id="device-state-since">([^<]+)</dd>', page)
    assert since is not None
    seen = re.search(r"<dt>Last seen</dt><dd>([^<]+)</dd>", page)
    assert seen is not None
    assert since.group(1) != seen.group(1), "State since no longer repeats Last seen"
    row = assert_page(client.get("/console/devices"))
    assert f'datetime="{datetime.fromisoformat(off["state_since"]).isoformat()}"' in row


def test_toggle_in_place_returns_the_new_row(client: TestClient, database_url: str) -> None:
    owner = make_account(client, "acme")
    other = make_account(client, "beta")
    api_device(client, owner, **{"class": "lte-m", "id": "d1"})
    api_device(client, other, **{"class": "lte-m", "id": "b1"})
    csrf = sign_in(client, owner)
    headers = FRAGMENT | {"X-CSRF-Token": csrf}

    r = client.post(
        "/console/devices/d1/deactivate",
        data={"confirm": "yes", "return_to": "/console/devices"},
        headers=headers,
    )
    row = assert_page(r)
    assert row.lstrip().startswith('<tr id="device-d1"')
    assert 'data-state="inactive"' in row
    assert 'data-testid="activate"' in row
    assert f'value="{csrf}"' in row
    assert "<html" not in row
    assert ("d1", "inactive", None) in device_rows(database_url)

    r = client.post("/console/devices/d1/activate", headers=headers)
    assert 'data-state="active"' in assert_page(r)
    assert 'data-testid="deactivate"' in r.text

    # Unknown here, and another account's device, are the same 404; nothing changes.
    before = device_rows(database_url)
    for device in ("nope", "b1"):
        r = client.post(
            f"/console/devices/{device}/deactivate", data={"confirm": "yes"}, headers=headers
        )
        assert r.status_code == 404
        assert r.headers["content-type"].startswith("text/plain")
        assert_page(
            client.post(
                f"/console/devices/{device}/deactivate", data={"csrf_token": csrf, "confirm": "yes"}
            ),
            404,
        )
        assert_page(client.get(f"/console/devices/{device}"), 404)
    assert device_rows(database_url) == before


def test_device_list_search_filters_and_pages(client: TestClient) -> None:
    owner = make_account(client, "acme")
    other = make_account(client, "beta")
    api_device(client, other, **{"class": "lte-m", "id": "zz-other"})
    api_device(client, owner, **{"class": "gateway", "id": "gw"})
    for i in range(30):
        body = {"class": "lte-m", "id": f"m{i:02d}", "name": f"meter {i}"}
        api_device(client, owner, **body)
    api_device(client, owner, **{"class": "wifi", "id": "w1", "gateway_id": "gw"})
    client.post("/v1/devices/m03/deactivate", headers=bearer(owner))
    sign_in(client, owner)

    def ids(path: str, **params: str) -> list[str]:
        # httpx drops a URL's own query when given params, even empty ones.
        text = assert_page(client.get(path, params=params) if params else client.get(path))
        return re.findall(r'data-testid="device-row" data-device-id="([^"]+)"', text)

    first = client.get("/console/devices").text
    assert ids("/console/devices") == ["gw"] + [f"m{i:02d}" for i in range(24)]
    next_url = html.unescape(re.search(r'id="next-page" href="([^"]+)"', first).group(1))  # type: ignore[union-attr]
    assert ids(next_url) == [f"m{i:02d}" for i in range(24, 30)] + ["w1"]
    assert 'id="next-page"' not in client.get(next_url).text
    assert 'id="first-page"' in client.get(next_url).text
    assert "zz-other" not in first + client.get(next_url).text

    assert ids("/console/devices", state="inactive") == ["m03"]
    assert ids("/console/devices", **{"class": "wifi"}) == ["w1"]
    assert ids("/console/devices", gateway="gw") == ["w1"]
    assert ids("/console/devices", q="meter 2") == [
        "m02",
        "m20",
        "m21",
        "m22",
        "m23",
        "m24",
        "m25",
        "m26",
        "m27",
        "m28",
        "m29",
    ]
    assert ids("/console/devices", q="%") == []
    # Filters carry over to the next page.
    paged = client.get("/console/devices", params={"state": "active", "limit": "5"}).text
    link = html.unescape(re.search(r'id="next-page" href="([^"]+)"', paged).group(1))  # type: ignore[union-attr]
    assert "state=active" in link
    assert "limit=5" in link
    assert ids(link) == ["m05", "m06", "m07", "m08", "m09"]
    # Nonsense parameters are ignored, not a JSON 422.
    assert ids("/console/devices", state="on", after="../x", limit="-3")[:2] == ["gw", "m00"]
    badges = re.findall(r'data-testid="state-badge" data-state="(\w+)"', first)
    assert badges.count("inactive") == 1


def test_names_are_escaped_in_every_page(client: TestClient) -> None:
    owner = make_account(client, "acme")
    _, _, developer = add_member(client, owner, "developer")
    # Member names are shown in the header; they are user input too.
    # A manager: the usage pages below are not for developers (A1).
    r = client.post("/v1/members", json={"name": XSS, "role": "manager"}, headers=bearer(owner))
    assert r.status_code == 201
    evil_member = r.json()["key"]
    api_device(client, owner, **{"class": "lte-m", "id": "d2", "name": XSS_ATTR})
    csrf = sign_in(client, developer)
    escaped = str(escape(XSS))

    created = client.post(
        "/console/devices",
        data={"csrf_token": csrf, "class": "lte-m", "device_id": "d1", "name": XSS},
    )
    pages = {
        "created": assert_page(created, 201),
        "list": assert_page(client.get("/console/devices")),
        "search": assert_page(client.get("/console/devices", params={"q": XSS})),
        "device": assert_page(client.get("/console/devices/d1")),
        "device2": assert_page(client.get("/console/devices/d2")),
        "confirm": assert_page(
            client.post("/console/devices/d1/deactivate", data={"csrf_token": csrf})
        ),
        "row": assert_page(
            client.post(
                "/console/devices/d2/deactivate",
                data={"confirm": "yes"},
                headers=FRAGMENT | {"X-CSRF-Token": csrf},
            )
        ),
        "refused": assert_page(
            client.post(
                "/console/devices",
                data={"csrf_token": csrf, "class": "lte-m", "device_id": "d1", "name": XSS},
            ),
            409,
        ),
        "not found": assert_page(client.get("/console/devices/" + "x%3Cscript%3E"), 404),
        "usage, refused to a developer": assert_page(
            client.get("/console/usage", params={"month": XSS}), 403
        ),
        "unknown page": assert_page(client.get("/console/%3Cscript%3Ealert(1)%3C/script%3E"), 404),
    }
    for name, text in pages.items():
        assert "<script>alert" not in text, name
        assert "<img src=x" not in text, name
    assert escaped in pages["created"]
    assert escaped in pages["list"]
    assert escaped in pages["device"]
    assert escaped in pages["confirm"]
    assert str(escape(XSS_ATTR)) in pages["device2"]
    assert str(escape(XSS_ATTR)) in pages["row"]
    assert f'value="{escaped}"' in pages["search"]

    header = browser(client)
    sign_in(header, evil_member)
    for text in (
        assert_page(header.get("/console/usage")),
        assert_page(header.get("/console/usage", params={"month": XSS}), 422),
        assert_page(header.get("/console/account")),
    ):
        assert escaped in text
        assert "<script>alert" not in text


# --- usage and statements ------------------------------------------------------------------


def test_usage_of_the_worked_example(client: TestClient, database_url: str) -> None:
    from tests.integration.test_api import _owner_key

    worked_example(database_url)
    owner = _owner_key(database_url, "acme")
    sign_in(client, owner)

    r = client.get("/console/usage", params={"month": "2026-10"})
    page = assert_page(r)
    assert re.search(r'data-testid="usage-row" data-class="lte-m"', page)
    assert '<td class="num" data-testid="peak">12</td>' in page
    assert 'data-amount="3500"' in page
    assert "¥3,500" in page
    assert "lte-m 1\u201310 \u00d7 300 = ¥3,000" in page
    assert 'data-testid="preliminary-badge"' in page
    assert "Preliminary — may differ from the final bill" in page
    assert 'data-testid="final-badge"' not in page
    assert 'id="live-note" data-refresh-seconds="30"' in page, "the open month refreshes itself"

    # The chart: one bar per day of October, the peak line at 12 marked on Oct 5.
    chart = re.search(r'<svg[^>]*data-testid="usage-chart" data-class="lte-m".*?</svg>', page, re.S)
    assert chart, page
    svg = chart.group(0)
    assert 'data-peak="12"' in svg
    bars = re.findall(r'<rect class="bar( bar-peak)?" data-day="([\d-]+)" data-value="(\d+)"', svg)
    assert len(bars) == 31
    assert bars[0][1:] == ("2026-10-01", "8")
    assert bars[4][1:] == ("2026-10-05", "12")
    assert {day for peak, day, _ in bars if peak} == {
        "2026-10-05",
        "2026-10-06",
        "2026-10-07",
        "2026-10-08",
        "2026-10-09",
        "2026-10-10",
        "2026-10-20",
        "2026-10-21",
        "2026-10-22",
        "2026-10-23",
        "2026-10-24",
        "2026-10-25",
        "2026-10-31",
    }
    assert 'data-testid="chart-peak" data-peak="12" data-day="2026-10-05"' in svg
    assert "Peak 12 on Oct 5" in svg

    # The what-if: 13 Active now (d6-d18), so December would start in tier 2.
    whatif = re.search(r'data-testid="what-if-row" data-class="lte-m".*?</tr>', page, re.S)
    assert whatif, page
    row = whatif.group(0)
    assert '<td class="num" data-testid="active-now">13</td>' in row
    assert 'data-tier="2"' in row
    assert '<strong data-value="3">3</strong> to start in tier 1 (¥3,000/month)' in row
    assert '<strong data-value="88">88</strong> more reach tier 3' in row
    assert "¥3,750" in row

    # Closed: final, no preliminary badge, same numbers.
    closed = client.post("/v1/admin/close", json={"month": "2026-10"}, headers=ADMIN)
    assert closed.status_code == 200, closed.text
    final = assert_page(client.get("/console/usage", params={"month": "2026-10"}))
    assert 'data-testid="final-badge"' in final
    assert "Preliminary" not in final
    assert "data-refresh-seconds" not in final, "a final month never changes"
    assert 'data-amount="3500"' in final
    assert '<td class="num" data-testid="peak">12</td>' in final

    # The open month is the default, and says it is preliminary.
    current = assert_page(client.get("/console/usage"))
    assert 'id="month" name="month" value="' in current
    assert 'data-testid="preliminary-badge"' in current
    assert 'id="next-month"' not in current

    # Months that cannot be shown are explained on the page, not a JSON error.
    for month in ("2099-01", "2026-13", "oct"):
        r = client.get("/console/usage", params={"month": month})
        assert 'id="usage-error"' in assert_page(r, 422), month


def test_statements_are_for_managers_and_the_owner(client: TestClient, database_url: str) -> None:
    from tests.integration.test_api import _owner_key

    worked_example(database_url)
    owner = _owner_key(database_url, "acme")
    _, _, manager = add_member(client, owner, "manager")
    _, _, developer = add_member(client, owner, "developer")
    assert (
        client.post("/v1/admin/close", json={"month": "2026-10"}, headers=ADMIN).status_code == 200
    )

    sign_in(client, developer)
    assert 'id="nav-statements"' not in client.get("/console/devices").text
    for path in ("/console/statements", "/console/statements/2026-10"):
        text = assert_page(client.get(path), 403)
        assert "managers and the owner" in text
        assert "3,500" not in text

    for key in (manager, owner):
        c = browser(client)
        sign_in(c, key)
        assert 'id="nav-statements"' in c.get("/console/devices").text
        listing = assert_page(c.get("/console/statements"))
        assert 'data-testid="statement-row" data-month="2026-10"' in listing
        assert "¥3,500" in listing
        detail = assert_page(c.get("/console/statements/2026-10"))
        assert 'data-testid="final-badge"' in detail
        assert 'id="subtotal" data-amount="3500"' in detail
        assert "lte-m 1\u201310 \u00d7 300" in detail
        preliminary = assert_page(c.get("/console/statements/2026-11"))
        assert 'data-testid="preliminary-badge"' in preliminary
        assert_page(c.get("/console/statements/2099-01"), 422)


# --- what the customer owes: tax, credit points, adjustments, plans (issue 10) ---------------

NBSP = "\u00a0"
#: Credit points applied are shown as a deduction.
MINUS = "\u2212"


def billed_with_credits_and_adjustment(database_url: str) -> dict[str, int]:
    """The worked example with October and November closed, credit points and a late device.

    Points: 1,000 (expiring 2027-03-31) pay October (due 2,850); 200 expired in September
    without paying anything; 3,000 (expiring 2026-11-30) pay November; 700 that never expire,
    granted after November closed, are the balance. late-1, stored after October closed but
    registered on 6 October, raises October's peak 12 → 13: +¥250 on November's statement.
    November: peak 14 (d6-d18 and late-1) = ¥4,000, + ¥250 = ¥4,250, tax ¥425, total ¥4,675,
    points -¥3,000, due ¥1,675. Returns the owner's member id.
    """
    from datetime import UTC, date

    from metering import credits
    from metering.registry import get_account, register_device
    from metering.statements import close_month
    from tests.integration.test_close import CATALOG, jst

    worked_example(database_url)
    november_closed = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)  # 12:00 on 1 December in Tokyo
    after = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)

    def grant(points: int, expires: date | None, at: datetime, reason: str) -> None:
        with connect(database_url) as conn, conn.transaction():
            credits.grant(
                conn,
                get_account(conn, "acme"),
                points=points,
                reason=reason,
                expires_on=expires,
                at=at,
                now=after,
            )

    def opener() -> Any:
        return connect(database_url)

    grant(1000, date(2027, 3, 31), jst(2026, 10, 1), "welcome")
    grant(200, date(2026, 9, 15), jst(2026, 9, 1, 12), "trial")
    close_month(opener, CATALOG, "2026-10", now=datetime(2026, 11, 20, tzinfo=UTC))
    with connect(database_url) as conn, conn.transaction():
        register_device(
            conn, CATALOG, account_ref="acme", device_class="lte-m", device_id="late-1",
            at=jst(2026, 10, 6),
        )  # fmt: skip
    grant(3000, date(2026, 11, 30), jst(2026, 11, 20), "goodwill")
    close_month(opener, CATALOG, "2026-11", now=november_closed)
    grant(700, None, after, f"apology {XSS}")
    with connect(database_url) as conn:
        row = conn.execute(
            "SELECT m.id FROM members m JOIN accounts a ON a.id = m.account_id"
            " WHERE a.ref = 'acme' AND m.role = 'owner'"
        ).fetchone()
    assert row is not None
    return int(row["id"])


def element(page: str, pattern: str, tag: str = "tr") -> str:
    """The first ``<tag …>…</tag>`` whose opening tag matches ``pattern``."""
    match = re.search(f"<{tag}[^>]*{pattern}[^>]*>.*?</{tag}>", page, re.S)
    assert match, pattern
    return match.group(0)


def test_statements_show_tax_credits_adjustments_and_the_amount_due(
    client: TestClient, database_url: str
) -> None:
    from tests.integration.test_api import _owner_key

    billed_with_credits_and_adjustment(database_url)
    sign_in(client, _owner_key(database_url, "acme"))

    listing = assert_page(client.get("/console/statements"))
    october = element(listing, 'data-month="2026-10"')
    assert f'¥350 <span class="hint">at 10{NBSP}%</span>' in october
    assert f'<span class="nowrap">{MINUS}¥1,000</span>' in october
    assert 'data-amount="2850"' in october
    assert 'data-testid="adjustments" data-lines="0">—' in october
    november = element(listing, 'data-month="2026-11"')
    assert '<span class="hint">(1 line)</span>' in november
    assert "¥250" in november
    assert f'¥425 <span class="hint">at 10{NBSP}%</span>' in november
    assert f'<span class="nowrap">{MINUS}¥3,000</span>' in november
    assert 'data-amount="1675"' in november

    page = assert_page(client.get("/console/statements/2026-11"))
    line = element(page, 'data-testid="adjustment-line"')
    assert 'data-corrects="2026-10" data-class="lte-m"' in line
    assert 'data-billed="12" data-corrected="13" data-amount="250"' in line
    assert "Adjustment for October 2026, lte-m: peak billed 12 → corrected 13" in line
    assert '<td class="num">12 → 13</td>' in line
    assert "¥250" in line
    assert f"taxed at 10{NBSP}%" in line
    assert "lte-m 1\u201310 \u00d7 300" in page, "the month's own lines are still there"
    for cell, amount in (
        ("subtotal", "4250"),
        ("tax", "425"),
        ("total", "4675"),
        ("credits-applied", "3000"),
        ("amount-due", "1675"),
    ):
        assert f'id="{cell}" data-amount="{amount}"' in page, cell
    assert f'id="tax-rate" data-rate="0.10">10{NBSP}%' in page
    assert f"{MINUS}¥3,000" in page, "points are a deduction"
    assert "Amount due by 2026-12-31" in page
    # October had no adjustment: no adjustments section at all.
    assert 'id="adjustments"' not in assert_page(client.get("/console/statements/2026-10"))
    # The open month says its points are only taken at close.
    december = assert_page(client.get("/console/statements/2026-12"))
    assert "taken from the balance when the month closes" in december
    assert 'id="credits-applied" data-amount="0"' in december


def test_usage_shows_the_plan_totals_and_corrected_quantities(
    client: TestClient, database_url: str
) -> None:
    from tests.integration.test_api import _owner_key

    billed_with_credits_and_adjustment(database_url)
    csrf = sign_in(client, _owner_key(database_url, "acme"))

    october = assert_page(client.get("/console/usage", params={"month": "2026-10"}))
    assert 'id="usage-plan">Priced at plan <strong data-plan="standard">' in october
    row = element(october, 'data-testid="usage-row" data-class="lte-m"')
    assert '<td class="num" data-testid="peak">12</td>' in row, "what was billed"
    assert '<td class="num" data-testid="corrected-peak">13</td>' in row, "what is true now"
    assert ">Billed peak<" in october
    assert 'id="corrected-note"' in october
    assert 'data-amount="3500"' in row
    for cell, amount in (
        ("subtotal", "3500"),
        ("tax", "350"),
        ("total", "3850"),
        ("credits-applied", "1000"),
        ("amount-due", "2850"),
    ):
        assert f'id="{cell}" data-amount="{amount}"' in october, cell

    november = assert_page(client.get("/console/usage", params={"month": "2026-11"}))
    assert 'data-testid="corrected-peak"' not in november, "nothing late for November"
    assert 'id="corrected-note"' not in november
    line = element(november, 'data-testid="adjustment-line"')
    assert "Adjustment for October 2026, lte-m: peak billed 12 → corrected 13" in line
    assert 'id="subtotal" data-amount="4250"' in november
    assert 'id="total" data-amount="4675"' in november
    assert 'id="amount-due" data-amount="1675"' in november

    # P6: after a plan change, the open month is still priced at the plan it began with.
    r = client.post("/console/account/plan", data={"csrf_token": csrf, "plan": "standard-volume"})
    assert r.status_code == 303, r.text
    current = assert_page(client.get("/console/usage"))
    assert '<strong data-plan="standard">standard</strong>' in current
    assert "the account is on standard-volume now" in current


def test_the_owner_sees_credits_and_plan_history_and_changes_the_plan(
    client: TestClient, database_url: str
) -> None:
    from tests.integration.test_api import _owner_key

    owner_id = billed_with_credits_and_adjustment(database_url)
    csrf = sign_in(client, _owner_key(database_url, "acme"))

    page = assert_page(client.get("/console/account"))
    assert 'id="credit-balance" data-points="700"' in page
    assert "<strong>700 points</strong> (¥700)" in page
    ledger = element(page, 'id="credit-ledger"', "table")
    kinds = re.findall(
        r'data-testid="ledger-entry" data-kind="(\w+)"(?: data-month="([\d-]+)")?', ledger
    )
    assert sorted(kinds) == sorted(
        [
            ("grant", ""),
            ("grant", ""),
            ("grant", ""),
            ("grant", ""),
            ("expiry", ""),
            ("use", "2026-10"),
            ("use", "2026-11"),
        ]
    )
    assert kinds[0] == ("grant", ""), "newest first: the grant made after November closed"
    welcome = element(ledger, 'data-kind="grant"[^>]*', "tr")
    assert "never expires" in welcome
    assert 'data-points="700">700 remaining' in welcome
    assert str(escape(f"apology {XSS}")) in welcome
    assert XSS not in page
    assert re.search(r"expires 2027-03-31 · <span[^>]*>0 remaining</span> · welcome", ledger)
    assert re.search(r"expires 2026-09-15 · <span[^>]*>0 remaining</span> · trial", ledger)
    assert 'paid <a href="/console/statements/2026-10">statement 2026-10</a>' in ledger
    assert 'paid <a href="/console/statements/2026-11">statement 2026-11</a>' in ledger
    expiry = element(ledger, 'data-kind="expiry"')
    assert '<td class="num">-200</td>' in expiry
    assert "expired after 2026-09-15" in expiry

    history = element(page, 'id="plan-history"', "table")
    assert 'data-plan="standard" data-bills-from="2026-09"' in history
    assert "sign-up" in history
    assert 'id="plan-form"' in page

    # Refusals name the problem and change nothing.
    before = snapshot_plans(database_url)
    refused = client.post("/console/account/plan", data={"csrf_token": csrf, "plan": "gold"})
    text = assert_page(refused, 422)
    assert 'id="plan-error"' in text
    assert "unknown plan &#39;gold&#39;" in text
    assert_page(client.post("/console/account/plan", data={"plan": "standard-volume"}), 403)
    same = client.post("/console/account/plan", data={"csrf_token": csrf, "plan": "standard"})
    assert same.headers["location"] == "/console/account?plan_unchanged=1"
    assert "already on plan standard: nothing changed" in assert_page(
        client.get(same.headers["location"])
    )
    assert snapshot_plans(database_url) == before

    changed = client.post(
        "/console/account/plan", data={"csrf_token": csrf, "plan": "standard-volume"}
    )
    assert changed.status_code == 303
    assert changed.headers["location"] == "/console/account?plan_changed=1"
    after = assert_page(client.get(changed.headers["location"]))
    first = current_month_after(datetime.now(UTC))
    assert "The plan is now standard-volume, in force at once for the service." in after
    assert f"Usage is billed at it from {first}; earlier months keep" in after
    newest = element(after, 'data-testid="plan-change"')
    assert f'data-plan="standard-volume" data-bills-from="{first}"' in newest
    assert "(console)" in newest
    assert snapshot_plans(database_url)[-1] == ("standard-volume", f"console:{owner_id}")
    assert 'id="account-plan">standard-volume' in after


def test_managers_read_billing_and_developers_see_none_of_it(
    client: TestClient, database_url: str
) -> None:
    from tests.integration.test_api import _owner_key

    billed_with_credits_and_adjustment(database_url)
    owner = _owner_key(database_url, "acme")
    _, _, manager = add_member(client, owner, "manager")
    _, _, developer = add_member(client, owner, "developer")
    before = snapshot_plans(database_url)

    mgr = browser(client)
    mgr_csrf = sign_in(mgr, manager)
    page = assert_page(mgr.get("/console/account"))
    assert 'id="credit-balance" data-points="700"' in page
    assert 'id="plan-history"' in page
    assert 'id="plan-form"' not in page
    assert 'id="plan-owner-only"' in page
    refused = mgr.post("/console/account/plan", data={"csrf_token": mgr_csrf, "plan": "starter"})
    assert "for the owner of" in assert_page(refused, 403)

    dev = browser(client)
    dev_csrf = sign_in(dev, developer)
    nav = dev.get("/console/devices").text
    for section in ("usage", "statements", "account"):
        assert f'id="nav-{section}"' not in nav
    for path in (
        "/console/account",
        "/console/usage?month=2026-10",
        "/console/statements",
        "/console/statements/2026-11",
    ):
        text = assert_page(dev.get(path), 403)
        assert "managers and the owner" in text, path
        for secret in ("700 points", "1,675", "standard"):
            assert secret not in text, (path, secret)
    refused = dev.post("/console/account/plan", data={"csrf_token": dev_csrf, "plan": "starter"})
    assert "for the owner of" in assert_page(refused, 403)
    assert snapshot_plans(database_url) == before


def snapshot_plans(database_url: str) -> list[tuple[str, str]]:
    with connect(database_url) as conn:
        rows = conn.execute("SELECT plan, changed_by FROM plan_changes ORDER BY id").fetchall()
    return [(r["plan"], r["changed_by"]) for r in rows]


def current_month_after(now: datetime) -> str:
    """The month after ``now``'s in Tokyo: a change now is billed from then (P6)."""
    from console.views import next_month
    from metering.statements import current_month

    return next_month(current_month("Asia/Tokyo", now))


def test_rejected_heartbeats_page(client: TestClient, database_url: str) -> None:
    from datetime import UTC, timedelta

    from ingest.processor import Reason
    from tests.integration.test_rejections import reject

    owner = make_account(client, "acme")
    other = make_account(client, "beta")
    for key in (owner, other):
        api_device(client, key, **{"class": "lte-m", "id": "pump-1"})
    api_device(client, owner, **{"class": "lte-m", "id": "pump-2"})
    _, _, developer = add_member(client, owner, "developer")
    sign_in(client, developer)

    empty = assert_page(client.get("/console/rejections"))
    assert 'id="nav-rejections" href="/console/rejections" aria-current="page"' in empty
    assert 'id="no-rejections"' in empty
    assert "it lands here with the reason" in empty
    assert "docs/protocol.md" in empty
    assert 'id="reason-before_registration"' in empty

    t0 = datetime(2026, 10, 5, 0, 0, tzinfo=UTC)  # 09:00 in Tokyo, the account's zone
    rows = [
        ("acme", "pump-1", Reason.SCHEMA, f'{{"state": "{XSS}"}}'.encode(), t0),
        ("acme", "pump-2", Reason.MALFORMED_JSON, b"\xff\xfe", t0 + timedelta(minutes=1)),
        ("beta", "pump-1", Reason.TS_IN_FUTURE, b"beta's own", t0 + timedelta(minutes=2)),
    ]
    rows += [
        ("acme", "pump-2", Reason.TS_IN_FUTURE, b"{}", t0 + timedelta(minutes=10 + n))
        for n in range(26)
    ]
    reject(database_url, *rows)

    page = assert_page(client.get("/console/rejections"))
    assert XSS not in page
    assert "beta's own" not in page
    assert page.count('data-reason="') == 25
    assert 'id="next-page"' in page
    assert "2026-10-05 09:35:00 JST" in page
    assert 'id="rejection-summary"' in page
    older = assert_page(client.get(html.unescape(_href(page, "next-page"))))
    assert str(escape(f'{{"state": "{XSS}"}}')) in older
    assert "not UTF-8: shown as base64" in older
    assert "2026-10-05 09:00:00 JST" in older
    assert 'id="first-page"' in older

    one = assert_page(client.get("/console/rejections?device=pump-1"))
    assert one.count('data-reason="') == 1
    assert 'data-reason="schema"' in one
    assert "beta's own" not in one
    mine = assert_page(client.get("/console/rejections?reason=malformed_json"))
    assert mine.count('data-reason="') == 1
    assert '<option value="malformed_json" selected>' in mine
    none = assert_page(client.get("/console/rejections?reason=not_bound"))
    assert "No rejected heartbeats match these filters." in none
    # Filters and cursors that are not ours do not break the page.
    assert (
        assert_page(client.get("/console/rejections?reason=%3Cb%3E&device=a%00b")).count(
            'data-reason="'
        )
        == 25
    )
    r = client.get("/console/rejections?after=nope&reason=schema")
    assert r.status_code == 303
    assert r.headers["location"] == "/console/rejections?reason=schema"
    # Every role sees the page; signed out, it asks to sign in.
    assert browser(client).get("/console/rejections").status_code == 303


def _href(page: str, element_id: str) -> str:
    match = re.search(f'id="{element_id}" href="([^"]+)"', page)
    assert match, element_id
    return match.group(1)


def test_static_files_and_unknown_pages(client: TestClient) -> None:
    js = client.get("/console/static/console.js")
    assert js.status_code == 200
    assert "javascript" in js.headers["content-type"]
    assert "default-src 'self'" in js.headers["content-security-policy"]
    assert js.headers["x-content-type-options"] == "nosniff"
    css = client.get("/console/static/console.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert client.get("/console/static/nope.js").status_code == 404
    assert "There is no console page" in assert_page(client.get("/console/nowhere"), 404)
    assert client.get("/console/").headers["location"] == "/console"
    # The API is untouched by the console: still JSON problems, still Bearer only.
    assert client.get("/v1/devices").headers["content-type"] == "application/problem+json"
    assert all(not p.startswith("/console") for p in client.get("/openapi.json").json()["paths"])


def test_a_configured_secret_lets_processes_share_tokens(database_url: str, mqtt_url: str) -> None:
    """Behind a load balancer each process must accept the others' CSRF tokens; with the
    default per-process secret they do not (a restart asks people to reload the form)."""
    from pydantic import SecretStr

    class Configured(Settings):
        console_secret: SecretStr | None = None

    worked_example(database_url)
    from tests.integration.test_api import _owner_key

    owner = _owner_key(database_url, "acme")
    shared = Configured(env="test", console_secret=SecretStr("a-long-test-secret-" * 2))
    apps = [create_app(shared, database_url=database_url, mqtt_url=mqtt_url) for _ in range(2)]
    isolated = create_app(Settings(env="test"), database_url=database_url, mqtt_url=mqtt_url)
    with (
        TestClient(apps[0], follow_redirects=False) as a,
        TestClient(apps[1], follow_redirects=False) as b,
        TestClient(isolated, follow_redirects=False) as c,
    ):
        csrf = sign_in(a, owner)
        for other, status in ((c, 403), (b, 303)):
            other.cookies = a.cookies
            assert other.post("/console/sign-out", data={"csrf_token": csrf}).status_code == status
        # The sign-in form's token too: a form served by one process, posted to the other.
        fresh_a, fresh_b = browser(a), browser(b)
        form = fresh_a.get("/console/sign-in")
        fresh_b.cookies = fresh_a.cookies
        token = csrf_of(form.text)
        r = fresh_b.post("/console/sign-in", data={"key": owner, "csrf_token": token})
        assert r.status_code == 303
        fresh_c = browser(c)
        fresh_c.cookies = fresh_a.cookies
        r = fresh_c.post("/console/sign-in", data={"key": owner, "csrf_token": token})
        assert r.status_code == 403
