"""Contract section 4 for /login, /load and /upload, against the real reference API and SeaweedFS."""

import base64
import contextlib
import hashlib
import http.client
import json
import os
import threading

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from devstack.ports import free_port
from devstack.processes.loader import LoaderProcess, proc_field
from devstack.wait import until
from download import segments
from tests.integration.conftest import PASSWORD, wait_out_the_tokens

pytestmark = pytest.mark.integration


def name():
    return f"m-{os.urandom(4).hex()}.bin"


def segments_of(stack, n):
    """How many ranged GETs one download of ``n``'s big part makes (the loader's own segment plan)."""
    size = stack.s3_admin_client().head_object(Bucket="models", Key=n + ".big")["ContentLength"]
    return len(segments(size))


def metric_values(loader):
    """/metrics as {(sample name, labels): value}, labels a sorted tuple of (name, value)."""
    text = loader.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_login_returns_the_user_from_the_jwt(loader, user):
    r = loader.login(user, PASSWORD)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["user"]["email"] == user and body["user"]["role"] == "Operator"
    assert body["user"]["id"]
    assert loader.get("/status").json()["authenticated"] is True


def test_wrong_password_is_401_and_never_echoed(loader, user):
    r = loader.login(user, "wrong-Pa55word")
    assert r.status_code == 401
    assert "wrong-Pa55word" not in r.text and "Traceback" not in r.text


@pytest.mark.parametrize("body", [{"email": "a@b"}, {"password": "x"}, {}, [1], "text"])
def test_malformed_login_is_422_with_a_text_detail(loader, body):
    r = loader.post("/login", json=body)
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)


def test_api_down_is_502(tmp_path, proxy, user):
    with LoaderProcess(tmp_path, RESOURCE_API_URL=f"http://127.0.0.1:{free_port()}") as dead:
        r = dead.login(user, PASSWORD)
    assert r.status_code == 502 and "unreachable" in r.json()["detail"]


def test_load_needs_login(loader, stack):
    r = loader.load("anything.bin", "models")
    assert r.status_code == 401


def test_load_is_byte_identical_and_cached(loader, stack, user, proxy):
    data = os.urandom(5 * 1024 * 1024 + 3)
    n = name()
    stack.publish("models", n, data)
    assert loader.login(user, PASSWORD).status_code == 200
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.content == data
    # the exact size is announced up front (from the blob's last block), not chunked
    assert r.headers["content-length"] == str(len(data)) and "transfer-encoding" not in r.headers
    assert proxy.count("GET", f"/models/{n}.big") == segments_of(stack, n) == 2  # the end, then the rest
    loader.cached_big_part("models", n)  # the commit follows the load's last byte
    r = loader.load(n, "models")
    assert r.content == data and r.headers["content-length"] == str(len(data))
    assert proxy.count("GET", f"/models/{n}.big") == 2  # second load from the cache


def test_large_model_loads_byte_identical(loader, stack, user, tmp_path):
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(300):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            f.write(block)
    n = name()
    stack.publish("models", n, path)
    loader.login(user, PASSWORD)
    got, size = hashlib.sha256(), 0
    with loader.load(n, "models", stream=True) as r:
        assert r.status_code == 200 and r.headers["content-length"] == str(300 * 1024 * 1024)
        for chunk in r.iter_content(1024 * 1024):
            got.update(chunk)
            size += len(chunk)
    assert size == 300 * 1024 * 1024 and got.hexdigest() == digest.hexdigest()


def test_expired_token_is_renewed_transparently(loader, stack, user):
    data = os.urandom(10_000)
    n = name()
    stack.publish("models", n, data)
    stack.set_token_ttl(1)
    try:
        loader.login(user, PASSWORD)
        wait_out_the_tokens(stack, user)
        stack.reset_counters()
        r = loader.load(n, "models")
        assert r.status_code == 200 and r.content == data
        assert stack.counters().get("POST /login", 0) >= 1
    finally:
        stack.set_token_ttl(3600)


def test_hardware_mismatch_is_409(loader, stack, user):
    n = name()
    stack.publish("models", n, b"x" * 100)
    token = requests.post(stack.api_url + "/login", json={"email": user, "password": PASSWORD}).json()[
        "token"
    ]
    # Bind the account to another machine first, as if it had been used there.
    requests.post(
        stack.api_url + "/resources/get/models",
        headers={"Authorization": f"Bearer {token}"},
        json={"fileName": n + ".small", "password": PASSWORD, "hardware": "CPU: other machine"},
    )
    loader.login(user, PASSWORD)
    r = loader.load(n, "models")
    assert r.status_code == 409 and "hardware" in r.json()["detail"]


def test_missing_resource_is_404(loader, user):
    loader.login(user, PASSWORD)
    r = loader.load("no-such-model.bin", "models")
    assert r.status_code == 404


@pytest.mark.parametrize(
    "path,folder",
    [
        ("../../etc/passwd", "models"),
        ("..%2F..%2Fetc%2Fpasswd", "models"),
        ("a/b", "models"),
        (".hidden", "models"),
        ("m.bin", "../etc"),
        ("m.bin", "Models"),
        ("m.bin", "a"),
        ("x" * 129, "models"),
    ],
)
def test_traversal_and_invalid_names_are_400(loader, user, path, folder, proxy):
    loader.login(user, PASSWORD)
    proxy.reset_counts()
    # http.client sends the path as written; requests/urllib3 would remove the dot segments first.
    conn = http.client.HTTPConnection("127.0.0.1", loader.port, timeout=30)
    conn.request(
        "POST",
        f"/load/{path}",
        body=json.dumps({"folder": folder}),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 400, body
    assert isinstance(body["detail"], str)
    assert proxy.counts() == {}


def test_cdn_cut_mid_transfer_is_resumed(loader, stack, user, proxy):
    data = os.urandom(20 * 1024 * 1024)
    n = name()
    stack.publish("models", n, data)
    loader.login(user, PASSWORD)
    # cut the GET of the segment from byte 0 after 3 MiB
    proxy.cut_next(3 * 1024 * 1024, method="GET", path=f"/models/{n}.big", starts=range(1))
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    ranges = [s.headers.get("range") for s in proxy.seen() if s.method == "GET"]
    starts = sorted(int(r.split("=")[1].split("-")[0]) for r in ranges)
    size = stack.s3_admin_client().head_object(Bucket="models", Key=n + ".big")["ContentLength"]
    # each segment once, plus one GET that resumed the cut one where it broke off
    assert starts == sorted([start for start, _ in segments(size)] + [3 * 1024 * 1024]), ranges
    assert all(s.headers.get("if-match") for s in proxy.seen() if s.method == "GET")


def test_cache_is_used_while_the_cdn_is_offline(loader, stack, user, proxy):
    data = os.urandom(1024 * 1024)
    n = name()
    stack.publish("models", n, data)
    loader.login(user, PASSWORD)
    assert loader.load(n, "models").content == data
    loader.cached_big_part("models", n)
    proxy.drop_next(None)
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    other = name()
    stack.publish("models", other, b"never cached")
    assert loader.load(other, "models").status_code == 502


def test_stale_cache_is_refreshed(loader, stack, user):
    n = name()
    stack.publish("models", n, b"version one" * 1000)
    loader.login(user, PASSWORD)
    assert loader.load(n, "models").content == b"version one" * 1000
    stack.publish("models", n, b"version two!" * 1200)
    assert loader.load(n, "models").content == b"version two!" * 1200


@pytest.mark.parametrize("where", ["last", "middle"])
def test_changed_cache_file_is_detected_and_refetched(loader, stack, user, proxy, where):
    # A multiple of 16 bytes: the blob's last block is all padding, so a client that knows the length has
    # every byte before that block reaches it.
    data = os.urandom(2 * 1024 * 1024)
    n = name()
    stack.publish("models", n, data)
    loader.login(user, PASSWORD)
    assert loader.load(n, "models").content == data
    path = loader.cached_big_part("models", n)
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        pos = f.tell() - 1 if where == "last" else f.tell() // 2
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    assert proxy.count("GET", f"/models/{n}.big") == 2 * segments_of(stack, n)  # fetched again


def test_uploader_uploads_and_operator_gets_403(loader, stack, user, uploader):
    data = os.urandom(3 * 1024 * 1024 + 5)
    n = name()
    loader.login(user, PASSWORD)
    r = loader.post(f"/upload/{n}", files={"data": (n, data)}, data={"folder": "models"})
    assert r.status_code == 403
    loader.login(uploader, PASSWORD)
    r = loader.post(f"/upload/{n}", files={"data": (n, data)}, data={"folder": "models"})
    assert r.status_code == 200 and r.json() == {"status": "ok", "size": len(data)}
    assert loader.load(n, "models").content == data
    # The upload is readable by anyone else through the contract alone: small part and manifest from the
    # API, big part from S3, the data key from the manifest.
    small = stack.admin.get_file("models", n + ".small")
    big = stack.s3_admin_client().get_object(Bucket="models", Key=n + ".big")["Body"].read()
    key = base64.b64decode(stack.manifest("models", n)["key"])
    from devstack import crypto

    assert len(small) == 3072 and crypto.decrypt(key, small + big) == data


def test_upload_with_folder_first_and_bad_folder(loader, uploader):
    loader.login(uploader, PASSWORD)
    n = name()
    files = [("folder", (None, "models")), ("data", (n, b"tiny"))]
    r = loader.post(f"/upload/{n}", files=files)
    assert r.status_code == 200 and r.json()["size"] == 4
    assert loader.load(n, "models").content == b"tiny"
    r = loader.post(f"/upload/{n}", files={"data": (n, b"x")}, data={"folder": "../etc"})
    assert r.status_code == 400
    r = loader.post(f"/upload/{n}", files={"data": (n, b"x")})
    assert r.status_code == 400


def test_parallel_loads_share_one_cdn_download(loader, stack, user, proxy):
    data = os.urandom(30 * 1024 * 1024)
    n = name()
    stack.publish("models", n, data)
    loader.login(user, PASSWORD)
    results, gate = [None] * 10, threading.Barrier(10)

    def fetch(i):
        gate.wait()
        results[i] = loader.load(n, "models").content

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(10)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(r == data for r in results)
    # One download: each of its segments fetched once, whatever the number of loads (the last block, then
    # four of the first 28 MiB).
    assert proxy.count("GET", f"/models/{n}.big") == segments_of(stack, n) == 5
    assert metric_values(loader)[("loader_cdn_downloads_total", ())] == 1


def test_upload_needs_login(loader):
    r = loader.post("/upload/m.bin", files={"data": ("m.bin", b"x")}, data={"folder": "models"})
    assert r.status_code == 401


def test_upload_with_the_cdn_failing_is_502_and_leaves_nothing(loader, uploader, proxy):
    loader.login(uploader, PASSWORD)
    n = name()
    proxy.fail_next(500, None, method="PUT")
    r = loader.post(f"/upload/{n}", files={"data": (n, os.urandom(100_000))}, data={"folder": "models"})
    assert r.status_code == 502 and "CDN" in r.json()["detail"]
    cache = loader.env["MODEL_CACHE_DIR"]
    leftovers = [f for _, _, files in os.walk(cache) for f in files if n in f]
    assert leftovers == []


def test_metrics_count_requests_bytes_and_cache(loader, stack, user):
    n = name()
    data = os.urandom(70_000)
    stack.publish("models", n, data)
    loader.login(user, PASSWORD)
    loader.load(n, "models")
    loader.cached_big_part("models", n)
    loader.load(n, "models")
    value = metric_values(loader)
    assert value[("loader_bytes_loaded_total", ())] == 2 * len(data)
    assert value[("loader_cache_hits_total", ())] == 1 and value[("loader_cache_misses_total", ())] == 1
    load_ok = (("method", "POST"), ("route", "/load/{filename:path}"), ("status", "200"))
    assert value[("loader_requests_total", load_ok)] == 2
    assert value[("loader_unlock_state", (("state", "idle"),))] == 1


def test_a_client_that_hangs_up_mid_load_leaves_nothing_running(loader, stack, user):
    data = os.urandom(40 * 1024 * 1024 + 5)
    warm, n = name(), name()
    stack.publish("models", warm, b"warm-up" * 1000)
    stack.publish("models", n, data)
    loader.login(user, PASSWORD)
    assert loader.load(warm, "models").status_code == 200  # the thread pool is up to size
    threads = proc_field(loader.pid, "Threads")
    with loader.load(n, "models", stream=True) as r:
        assert r.status_code == 200
        first = next(r.iter_content(1024 * 1024))
        assert data.startswith(first)
    # The download goes on without its reader and commits; the reading thread and its files go away (a
    # thread of the pool that ends meanwhile can make the count drop first: both are waited for).
    cache = loader.cached_big_part("models", n).parent

    def open_in_cache():
        fds = f"/proc/{loader.pid}/fd"
        found = []
        for fd in os.listdir(fds):
            with contextlib.suppress(FileNotFoundError):  # closed since the listing
                if os.readlink(f"{fds}/{fd}").startswith(str(cache)):
                    found.append(fd)
        return found

    def gone():
        return proc_field(loader.pid, "Threads") <= threads and not open_in_cache()

    until(gone, 10, lambda: f"the load left threads, or descriptors {open_in_cache()} in the cache", 0.05)
    assert loader.get("/health").status_code == 200
    assert loader.load(n, "models").content == data
