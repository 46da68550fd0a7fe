"""main: the table of statuses, the lazy imports, the settings, the one Services of the process and the
routes (/health, /status, /prefetch, /downloads, /upload)."""

import http.client
import inspect
import json
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
from tests.fakes import (
    CACHED,
    LOCAL,
    PREFETCH_ANSWERS,
    STARTED,
    BudgetCache,
    FakeUnlockStatus,
    NoSession,
    UploaderStore,
    download_status,
    fake_services,
    served,
    status_of_served,
)

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
        "print(','.join(m for m in ('api_client', 'cdn_manager', 'binary_split', 'unlock', "
        "'hardware_service', 'security', 'model_cache', 'download', 'manifest', 'aligned_io', 'metrics', "
        "'read_ahead', 'upload_form', 'prometheus_client', 'boto3', 'docker') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_status_and_health(client):
    assert client.get("/health").json() == {"status": "healthy"}
    s = client.get("/status").json()
    assert s["authenticated"] is False and s["unlock"]["state"] == "idle" and s["modelCacheDir"]


def test_upload_requires_multipart(client):
    r = client.post("/upload/m.bin", content=b"raw", headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400


def test_a_malformed_multipart_body_is_400(loader_env):
    main.use_services(lambda s: fake_services(store=UploaderStore()))
    with TestClient(main.app, base_url=LOCAL, raise_server_exceptions=False) as client:
        r = client.post(
            "/upload/m.bin",
            content=b"not a multipart body",
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
    assert r.status_code == 400 and r.json() == {"detail": "the upload is not valid multipart/form-data"}


def test_two_first_requests_at_once_build_one_services(loader_env):
    built, got = [], []

    def slow_build(s):
        built.append(s)
        # The first build goes on only once the other caller is inside services() too, waiting for it.
        until(lambda: all(inside_services(t) for t in threads if t is not threading.current_thread()))
        return fake_services()

    def inside_services(thread):
        frame = sys._current_frames().get(thread.ident)
        return frame is not None and frame.f_code is main.services.__code__

    main.use_services(slow_build)
    threads = [threading.Thread(target=lambda: got.append(main.services())) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(built) == 1 and got[0] is got[1]


# --- field transfers: /prefetch and /downloads (contract section 8) ------------------------------------


def test_a_prefetch_answers_202_with_its_download_status_or_200_when_already_cached(prefetching):
    client, store, _ = prefetching
    r = client.post("/prefetch/big.bin", json={"folder": "models"})
    assert r.status_code == 202 and r.json() == STARTED
    r = client.post("/prefetch/warm.bin", json={"folder": "models"})
    assert r.status_code == 200 and r.json() == CACHED
    # The store's call blocks (Resource API calls): it runs on a worker thread, never on the event loop.
    assert store.calls == [("models", "big.bin", False), ("models", "warm.bin", False)]
    responses = main.app.openapi()["paths"]["/prefetch/{filename}"]["post"]["responses"]
    assert {"200", "202", "400", "401", "404", "502", "504", "507"} <= set(responses)


@pytest.mark.parametrize(
    "name,status",
    [("..bad", 400), ("anonymous.bin", 401), ("missing.bin", 404), ("huge.bin", 507), ("crawling.bin", 504)],
)
def test_a_prefetch_that_fails_is_its_errors_status_with_a_json_detail(prefetching, name, status):
    client, _, _ = prefetching
    r = client.post(f"/prefetch/{name}", json={"folder": "models"})
    assert r.status_code == status and r.json() == {"detail": PREFETCH_ANSWERS[name].detail}


def test_a_prefetch_without_a_folder_is_422_and_never_reaches_the_store(prefetching):
    client, store, _ = prefetching
    r = client.post("/prefetch/big.bin", json={})
    assert r.status_code == 422 and r.json()["detail"].startswith("invalid request: body.folder")
    assert store.calls == []


def test_a_prefetch_runs_on_the_load_pool_and_shows_in_status_while_it_runs(prefetching):
    client, store, _ = prefetching
    store.answers["held.bin"] = (202, download_status("held.bin", "fetching"))
    answers = []
    thread = threading.Thread(
        target=lambda: answers.append(client.post("/prefetch/held.bin", json={"folder": "models"}))
    )
    thread.start()
    try:
        until(lambda: client.get("/status").json()["operations"], what="the prefetch never showed in /status")
        [op] = client.get("/status").json()["operations"]
        assert (op["kind"], op["what"]) == ("load", "models/held.bin")
    finally:
        store.go.set()
        thread.join(30)
    assert answers[0].status_code == 202
    assert client.get("/status").json()["operations"] == []


def test_downloads_lists_every_download_and_the_cache_budget(prefetching):
    client, _, cache = prefetching
    r = client.get("/downloads")
    assert r.status_code == 200
    assert r.json() == {"downloads": BudgetCache.TRANSFERS, "cache": BudgetCache.USAGE}
    assert cache.on_loop == [False, False]  # usage() reads the disk: never on the event loop


@pytest.mark.parametrize(
    "name", ["CDN_MAX_BYTES_PER_S", "MODEL_CACHE_MAX_BYTES", "MODEL_CACHE_MIN_FREE_BYTES"]
)
def test_the_transfer_settings_refuse_a_negative_value(monkeypatch, name):
    from pydantic import ValidationError

    monkeypatch.setenv(name, "-1")
    with pytest.raises(ValidationError, match=name.lower()):
        main.Settings()
    monkeypatch.setenv(name, "5000000000")
    assert main.Settings().model_dump()[name.lower()] == 5_000_000_000


def test_the_transfer_settings_defaults(monkeypatch):
    for name in ("CDN_MAX_BYTES_PER_S", "MODEL_CACHE_MAX_BYTES", "MODEL_CACHE_MIN_FREE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    s = main.Settings()
    assert (s.cdn_max_bytes_per_s, s.model_cache_max_bytes, s.model_cache_min_free_bytes) == (0, 0, 2**30)


def test_a_negative_setting_stops_the_start_up_with_a_clear_message():
    env = {**os.environ, "MODEL_CACHE_MIN_FREE_BYTES": "-5", "LOADER_PORT": "0"}
    out = subprocess.run(
        [sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode != 0
    assert "invalid configuration" in out.stderr and "model_cache_min_free_bytes" in out.stderr
    assert "Traceback" not in out.stderr


class StuckStore:
    """A store whose loads block until ``go`` is set."""

    def __init__(self):
        self.go = threading.Event()

    def load(self, folder, name):
        self.go.wait(30)
        raise errors.NotFound(f"no such resource: {folder}/{name}")


def test_health_is_503_with_a_reason_once_every_load_worker_is_held_past_its_deadline(loader_env):
    import workers

    store = StuckStore()
    pools = workers.Pools(workers.Pool("load", 2, 2.0, per_key=2), workers.Pool("login", 1, 5))
    main.use_services(
        lambda s: fake_services(store=store, workers=pools, api=NoSession(), unlock_status=FakeUnlockStatus())
    )
    with served(main.create_app()) as address:
        loads = []
        for _ in range(3):
            conn = http.client.HTTPConnection(*address, timeout=30)
            conn.request("POST", "/load/m.bin", body=b'{"folder": "models"}', headers=JSON)
            loads.append(conn)
        until(lambda: len(status_of_served(address)["operations"]) == 3)
        assert health_of(address) == (200, {"status": "healthy"})  # held, but not yet past the deadline
        until(lambda: health_of(address)[0] == 503, what="/health never said it cannot serve")
        code, body = health_of(address)
        assert body["status"] == "unhealthy" and "all 2 load workers" in body["reason"]
        ops = status_of_served(address)["operations"]
        assert [o["kind"] for o in ops] == ["load"] * 3 and ops[0]["ageSeconds"] >= 2.0
        store.go.set()
        for conn in loads:
            assert conn.getresponse().status == 404
            conn.close()
        assert health_of(address) == (200, {"status": "healthy"})


JSON = {"Content-Type": "application/json"}


def health_of(address):
    conn = http.client.HTTPConnection(*address, timeout=10)
    conn.request("GET", "/health")
    answer = conn.getresponse()
    result = answer.status, json.loads(answer.read())
    conn.close()
    return result
