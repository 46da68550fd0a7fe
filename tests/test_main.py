"""The HTTP edge: error mapping in one table, lazy imports, no credential ever echoed."""

import inspect
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import errors
import main
from devstack.wait import until

ROOT = Path(__file__).resolve().parent.parent


def loader_errors():
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.LoaderError)]


@pytest.mark.parametrize("cls", loader_errors(), ids=lambda c: c.__name__)
def test_every_error_class_has_its_own_status(cls):
    mapped = [klass for klass, _ in main.STATUS]
    assert cls in mapped, f"{cls.__name__} is not in main.STATUS"
    if cls is not errors.LoaderError:
        assert main.status_of(cls("x")) != 500


def test_specific_statuses():
    assert main.status_of(errors.NotLoggedIn()) == 401
    assert main.status_of(errors.UpstreamTimeout("t")) == 504
    assert main.status_of(errors.DecryptionError()) == 502
    assert main.status_of(errors.HardwareMismatch("h")) == 409
    assert main.status_of(errors.StorageError("s")) == 507


def test_importing_main_imports_no_compiled_service_module():
    code = (
        "import sys, main; "
        "print(','.join(m for m in ('api_client', 'cdn_manager', 'binary_split', 'hardware_service', "
        "'security', 'model_cache', 'download', 'manifest', 'aligned_io', 'metrics', 'read_ahead', "
        "'upload_form', 'prometheus_client', 'boto3', 'docker') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RESOURCE_API_URL", "http://127.0.0.1:9")
    main.settings.cache_clear()
    main.forget_services()
    with TestClient(main.app, raise_server_exceptions=False) as c:
        yield c
    main.settings.cache_clear()
    main.forget_services()


def test_validation_errors_name_fields_but_never_echo_values(client):
    r = client.post("/login", json={"email": ["s3cret-value"], "password": "hunter2-secret"})
    assert r.status_code == 422
    assert "s3cret-value" not in r.text and "hunter2-secret" not in r.text
    assert r.json()["detail"].startswith("invalid request: body.email")


class Failing:
    """Services whose login fails with an exception no handler knows."""

    def authenticate(self, email, password):
        raise RuntimeError("internal state with password=hunter2")


def test_unexpected_exceptions_are_a_plain_500(client, monkeypatch):
    monkeypatch.setitem(main.app.dependency_overrides, main.services, Failing)
    r = client.post("/login", json={"email": "a@b", "password": "hunter2"})
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}


def test_status_and_health(client):
    assert client.get("/health").json() == {"status": "healthy"}
    s = client.get("/status").json()
    assert s["authenticated"] is False and s["unlock"]["state"] == "idle" and s["modelCacheDir"]


def test_upload_requires_multipart(client):
    r = client.post("/upload/m.bin", content=b"raw", headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400


def test_a_malformed_multipart_body_is_400(client, monkeypatch):
    monkeypatch.setattr(main.services().store, "check_upload", lambda *a: None)  # as a logged-in uploader
    r = client.post(
        "/upload/m.bin",
        content=b"not a multipart body",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert r.status_code == 400 and r.json() == {"detail": "the upload is not valid multipart/form-data"}


def test_a_stop_lets_the_downloads_in_flight_commit(tmp_path, monkeypatch):
    # A load ends with its last byte, before its big part is hashed and committed: a stop waits for that.
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path))
    main.settings.cache_clear()
    main.forget_services()
    waited = []
    try:
        with TestClient(main.app):
            cache = main.services().cache
            monkeypatch.setattr(cache, "settle", lambda timeout: waited.append(timeout) or True)
            assert not waited
        assert waited == [main.SETTLE_SECONDS]
    finally:
        main.settings.cache_clear()
        main.forget_services()


def test_a_login_prepares_the_cdn_clients_in_the_background(tmp_path, monkeypatch):
    # The first load then finds cdn.yaml fetched and the CDN clients built.
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path))
    main.settings.cache_clear()
    main.forget_services()
    try:
        svc = main.services()
        prepared = threading.Event()
        monkeypatch.setattr(svc.api, "login", lambda creds: "the user")
        monkeypatch.setattr(svc.store, "prepare", prepared.set)
        assert svc.authenticate("u@example.com", "pw") == "the user"
        assert prepared.wait(5)
    finally:
        main.settings.cache_clear()
        main.forget_services()


def test_a_newline_in_a_request_path_cannot_forge_a_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="loader")
    client.get("/health%0aINFO%20loader%20forged")
    lines = [line for record in caplog.records for line in record.getMessage().splitlines()]
    assert not [line for line in lines if line.startswith("INFO loader forged")]
    assert any("/health\\nINFO loader forged" in line for line in lines)


def test_two_first_requests_at_once_build_one_services(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path))
    main.settings.cache_clear()
    main.forget_services()
    built, got = [], []
    real = main.Services.__init__

    def slow_init(self, s):
        built.append(self)
        # The first build goes on only once the other caller is inside services() too, waiting for it.
        until(lambda: all(inside_services(t) for t in threads if t is not threading.current_thread()))
        real(self, s)

    def inside_services(thread):
        frame = sys._current_frames().get(thread.ident)
        return frame is not None and frame.f_code is main.services.__code__

    monkeypatch.setattr(main.Services, "__init__", slow_init)
    try:
        threads = [threading.Thread(target=lambda: got.append(main.services())) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(built) == 1 and got[0] is got[1]
    finally:
        main.settings.cache_clear()
        main.forget_services()


def test_urllib3s_own_retry_warning_is_dropped_as_api_client_tells_it():
    def record(msg, args):
        return logging.LogRecord("urllib3.connectionpool", logging.WARNING, __file__, 1, msg, args, None)

    retrying = record("Retrying (%r) after connection broken by '%r': %s", (1, 2, "/x"))
    assert not main._told_by_api_client(retrying)
    assert main._told_by_api_client(record("Connection pool is full, discarding connection: %s", ("h",)))


def test_metrics_read_the_modules_counters_at_each_scrape(client):
    from prometheus_client.parser import text_string_to_metric_families

    from unlock_state import STATES

    def scrape():
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
        return {f.name: f for f in text_string_to_metric_families(r.text)}

    svc = main.services()
    client.get("/health")
    svc.bytes_loaded, svc.bytes_uploaded = 5_000_000_123, 7
    svc.cache.hits, svc.cache.misses, svc.cache.downloads, svc.cache.refetches = 3, 4, 5, 6
    svc.store.format1_loads = 8
    families = scrape()
    counters = {
        "loader_bytes_loaded": 5_000_000_123,
        "loader_bytes_uploaded": 7,
        "loader_cache_hits": 3,
        "loader_cache_misses": 4,
        "loader_cdn_downloads": 5,
        "loader_cache_refetches": 6,
        "loader_format1_loads": 8,
    }
    for family, value in counters.items():
        assert families[family].type == "counter"
        samples = [(s.name, s.labels, s.value) for s in families[family].samples]
        assert samples == [(family + "_total", {}, value)]
    assert families["loader_unlock_duration_seconds"].type == "gauge"
    assert [s.value for s in families["loader_unlock_duration_seconds"].samples] == [0.0]
    state = families["loader_unlock_state"]
    assert state.type == "gauge"
    assert {s.labels["state"]: s.value for s in state.samples} == {s: float(s == "idle") for s in STATES}
    health = [s for s in families["loader_requests"].samples if s.labels.get("route") == "/health"]
    assert families["loader_requests"].type == "counter" and health and health[0].value >= 1
    assert families["loader_request_seconds"].type == "histogram"

    svc.cache.hits += 1  # read at the scrape, not copied when the metrics were made
    assert scrape()["loader_cache_hits"].samples[0].value == 4


# Sixteen threads allocate at once, then glibc's malloc_info tells how many arenas the process made.
ARENAS = """
import ctypes, os, sys, tempfile, threading
import main
from devstack.wait import until
if sys.argv[1] == "limited":
    main.limit_malloc_arenas()
both = threading.Barrier(16)
def allocate():
    both.wait()
    held = [os.urandom(300_000) for _ in range(20)]
    both.wait()
threads = [threading.Thread(target=allocate) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile() as f:
    out = ctypes.c_void_p(libc.fopen(f.name.encode(), b"w"))
    libc.malloc_info(0, out)
    libc.fclose(out)
    print(open(f.name).read().count("<heap nr="))
"""


def test_the_loader_keeps_to_two_malloc_arenas():
    """The soak found the loader's RSS at rest growing by ~200 MB over a run: each of many threads' own
    glibc arena kept the multi-MiB chunks freed in it. main() now limits the arenas to two."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def arenas(mode):
        out = subprocess.run(
            [sys.executable, "-c", ARENAS, mode],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout)

    assert arenas("default") > 2  # the test can tell: left alone, glibc makes more
    assert arenas("limited") <= main.MALLOC_ARENAS


def test_the_heap_is_trimmed_once_the_loader_is_idle_after_a_load(client, monkeypatch):
    """The soak found the loader's RSS at rest climbing to ~200 MB over a run and staying there: glibc keeps
    the chunks loads and uploads freed. Once idle after a load or upload, the loader calls malloc_trim."""
    trims = []
    monkeypatch.setattr(main.memory, "trim", trims.append)
    monkeypatch.setattr(main.memory, "delay", 0.05)
    monkeypatch.setattr(main.memory, "dirty", False)
    assert client.get("/health").status_code == 200
    assert not main.memory.dirty  # a light request leaves nothing to trim
    assert client.post("/load/m.bin", json={"folder": "models"}).status_code == 401
    until(lambda: trims, what="no trim after the load")
    assert trims == [0] and not main.memory.dirty and main.memory.busy == 0
