"""boundary: the local boundary (contract section 10): a request the device's own apps would not send - a Host
that is not the loader's, or any Origin - is refused before anything else runs; the Unix socket is made 0660;
the container's health check finds the loader in either mode."""

import asyncio
import contextlib
import http.server
import json
import logging
import os
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

import boundary
import main
from tests.fakes import fake_services

ROOT = Path(__file__).resolve().parent.parent

# LOADER_HOST, then ALLOWED_HOSTS: commas, spaces, a port and an IPv6 address without brackets in them.
CONFIG = ("10.0.0.5", "loader, My-App.local  fe80::1 gateway:9000")
ALLOWED = [
    "localhost",
    "localhost:8080",
    "LOCALHOST:8080",
    "localhost:",
    "127.0.0.1",
    "127.0.0.1:1",
    "[::1]",
    "[::1]:8080",
    "10.0.0.5:8080",
    "loader",
    "loader:8080",
    "LOADER",
    "my-app.local:80",
    "[fe80::1]:8080",
    "gateway",
]
REFUSED = [
    "attacker.example",
    "attacker.example:8080",
    "localhost.attacker.example",
    "127.0.0.1.nip.io",
    "127.0.0.1.nip.io:8080",
    "localhost:8080.attacker.example",
    "localhost:8080@attacker.example",
    "[::1].attacker.example",
    "[::1]:80:80",
    "::1",
    "[::1",
    "localhost:80a",
    "localhost:\u00b2",  # a superscript two: a digit to str.isdigit, not to a port
    "0.0.0.0:8080",  # an address to listen on, not a name
    " localhost",
    "local host",
    "loader\x00",
    "testserver",
    "",
]


class Recorder:
    """An app that notes every scope it is called with and answers 200."""

    def __init__(self):
        self.calls = []

    async def __call__(self, scope, receive, send):
        self.calls.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


def scope_of(headers, method="POST", path="/load/m.bin", kind="http", **extra):
    return {
        "type": kind,
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        **extra,
    }


def call(guard, headers, **kw):
    """The guard's answer to one request: (status, headers, body); its body is never read."""
    sent = []

    async def receive():
        raise AssertionError("the request's body was read")

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope_of(headers, **kw), receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body


@pytest.fixture
def app():
    return Recorder()


@pytest.fixture
def guard(app):
    return boundary.HostGuard(app, allowed_hosts=CONFIG)


def test_boundary_is_a_compiled_extension():
    assert boundary.__file__.endswith(".so"), boundary.__file__


@pytest.mark.parametrize("host", ALLOWED)
def test_the_loaders_own_names_pass(guard, app, host):
    assert call(guard, [("Host", host)])[0] == 200
    assert app.calls == ["http"]


@pytest.mark.parametrize("host", REFUSED, ids=repr)
def test_any_other_host_is_421_before_the_app_runs(guard, app, host):
    status, headers, body = call(guard, [("Host", host), ("Content-Length", "5")])
    assert status == 421
    assert headers[b"content-type"] == b"application/json" and headers[b"connection"] == b"close"
    detail = json.loads(body)["detail"]
    assert "ALLOWED_HOSTS" in detail and "localhost" in detail
    assert app.calls == []


@pytest.mark.parametrize("hosts", [[], ["localhost", "localhost"], ["localhost", "attacker.example"]])
def test_no_host_or_more_than_one_is_421(guard, app, hosts):
    status, _, body = call(guard, [("Host", h) for h in hosts])
    assert status == 421 and "Host" in json.loads(body)["detail"]
    assert app.calls == []


@pytest.mark.parametrize("origin", ["http://attacker.example", "null", "http://localhost:8080", ""])
def test_any_origin_is_403_before_the_app_runs(guard, app, origin):
    status, headers, body = call(guard, [("Host", "localhost:8080"), ("Origin", origin)])
    assert status == 403 and headers[b"content-type"] == b"application/json"
    assert "Origin" in json.loads(body)["detail"]
    assert app.calls == []


def test_a_foreign_host_is_refused_before_its_origin_is_looked_at(guard):
    assert call(guard, [("Host", "attacker.example"), ("Origin", "http://attacker.example")])[0] == 421


def test_a_refusal_shows_a_long_hostile_header_short_and_printable(guard, caplog):
    hostile = "evil\r\nX-Forged: 1\x1b[31m" + "a" * 10_000
    with caplog.at_level(logging.INFO, logger="loader.boundary"):
        _, _, body = call(guard, [("Host", hostile)])
        _, _, body_origin = call(guard, [("Host", "localhost"), ("Origin", hostile)])
    for detail in (json.loads(body)["detail"], *(r.getMessage() for r in caplog.records)):
        assert len(detail) < 400 and "a" * 100 not in detail, detail
        assert all(c.isprintable() for c in detail), detail
    assert "Origin" in json.loads(body_origin)["detail"] and "evil" not in json.loads(body_origin)["detail"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "421" in messages[0] and "403" in messages[1], messages
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_lifespan_passes_through(guard, app):
    async def receive():
        return {"type": "lifespan.shutdown"}

    async def send(_message):
        pass

    asyncio.run(guard({"type": "lifespan"}, receive, send))
    assert app.calls == ["lifespan"]


def test_a_websocket_from_elsewhere_is_refused(guard, app):
    with_denial = call(
        guard, [("Host", "attacker.example")], kind="websocket", extensions={"websocket.http.response": {}}
    )
    assert with_denial[0] == 421
    sent = []

    async def send(message):
        sent.append(message)

    scope = scope_of([("Host", "localhost"), ("Origin", "http://attacker.example")], kind="websocket")
    asyncio.run(guard(scope, None, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]
    assert app.calls == []


def test_a_function_of_the_names_is_read_on_each_request(app):
    names = ["loader"]
    guard = boundary.HostGuard(app, allowed_hosts=lambda: names)
    assert call(guard, [("Host", "loader")])[0] == 200
    names = ["other"]
    assert call(guard, [("Host", "loader")])[0] == 421
    assert call(guard, [("Host", "other:1")])[0] == 200


def test_wildcard_listen_addresses_add_no_name():
    assert boundary.allowed_names("0.0.0.0", "::", "") == frozenset(boundary.LOOPBACK)
    assert boundary.allowed_names("::1") == frozenset(boundary.LOOPBACK)


# --- the loader's app ----------------------------------------------------------------------------------


def operations():
    """(method, path) of every route of the loader, with a name for each path parameter."""
    return [
        (method, route.path.replace("{filename:path}", "m.bin").replace("{filename}", "m.bin"))
        for route in main.routes.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    ]


@pytest.fixture
def loader_app(loader_env, monkeypatch):
    """The loader's app, of fake services, with LOADER_HOST and ALLOWED_HOSTS set."""
    monkeypatch.setenv("LOADER_HOST", "0.0.0.0")
    monkeypatch.setenv("ALLOWED_HOSTS", "loader,other-name")
    main.settings.cache_clear()
    main.use_services(lambda s: fake_services())
    return main.create_app()


def test_the_guard_is_the_apps_outermost_middleware(loader_app):
    assert loader_app.user_middleware[0].cls is boundary.HostGuard


@pytest.mark.parametrize("headers", [{"Host": "attacker.example"}, {"Origin": "http://attacker.example"}])
def test_every_route_of_the_loader_refuses_before_any_work(loader_app, headers, caplog):
    ops = operations()
    assert len(ops) >= 10 and ("GET", "/health") in ops
    expected = 421 if "Host" in headers else 403
    with caplog.at_level(logging.INFO), TestClient(loader_app, base_url="http://localhost:8080") as client:
        for method, path in ops:
            r = client.request(method, path, headers=headers, json={"email": "a@b", "password": "p"})
            assert r.status_code == expected, (method, path, r.text)
            assert r.headers["content-type"] == "application/json" and set(r.json()) == {"detail"}
    # One line each, the guard's: the request never reached the edge inside it (which logs every request
    # it sees), let alone a route.
    lines = [
        r
        for r in caplog.records
        if r.name.startswith("loader") and r.getMessage().startswith(("GET", "POST", "refused"))
    ]
    assert [r.name for r in lines] == ["loader.boundary"] * len(ops), [r.getMessage() for r in lines]


@pytest.mark.parametrize("base", ["http://localhost", "http://127.0.0.1:8080", "http://[::1]:8080"])
def test_the_loader_answers_its_loopback_names(loader_app, base):
    with TestClient(loader_app, base_url=base) as client:
        assert client.get("/health").json() == {"status": "healthy"}


@pytest.mark.parametrize("base", ["http://loader:8080", "http://OTHER-NAME", "http://loader"])
def test_the_loader_answers_the_names_in_allowed_hosts(loader_app, base):
    with TestClient(loader_app, base_url=base) as client:
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "base", ["http://0.0.0.0:8080", "http://testserver", "http://loader.attacker.example"]
)
def test_the_loader_refuses_other_names(loader_app, base):
    with TestClient(loader_app, base_url=base) as client:
        r = client.get("/health")
        assert r.status_code == 421 and "ALLOWED_HOSTS" in r.json()["detail"]


# --- the Unix socket -----------------------------------------------------------------------------------


@pytest.fixture
def short_dir():
    """A directory whose paths fit a Unix socket's 108 bytes (pytest's tmp_path may not)."""
    with tempfile.TemporaryDirectory(prefix="lb-", dir="/tmp") as path:
        yield Path(path)


def test_the_socket_is_0660_of_the_process_group_and_gone_after(short_dir):
    path = short_dir / "loader.sock"
    umask = os.umask(0)  # the widest a caller could leave it
    try:
        with boundary.unix_socket(str(path)) as sock:
            st = path.lstat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
            assert st.st_gid == os.getegid()
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(path))  # it listens
            client.close()
            assert sock.family == socket.AF_UNIX
        assert os.umask(0) == 0  # given back as it was
    finally:
        os.umask(umask)
    assert not path.exists()


def test_a_stale_socket_is_replaced(short_dir):
    path = short_dir / "loader.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a loader that was killed: the file stays, nobody serves on it
    with boundary.unix_socket(str(path)):
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    assert not path.exists()


def test_a_live_socket_is_not_taken_over(short_dir):
    path = short_dir / "loader.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(SystemExit, match="serves on it"), boundary.unix_socket(str(path)):
            pass
        assert stat.S_ISSOCK(path.lstat().st_mode)  # left alone
    finally:
        live.close()


def test_a_path_that_is_no_socket_is_an_invalid_configuration(short_dir):
    path = short_dir / "models.bin"
    path.write_bytes(b"precious")
    with (
        pytest.raises(SystemExit, match="invalid configuration: .*not a socket"),
        boundary.unix_socket(str(path)),
    ):
        pass
    assert path.read_bytes() == b"precious"
    with (
        pytest.raises(SystemExit, match="invalid configuration"),
        boundary.unix_socket(str(short_dir / "no/s")),
    ):
        pass
    with pytest.raises(SystemExit, match="invalid configuration"), boundary.unix_socket("/tmp/" + "s" * 200):
        pass


def test_main_refuses_a_socket_path_that_is_a_file(short_dir):
    path = short_dir / "file"
    path.write_text("x")
    env = {**os.environ, "LOADER_SOCKET": str(path), "MODEL_CACHE_DIR": str(short_dir)}
    out = subprocess.run(
        [sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "invalid configuration: LOADER_SOCKET" in out.stderr, out.stderr
    assert path.read_text() == "x"


# --- the health check ----------------------------------------------------------------------------------


class Health(http.server.BaseHTTPRequestHandler):
    status = 200
    hosts: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hosts.append(self.headers["Host"])
        body = b'{"status": "healthy"}'
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class UnixHttpServer(socketserver.UnixStreamServer):
    def get_request(self):
        request, _ = super().get_request()
        return request, ("local", 0)


@contextlib.contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, code", [(200, 0), (503, 1)])
def test_the_health_check_over_tcp(monkeypatch, status, code):
    handler = type("Handler", (Health,), {"status": status, "hosts": []})
    with serving(http.server.HTTPServer(("127.0.0.1", 0), handler)) as server:
        monkeypatch.setenv("LOADER_HOST", "0.0.0.0")
        monkeypatch.setenv("LOADER_PORT", str(server.server_address[1]))
        monkeypatch.delenv("LOADER_SOCKET", raising=False)
        assert boundary.health_check(timeout=5) == code
    assert handler.hosts == ["localhost"]


def test_the_health_check_over_the_socket(monkeypatch, short_dir):
    handler = type("Handler", (Health,), {"hosts": []})
    path = short_dir / "loader.sock"
    with serving(UnixHttpServer(str(path), handler)):
        monkeypatch.setenv("LOADER_SOCKET", str(path))
        monkeypatch.setenv("LOADER_PORT", "1")  # not used
        assert boundary.health_check(timeout=5) == 0
    assert handler.hosts == ["localhost"]


def test_the_health_check_fails_when_nothing_answers(monkeypatch, short_dir):
    monkeypatch.setenv("LOADER_SOCKET", str(short_dir / "none.sock"))
    assert boundary.health_check(timeout=2) == 1
