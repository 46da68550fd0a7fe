"""The local boundary (contract section 10) of a real loader process: a request with a Host that is not the
loader's (DNS rebinding) or with an Origin (a web page's) is refused on every route before any work, while
the device's own clients - curl as the README shows it, an app that calls the loader by its container
name, an app on the Unix socket - get through."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from devstack.seed import DEMO_USERS, seed
from tests.faults.conftest import PASSWORD, MiB, files_under, model_name, start_loader
from tests.faults.test_hostile_input import OPERATIONS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
J = "Content-Type: application/json"
FOREIGN = {"Host": "attacker.example"}
WEB_PAGE = {"Origin": "http://attacker.example"}


def curl(*args, socket_path=None):
    """The curl binary: (HTTP status, body bytes)."""
    argv = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}"]
    if socket_path:
        argv += ["--unix-socket", str(socket_path)]
    out = subprocess.run([*argv, *args], capture_output=True, check=True, timeout=120).stdout
    body, _, status = out.rpartition(b"\n")
    return int(status), body


def send(loader, method, path, headers, credentials, folder):
    """One request of each operation, as a client that means it would send it."""
    kw = {"headers": headers, "timeout": 30}
    if path in ("/login", "/unlock"):
        kw["json"] = credentials
    elif path.startswith(("/load/", "/prefetch/")):
        kw["json"] = {"folder": folder}
    elif path.startswith("/upload/"):
        kw["files"] = {"data": ("m.bin", os.urandom(1024))}
        kw["data"] = {"folder": folder}
    return requests.request(method, loader.url + path, **kw)


@pytest.fixture
def published(stack):
    name, data = model_name("boundary"), os.urandom(2 * MiB + 5)
    stack.publish("models", name, data)
    return name, data


@pytest.mark.parametrize("headers", [FOREIGN, WEB_PAGE], ids=["foreign-host", "origin"])
def test_every_route_refuses_a_foreign_host_or_an_origin_before_any_work(
    stack, api_faults, tmp_path, uploader, published, headers
):
    """Reliability: DNS rebinding (`Host: attacker.example`) or a web page's request (any `Origin`) on every
    route, with valid credentials and a published model | 421 / 403 JSON before any work: no login, no
    Resource API call, nothing in the cache, unlock idle"""
    name, _ = published
    expected = 421 if "Host" in headers else 403
    credentials = {"email": uploader, "password": PASSWORD}
    with start_loader(tmp_path / "loader", stack) as loader:
        api_faults.reset_counters()
        for method, template in OPERATIONS:
            path = template.replace("{filename}", name)
            r = send(loader, method, path, headers, credentials, "models")
            assert r.status_code == expected, (method, path, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json", r.headers
            detail = r.json()["detail"]
            assert set(r.json()) == {"detail"} and ("ALLOWED_HOSTS" in detail or "Origin" in detail)
        status = loader.get("/status").json()
        assert status["authenticated"] is False and status["unlock"]["state"] == "idle", status
        assert files_under(loader.env["MODEL_CACHE_DIR"]) == []
        called = {route: n for route, n in api_faults.counters().items() if n}
        assert not called, f"the Resource API was called: {called}"
        refused = [line for line in loader.log().splitlines() if "loader.boundary refused" in line]
        assert len(refused) == len(OPERATIONS), refused
        # The counters count: the same login from this device reaches the Resource API.
        assert loader.login(uploader, PASSWORD).status_code == 200
        assert any(api_faults.counters().values())


def test_the_readme_curl_lines_work(stack, tmp_path):
    """Reliability: the README's curl lines (/health, /login as the demo operator, /load of the demo model)
    against a loader with the default boundary | 200 each, the model byte-identical"""
    seeded = seed(stack)
    email = next(e for e, (_, roles) in DEMO_USERS.items() if "Operator" in roles)
    password = DEMO_USERS[email][0]
    with start_loader(tmp_path / "loader", stack) as loader:
        base = f"http://127.0.0.1:{loader.port}"
        assert curl(f"{base}/health") == (200, b'{"status":"healthy"}')
        login = json.dumps({"email": email, "password": password})
        status, body = curl("-X", "POST", f"{base}/login", "-H", J, "-d", login)
        assert status == 200 and json.loads(body)["status"] == "ok", body
        folder = json.dumps({"folder": seeded.folder})
        status, body = curl("-X", "POST", f"{base}/load/{seeded.model}", "-H", J, "-d", folder)
        assert status == 200 and hashlib.sha256(body).hexdigest() == seeded.model_sha256
        # curl to localhost: the same loader, by its other name.
        assert curl(f"http://localhost:{loader.port}/health")[0] == 200


def test_allowed_hosts_lets_a_container_name_through(stack, tmp_path, user, published):
    """Reliability: an app in another container calls the loader by its name (`Host: loader:8080`) with
    `ALLOWED_HOSTS=loader` | served as on localhost (login, load byte-identical); other names still 421"""
    name, data = published
    with start_loader(tmp_path / "loader", stack, ALLOWED_HOSTS="loader") as loader:
        named = {"Host": "loader:8080"}
        assert loader.get("/health", headers=named).status_code == 200
        r = loader.post("/login", json={"email": user, "password": PASSWORD}, headers=named)
        assert r.status_code == 200, r.text
        r = loader.post(f"/load/{name}", json={"folder": "models"}, headers=named)
        assert r.status_code == 200 and r.content == data
        for host in ("attacker.example", "loader.attacker.example", "loader:8080.attacker.example"):
            assert loader.get("/health", headers={"Host": host}).status_code == 421, host
        assert loader.get("/health", headers={**named, **WEB_PAGE}).status_code == 403


def test_a_loader_on_a_unix_socket(stack, tmp_path, user, published):
    """Reliability: `LOADER_SOCKET` set | the API on a Unix socket of mode 0660 and the process's group, no
    TCP port listened on; curl --unix-socket logs in and loads byte-identical; a foreign Host is still 421;
    after SIGTERM the socket file is gone"""
    name, data = published
    with tempfile.TemporaryDirectory(prefix="lb-", dir="/tmp") as short:  # a socket path fits 108 bytes
        path = Path(short) / "loader.sock"
        with start_loader(tmp_path / "loader", stack, LOADER_SOCKET=path) as loader:
            st = path.lstat()
            process = psutil.Process(loader.pid)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
            assert st.st_gid == process.gids().effective
            assert process.net_connections(kind="inet") == [], "a TCP or UDP socket is open"
            assert curl("http://localhost/health", socket_path=path) == (200, b'{"status":"healthy"}')
            login = json.dumps({"email": user, "password": PASSWORD})
            status, body = curl(
                "-X", "POST", "http://localhost/login", "-H", J, "-d", login, socket_path=path
            )
            assert status == 200, body
            folder = '{"folder": "models"}'
            status, body = curl(
                "-X", "POST", f"http://localhost/load/{name}", "-H", J, "-d", folder, socket_path=path
            )
            assert status == 200 and body == data
            foreign = curl("-H", "Host: attacker.example", "http://localhost/health", socket_path=path)
            assert foreign[0] == 421
            assert loader.get("/status").json()["authenticated"] is True  # LoaderProcess goes through it too
            loader.stop(signal.SIGTERM)
            assert loader.proc.returncode is not None
            assert not path.exists(), "the socket file outlived the loader"


def exits_at_once(loader):
    """Run ``loader``'s ``python main.py`` to its end: (exit code, what it printed)."""
    out = subprocess.run(
        [sys.executable, "main.py"], cwd=ROOT, env=loader.env, capture_output=True, text=True, timeout=60
    )
    return out.returncode, out.stdout + out.stderr


def test_a_second_loader_on_a_live_socket_refuses_to_start(stack, tmp_path):
    """Reliability: a second loader started on the `LOADER_SOCKET` of one running, or on a path that is a
    file | it exits at once with the reason, the running loader and the file untouched; a socket left by a
    killed loader is replaced"""
    with tempfile.TemporaryDirectory(prefix="lb-", dir="/tmp") as short:
        path = Path(short) / "loader.sock"
        with start_loader(tmp_path / "first", stack, LOADER_SOCKET=path) as first:
            code, printed = exits_at_once(start_loader(tmp_path / "second", stack, LOADER_SOCKET=path))
            assert code == 1 and "serves on it" in printed, printed
            assert first.get("/health").status_code == 200
            first.kill()  # the socket file stays behind
        assert stat.S_ISSOCK(path.lstat().st_mode)
        with start_loader(tmp_path / "third", stack, LOADER_SOCKET=path) as third:
            assert third.get("/health").status_code == 200
            assert "removed the stale socket" in third.log()
        regular = Path(short) / f"{uuid.uuid4().hex[:6]}.bin"
        regular.write_bytes(b"precious")
        code, printed = exits_at_once(start_loader(tmp_path / "fourth", stack, LOADER_SOCKET=regular))
        assert code == 1 and "invalid configuration: LOADER_SOCKET" in printed, printed
        assert regular.read_bytes() == b"precious"
