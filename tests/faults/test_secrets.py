"""No secret ever leaves the loader: not in its logs (at DEBUG), not in an error body, not in a file."""

import hashlib
import os
import re
import secrets
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests

import hardware_service
import security
from devstack.images import publish_images
from devstack.processes.dockerd import import_image
from tests.faults.conftest import MiB, model_name, start_loader
from tests.integration.conftest import wait_out_the_tokens

pytestmark = [pytest.mark.integration, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
JWT = re.compile(rb"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+")
TAG = "azaion/secrets-unlock:1"


class Session:
    """Runs calls against the loader and keeps every answer that is not a model's bytes."""

    def __init__(self, loader):
        self.loader = loader
        self.answers = []

    def call(self, method, path, expect, **kw):
        r = getattr(self.loader, method)(path, **kw)
        if r.headers.get("content-type", "").startswith("application/octet-stream") and r.status_code == 200:
            self.answers.append(f"{method} {path} -> {r.status_code} (model bytes)".encode())
        else:
            self.answers.append(f"{method} {path} -> {r.status_code} ".encode() + r.content)
        assert r.status_code == expect, (method, path, r.status_code, r.text[:300])
        return r


def secret_values(stack, accounts, wrong_password, fragment):
    """Every secret of the session, as the bytes that must not appear (raw and hex where binary)."""
    hardware = hardware_service.HardwareService().hardware
    found = {"the wrong password": wrong_password.encode()}
    for email, password in accounts:
        found[f"password of {email}"] = password.encode()
        token = requests.post(
            stack.api_url + "/login", json={"email": email, "password": password}, timeout=30
        )
        found[f"API token of {email}"] = token.json()["token"].encode()
        key = security.api_key(email, password, hardware)
        found[f"API key of {email} (hex)"] = key.hex().encode()
        found[f"API key of {email} (raw)"] = bytes(key)
    for identity, creds in stack.s3.credentials.items():
        found[f"CDN access key of {identity}"] = creds["access_key"].encode()
        found[f"CDN secret of {identity}"] = creds["secret_key"].encode()
    found["key fragment (hex)"] = fragment.hex().encode()
    found["key fragment (raw)"] = fragment
    found["archive key (hex)"] = hashlib.sha256(fragment).hexdigest().encode()
    found["resource key (hex)"] = security.resource_key().hex().encode()
    found["resource key (raw)"] = bytes(security.resource_key())
    return found


def leaks(blob, values):
    named = [name for name, value in values.items() if value in blob]
    if JWT.search(blob):
        named.append(f"a JWT ({JWT.search(blob).group()[:20].decode()}...)")
    return named


# The loader runs with the repository as its working directory; what other engineers edit there meanwhile
# (sources, docs, the dev stack's own data) is not the loader's doing.
NOT_THE_LOADERS = {".venv", ".git", "build", "devstack-data", "__pycache__"}
SOURCE_SUFFIXES = {".py", ".pyx", ".c", ".so", ".md", ".toml", ".txt", ".cfg"}


def written_files(dirs, since, extra=()):
    """Files under ``dirs``, the loader's open files, and what appeared in its working directory since
    ``since``."""
    paths = {p for d in dirs for p in Path(d).rglob("*") if p.is_file()}
    paths |= {Path(p) for p in extra if Path(p).is_file()}
    for folder, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in NOT_THE_LOADERS]
        for name in names:
            p = Path(folder, name)
            try:
                if p.suffix not in SOURCE_SUFFIXES and p.is_file() and p.stat().st_mtime >= since:
                    paths.add(p)
            except OSError:
                continue  # removed meanwhile
    return sorted(paths)


@pytest.fixture
def small_archive(private_dockerd, tmp_path):
    client = private_dockerd.client()
    import_image(client, TAG, {"/hello.txt": b"hello\n" * 1000})
    path = tmp_path / "archive" / "images.enc"
    path.parent.mkdir()
    fragment = publish_images(private_dockerd.host, [TAG], path, fragment=os.urandom(32))
    client.images.remove(TAG, force=True)
    yield path, fragment
    try:
        client.images.remove(TAG, force=True)
    except Exception:  # noqa: BLE001, S110 - already gone
        pass


def test_no_secret_in_logs_error_bodies_or_files(tmp_path, stack, proxy, private_dockerd, small_archive):
    """Reliability: a whole session at LOG_LEVEL=DEBUG (logins, load, upload, unlock, token renewal and
    failures: wrong password, 401/403/404, garbage, slow API, CDN faults, wrong key fragment) | no password,
    token, JWT, API key, CDN secret, key fragment or resource key in the logs, in any answer or in any file
    the loader wrote"""
    archive, fragment = small_archive
    op, up = f"op-{uuid.uuid4().hex[:8]}@azaion.local", f"up-{uuid.uuid4().hex[:8]}@azaion.local"
    op_pw, up_pw, wrong_pw = (secrets.token_urlsafe(12) for _ in range(3))
    stack.add_user(op, op_pw, ["Operator"])
    stack.add_user(up, up_pw, ["ResourceUploader"])
    data = os.urandom(2 * MiB)
    n, published = model_name("s"), model_name("s")
    stack.publish("models", published, os.urandom(MiB))
    started = time.time()
    env = {
        "LOG_LEVEL": "DEBUG",
        "API_TIMEOUT": 2,
        "DOCKER_HOST": private_dockerd.host,
        "IMAGES_PATH": archive,
        "TMPDIR": tmp_path / "loader-tmp",
    }
    (tmp_path / "loader-tmp").mkdir()
    open_files = set()
    try:
        with start_loader(tmp_path / "loader", stack, **env) as loader:
            s = Session(loader)
            s.call("post", "/login", 401, json={"email": up, "password": wrong_pw})
            s.call("post", "/load/x.bin", 401, json={"folder": "models"})
            s.call("post", "/login", 200, json={"email": up, "password": up_pw})
            s.call("post", f"/upload/{n}", 200, files={"data": (n, data)}, data={"folder": "models"})
            assert s.call("post", f"/load/{n}", 200, json={"folder": "models"}).content == data
            s.call("post", "/load/no-such.bin", 404, json={"folder": "models"})
            s.call("post", "/load/x.bin", 400, json={"folder": "../etc"})
            s.call("post", "/login", 422, json={"email": up})

            proxy.truncate_next(method="GET", path=f"/models/{published}.big")
            s.call("post", f"/load/{published}", 200, json={"folder": "models"})
            proxy.fail_next(503, n=None, method="HEAD")
            other = model_name("s")
            stack.publish("models", other, b"never cached")
            s.call("post", f"/load/{other}", 502, json={"folder": "models"})
            proxy.clear_faults()

            stack.set_token_ttl(1)
            try:
                s.call("post", "/login", 200, json={"email": up, "password": up_pw})
                wait_out_the_tokens(stack, up, up_pw)
                s.call("post", f"/load/{n}", 200, json={"folder": "models"})  # the token is renewed
            finally:
                stack.set_token_ttl(3600)

            stack.set_fault("POST /resources/get/models", delay=8, count=None)
            s.call("post", f"/load/{n}", 504, json={"folder": "models"})
            stack.clear_faults()
            stack.set_fault("POST /login", status=200, garbage="not_jwt")
            s.call("post", "/login", 502, json={"email": up, "password": up_pw})
            stack.set_fault("POST /resources/get/models", status=200, garbage="random")
            s.call("post", f"/load/{n}", 502, json={"folder": "models"})
            stack.clear_faults()

            s.call("post", "/login", 200, json={"email": op, "password": op_pw})
            s.call("post", f"/upload/{n}", 403, files={"data": (n, b"x")}, data={"folder": "models"})
            s.call("post", f"/load/{n}", 200, json={"folder": "models"})

            stack.set_key_fragment(os.urandom(32))  # the wrong one first
            s.call("post", "/unlock", 202, json={"email": up, "password": up_pw})
            status = loader.wait_unlock(300)
            assert status["state"] == "error"
            s.answers.append(repr(status).encode())
            stack.set_key_fragment(fragment)
            s.call("post", "/unlock", 202, json={"email": up, "password": up_pw})
            status = loader.wait_unlock(300)
            assert status["state"] == "ready", status
            open_files |= {f.path for f in psutil.Process(loader.pid).open_files()}
            for path in ("/status", "/unlock/status", "/metrics"):
                s.call("get", path, 200)
    finally:
        stack.clear_faults()
        proxy.clear_faults()

    values = secret_values(stack, [(op, op_pw), (up, up_pw)], wrong_pw, fragment)
    log = loader.log_path.read_bytes()
    assert b"POST /login 401" in log and b"POST /unlock 202" in log  # the log is the session's
    assert leaks(log, values) == [], "the loader's log holds secrets"
    for answer in s.answers:
        assert leaks(answer, values) == [], answer[:300]
    dirs = [loader.env["MODEL_CACHE_DIR"], loader.workdir, env["TMPDIR"]]
    files = written_files(dirs, started, open_files)
    assert any(f.name.endswith(".big") for f in files)  # the cache was written and is scanned
    for path in files:
        assert leaks(path.read_bytes(), values) == [], f"{path} holds secrets"
