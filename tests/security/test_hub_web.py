"""The hub's web side under attack: a real hub (embedded Mosquitto, SQLite, uvicorn), a real Chromium, a real
second HTTP server playing the attacker's page on another port of the same host, and httpx for forged requests.

- same-site CSRF: the dashboard's SameSite=Strict cookie does not separate ports, so a page on 127.0.0.1:OTHER can
  post to the hub with it; the hub must refuse every state change that does not come from its own origin;
- framing and injected script: CSP, X-Frame-Options, Referrer-Policy and nosniff on every response, with the
  dashboard and Swagger UI still working under that CSP;
- `%` and `_` in a bundle-id prefix (a SQL LIKE) must not match any bundle;
- the database, its -wal/-shm and the hub secret are the owner's only, also in a data dir an older hub left open;
- token scopes: a read token changes nothing, an operate token makes no tokens.

Each attack is counted in the reliability table ("attack: hub web"): what got through, limit 0.
"""

import json
import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from browser import chromium
from fastapi.routing import APIRoute
from helpers import assert_user_error, compile_bundle
from hub_helpers import signing_keys, wait_until
from reliability import record

from edgekit.hub.auth import COOKIE, create_token
from edgekit.hub.broker import free_port
from edgekit.hub.db import ApiToken, Device, open_database
from edgekit.hub.guard import SESSION_PATHS
from edgekit.hub.scopes import scope_allows
from edgekit.hub.service import Hub, HubSettings

SCENARIO = "attack: hub web"
WAIT_MS = 15_000
SECURITY_HEADERS = {"x-frame-options": "DENY", "referrer-policy": "no-referrer", "x-content-type-options": "nosniff"}


@contextmanager
def running_hub(data_dir: Path, **settings) -> Iterator[Hub]:
    hub = Hub(HubSettings(data_dir=data_dir, http_port=free_port(), broker_port=free_port(), **settings))
    hub.start()
    try:
        assert hub.wait_connected(15) and hub.wait_http(15), "the hub did not start"
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def bundle(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("web-bundle")
    key, public = signing_keys(folder / "keys")
    return {"public": public, "v1": compile_bundle(digits, digits / "calibration.npz", key, "1.0.0", folder / "d.ekb")}


@pytest.fixture(scope="module")
def hub(bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One hub for the module, its registry holding one bundle and its fleet one device (a row: no agent needed to
    plan a rollout, which then waits on it)."""
    with running_hub(tmp_path_factory.mktemp("web") / "hub", trust_key=bundle["public"]) as hub:
        hub.registry.add(bundle["v1"], "test")
        with hub.sessions.begin() as session:
            session.add(Device(id="cam-1", labels={}, runtimes=[]))
        yield hub


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium() as launched:
        yield launched


def running_deployment(hub: Hub) -> int:
    """A rollout that stays running: its one new device (a database row, no agent) never reports back."""
    device_id = f"cam-{uuid.uuid4().hex[:8]}"
    with hub.sessions.begin() as session:
        session.add(Device(id=device_id, labels={}, runtimes=[]))
    bundle_id = hub.registry.all()[0].id
    return hub.rollouts.create(bundle_id, device_id, canary_percent=100, wave_timeout_s=3600, actor="test").id


def client(hub: Hub, token: str | None = None, **headers: str) -> httpx.Client:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=hub.http_url, headers=headers, timeout=30, trust_env=False)


@contextmanager
def attacker_site(pages: dict[str, str]) -> Iterator[str]:
    """A second HTTP server on 127.0.0.1 (another port of the hub's host) serving `pages` by path; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass  # the test's output is about the hub

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def auto_submit(action: str, head: str = "") -> str:
    """An attacker's page that posts an empty form to `action` as soon as it loads (no click needed)."""
    form = f"<form method='post' action='{action}'></form><script>document.forms[0].submit()</script>"
    return f"<!doctype html><head>{head}</head>{form}"


def log_in(page, hub: Hub, token: str) -> None:
    """Log in through the dashboard's own login form, as a person does; the session cookie is then set."""
    page.goto(hub.http_url + "/")
    page.fill("#token", token)
    with page.expect_response(lambda r: r.url == hub.http_url + "/login") as answer:
        page.click("button[type=submit]")
    assert answer.value.status == 303, "the dashboard's own login was refused"
    assert any(c["name"] == COOKIE for c in page.context.cookies()), "no session cookie after logging in"
    page.wait_for_function("() => document.body?.dataset.ready === 'fleet'", timeout=WAIT_MS)  # reloaded, signed in


def test_a_page_on_another_port_cannot_halt_a_rollout_with_the_dashboard_cookie(hub: Hub, browser) -> None:
    deployment = running_deployment(hub)
    halt = f"{hub.http_url}/api/deployments/{deployment}/halt"
    pages = {
        "/form": auto_submit(halt),
        # No referrer and an opaque `Origin: null`: what a cheap Origin check lets through.
        "/no-referrer": auto_submit(halt, "<meta name='referrer' content='no-referrer'>"),
        "/frame": f"<!doctype html><iframe id='hub' src='{hub.http_url}/rollouts' width=800 height=600></iframe>",
    }
    context = browser.new_context()
    page = context.new_page()
    try:
        log_in(page, hub, create_token(hub.sessions, "victim", "test", scope="operate"))
        with attacker_site(pages) as attacker:
            for path in ("/form", "/no-referrer"):
                with page.expect_response(lambda r: r.url == halt) as answer:
                    page.goto(attacker + path)
                applied = hub.rollouts.get(deployment).state != "running"
                record(SCENARIO, f"same-site CSRF ({path[1:]} page on another port): halt applied", int(applied), 0)
                assert not applied, f"the {path} page halted the rollout"
                # This 403 is only given to a request with a session cookie: the browser did send the cookie.
                assert answer.value.status == 403 and "cross-site request refused" in answer.value.text()

            # A framed dashboard could be clickjacked; the browser must refuse to render it (its error page instead).
            page.goto(attacker + "/frame")
            frame = wait_until(lambda: [f for f in page.frames[1:] if f.url != "about:blank"], 10, "the iframe")[0]
            framed = frame.url.startswith(hub.http_url) and frame.locator("header.top").count() > 0
            record(SCENARIO, "dashboard rendered in another origin's frame", int(framed), 0)
            assert not framed

        # The dashboard's own halt button still works under the same checks.
        page.goto(hub.http_url + "/rollouts")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click(f'.rollout[data-id="{deployment}"] button[data-halt]')
        page.wait_for_selector(f'.rollout[data-id="{deployment}"] .state.halted', timeout=WAIT_MS)
        assert hub.rollouts.get(deployment).state == "halted"
    finally:
        context.close()


def test_forged_origins_are_refused_and_bearer_calls_still_work(hub: Hub) -> None:
    token = create_token(hub.sessions, "forger-victim", "test")
    with client(hub, Origin=hub.http_url) as browser:
        assert browser.post("/login", data={"token": token}).status_code == 303
        session = browser.cookies[COOKIE]
    deployment = running_deployment(hub)
    foreign = "http://127.0.0.1:1"
    forged = {  # what a request carrying the victim's cookie says about where it came from
        "foreign Origin": {"Origin": foreign},
        "foreign Referer, no Origin": {"Referer": foreign + "/page"},
        "Origin null, cross-site fetch metadata": {"Origin": "null", "Sec-Fetch-Site": "same-site"},
        "no Origin, Referer or fetch metadata": {},
        "own Origin, but a same-site fetch": {"Origin": foreign, "Sec-Fetch-Site": "same-site"},
    }
    through = 0
    for what, headers in forged.items():
        with client(hub, **headers) as forger:
            forger.cookies.set(COOKIE, session)
            for method, path, body in (("POST", f"/api/deployments/{deployment}/halt", None),
                                       ("PUT", "/api/devices/cam-1/labels", {"labels": {"owned": "yes"}}),
                                       ("POST", "/logout", None)):  # fmt: skip
                response = forger.request(method, path, json=body)
                through += response.status_code != 403
                assert response.status_code == 403, (what, path, response.text)
                assert "cross-site request refused" in response.json()["detail"]
        with client(hub, **headers) as login_forger:  # login CSRF: logging the victim into the attacker's token
            through += login_forger.post("/login", data={"token": token}).status_code != 403
    record(SCENARIO, "forged cross-origin state changes accepted (httpx, 5 forged origins × 4 routes)", through, 0)
    assert hub.rollouts.get(deployment).state == "running"
    with hub.sessions() as db:
        assert db.get(Device, "cam-1").labels == {}

    # The hub's own origin passes; so does a bearer token without any Origin (the CLI, scripts).
    with client(hub, Origin=hub.http_url) as own:
        own.cookies.set(COOKIE, session)
        assert own.put("/api/devices/cam-1/labels", json={"labels": {"site": "lab"}}).status_code == 200
    with client(hub, token) as cli:
        assert cli.post(f"/api/deployments/{deployment}/halt").status_code == 200


def test_every_response_carries_the_security_headers_and_pages_work_under_the_csp(hub: Hub, browser) -> None:
    token = create_token(hub.sessions, "headers", "test", scope="read")
    paths = ["/healthz", "/", "/rollouts", "/docs", "/openapi.json", "/static/app.css", "/static/js/common.js",
             "/api/devices", "/api/nothing-here", "/metrics"]  # fmt: skip
    missing = 0
    with client(hub) as anonymous, client(hub, token) as reader:
        for http in (anonymous, reader):
            for path in paths:
                headers = http.get(path).headers
                csp = headers.get("content-security-policy", "")
                ok = all(headers.get(k) == v for k, v in SECURITY_HEADERS.items()) and "frame-ancestors 'none'" in csp
                missing += not ok
                assert ok, (path, dict(headers))
                assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, (path, csp)
    record(SCENARIO, "responses without CSP/frame/referrer/nosniff headers", missing, 0)

    # The pages' own inline scripts are allowed by hash, nothing else: the login, the dashboard and Swagger UI
    # run, and the browser reports no CSP violation.
    context = browser.new_context()
    page = context.new_page()
    violations: list[str] = []
    page.on(
        "console", lambda m: violations.append(page.url + " " + m.text) if "Content Security Policy" in m.text else None
    )
    try:
        log_in(page, hub, token)
        page.goto(hub.http_url + "/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=WAIT_MS)
        assert page.locator(".swagger-ui .opblock").count() > 10
        # An injected inline script (as an XSS would add) does not run.
        page.goto(hub.http_url + "/audit")
        page.wait_for_function("() => document.body?.dataset.ready === 'audit'", timeout=WAIT_MS)
        page.evaluate("""() => { const s = document.createElement('script');
                                 s.textContent = 'window.__injected = true'; document.body.append(s); }""")
        injected = page.evaluate("window.__injected === true")
        record(SCENARIO, "injected inline script ran on a dashboard page", int(injected), 0)
        assert not injected
        assert any("inline script" in v for v in violations), "the injected script was not refused by the CSP"
        assert [v for v in violations if "inline script" not in v] == [], "\n".join(v[:120] for v in violations)
    finally:
        context.close()


def test_like_wildcards_in_a_bundle_prefix_match_nothing(hub: Hub) -> None:
    token = create_token(hub.sessions, "wildcards", "test")
    real = hub.registry.all()[0].id
    resolved = 0
    with client(hub, token) as http:
        assert http.get(f"/api/bundles/{real[:8]}").json()["id"] == real
        for pattern in ("%%%%%%%%", "________", real[:4] + "%%%%", real[:7] + "_"):
            found = http.get(f"/api/bundles/{pattern}")
            planned = http.post("/api/deployments", json={"bundle_id": pattern, "target": "cam-1"})
            resolved += (found.status_code == 200) + (planned.status_code == 201)
            assert found.status_code == 404 and "no bundles match" in found.json()["detail"], pattern
            assert planned.status_code == 422, pattern
    record(SCENARIO, "LIKE wildcard prefixes that resolved to a bundle (4 patterns × get, deploy)", resolved, 0)


def open_to_others(data_dir: Path) -> list[str]:
    paths = [data_dir, *data_dir.rglob("*")]
    return [str(p.relative_to(data_dir)) for p in paths if not p.is_symlink() and p.stat().st_mode & 0o077]


def test_the_data_dir_is_the_owners_only_also_when_an_older_hub_left_it_open(tmp_path: Path, caplog) -> None:
    fresh = tmp_path / "fresh"
    with caplog.at_level("WARNING", logger="edgekit.hub"), running_hub(fresh) as hub:
        # A fresh hub, broker files included, makes nothing that had to be tightened afterwards.
        assert not [r.getMessage() for r in caplog.records if "readable by their owner only" in r.getMessage()]
        assert open_to_others(fresh) == []
        create_token(hub.sessions, "writer", "test")  # a write: the -wal and -shm files exist now
        sqlite = sorted(p.name for p in fresh.glob("hub.sqlite*"))
        assert sqlite == ["hub.sqlite", "hub.sqlite-shm", "hub.sqlite-wal"], sqlite
        modes = {name: stat.S_IMODE((fresh / name).stat().st_mode) for name in sqlite}
        assert modes == dict.fromkeys(sqlite, 0o600), modes
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700

    # An older hub's data dir: everything 0644/0755, and a token from before scopes existed.
    old = tmp_path / "old"
    old.mkdir()
    engine, sessions = open_database(f"sqlite:///{old / 'hub.sqlite'}")
    old_token = create_token(sessions, "old-admin", "test")
    engine.dispose()
    with sqlite3.connect(old / "hub.sqlite") as db:
        db.execute("ALTER TABLE tokens DROP COLUMN scope")
        db.execute("DROP TABLE alembic_version")  # older hubs had no schema migrations either, nor what 0002-5 added
        db.executescript("DROP TABLE leases; DROP TABLE hub_settings; DROP INDEX ux_deployment_devices_active_device; "
                         "ALTER TABLE deployment_devices DROP COLUMN active; DROP TABLE bundle_parts")  # fmt: skip
        db.executescript("DROP TABLE group_configs; DROP TABLE group_config_devices")  # added by 0005
        db.executescript("DROP TABLE sample_chunks; DROP TABLE dataset_samples; DROP TABLE datasets")  # added by 0006
        db.executescript("DROP TABLE bench_jobs")  # added by 0007
        added_by_0004 = {
            "devices": ["health"],
            "telemetry": ["drift_score"],
            "deployment_devices": ["baseline", "health"],
            "deployments": ["shadow", "shadow_budget", "phase", "gates", "min_samples", "gate_results"],
        }
        for table, columns in added_by_0004.items():
            db.executescript("".join(f"ALTER TABLE {table} DROP COLUMN {column};" for column in columns))
    (old / "secret").write_bytes(os.urandom(32))
    for path in [old, *old.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert open_to_others(old)

    with caplog.at_level("WARNING", logger="edgekit.hub"), running_hub(old) as hub:
        readable = open_to_others(old)
        record(SCENARIO, "data dir paths readable by others after the hub started", len(readable), 0)
        assert readable == []
        assert any("readable by their owner only" in r.getMessage() and "hub.sqlite" in r.getMessage()
                   for r in caplog.records), "the hub did not say that it tightened the data dir"  # fmt: skip
        # The token from before scopes still works, as admin.
        with client(hub, old_token) as http:
            assert http.get("/api/me").json() == {"actor": "old-admin", "scope": "admin"}
            assert http.post("/api/tokens", json={"name": "made-by-old", "scope": "read"}).status_code == 201


def test_each_scope_can_do_only_its_own_part(hub: Hub, cli, bundle: dict[str, Path]) -> None:
    made = cli("hub", "token", "create", "viewer", "--scope", "read", "--data", hub.settings.data_dir)
    assert made.exit_code == 0, made.stderr
    read = made.stdout.strip()
    listed = cli("hub", "token", "list", "--json", "--data", hub.settings.data_dir)
    assert {t["name"]: t["scope"] for t in json.loads(listed.stdout)}["viewer"] == "read"
    operate = create_token(hub.sessions, "operator", "test")  # the default scope
    admin = create_token(hub.sessions, "boss", "test", scope="admin")
    deployment = running_deployment(hub)
    changes = [("POST", f"/api/deployments/{deployment}/halt", {}), ("POST", "/api/deployments",
               {"json": {"bundle_id": hub.registry.all()[0].id, "target": "cam-1"}}),
               ("PUT", "/api/devices/cam-1/labels", {"json": {"labels": {"by": "reader"}}}),
               ("POST", "/api/bundles", {"content": bundle["v1"].read_bytes(),
                                         "headers": {"Content-Type": "application/octet-stream"}})]  # fmt: skip
    token_admin = [("POST", "/api/tokens", {"json": {"name": "escalated", "scope": "admin"}}),
                   ("GET", "/api/tokens", {}), ("DELETE", "/api/tokens/boss", {})]  # fmt: skip
    allowed = 0
    with client(hub, read) as reader, client(hub, operate) as operator, client(hub, admin) as boss:
        assert reader.get("/api/deployments").status_code == 200, "a read token cannot read"
        for token_client, requests, needed in ((reader, changes, "operate"), (reader, token_admin, "admin"),
                                               (operator, token_admin, "admin")):  # fmt: skip
            for method, path, kwargs in requests:
                response = token_client.request(method, path, **kwargs)
                allowed += response.status_code != 403
                assert response.status_code == 403, (method, path, response.text)
                assert f"needs a token with scope '{needed}'" in response.json()["detail"]
        record(SCENARIO, "state changes or token admin beyond the token's scope (10 tried)", allowed, 0)
        assert hub.rollouts.get(deployment).state == "running"
        with hub.sessions() as db:
            assert db.query(ApiToken).filter_by(name="escalated").count() == 0

        assert operator.post(f"/api/deployments/{deployment}/halt").status_code == 200
        created = boss.post("/api/tokens", json={"name": "ci", "scope": "read"})
        assert created.status_code == 201 and created.json()["scope"] == "read" and created.json()["token"]
        assert boss.delete("/api/tokens/ci").json()["revoked"] is True

    # The CLI says what is missing, as a user error.
    pushed = cli("push", bundle["v1"], "--hub", hub.http_url, "--token", read)
    assert_user_error(pushed, "needs a token with scope 'operate'")


def test_every_state_changing_route_declares_a_scope_above_read(hub: Hub) -> None:
    """The route table itself: a new POST/PUT/PATCH/DELETE route without Operator or Admin fails here."""

    def scopes(dependant) -> set[str]:
        found = {getattr(dependant.call, "needed_scope", None)} - {None}
        return found.union(*(scopes(d) for d in dependant.dependencies))

    unguarded = []
    for route in hub.app.routes:
        if not isinstance(route, APIRoute) or not route.methods - {"GET", "HEAD"} or route.path in SESSION_PATHS:
            continue
        if not any(scope_allows(s, "operate") for s in scopes(route.dependant)):
            unguarded.append(f"{sorted(route.methods)} {route.path}")
    record(SCENARIO, "state-changing routes a read token may call", len(unguarded), 0)
    assert unguarded == []
