"""The HTTP edge: error mapping in one table, lazy imports, no credential ever echoed."""

import asyncio
import contextlib
import http.client
import inspect
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

import errors
import main
from credentials import Credentials
from devstack.wait import until
from tests.fakes import DROP, ApiServer, make_token

LOCAL = "http://localhost"  # the loader answers its loopback names only (contract section 10)

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
def client(loader_env):
    with TestClient(main.app, base_url=LOCAL, raise_server_exceptions=False) as c:
        yield c


class IdleCache:
    """A cache with no download in flight; records the timeout of each ``settle``."""

    def __init__(self):
        self.settled = []

    def settle(self, timeout=None):
        self.settled.append(timeout)
        return True


class UploaderStore:
    """A store as a logged-in uploader finds it: every upload is allowed; none may get as far as staging."""

    def check_upload(self, name, folder=None):
        pass

    def begin_upload(self, name, folder):
        raise AssertionError("a malformed body was staged")


class SigningIn:
    """A Resource API session whose every login succeeds."""

    def login(self, creds):
        assert isinstance(creds, Credentials)
        return "the user"


class Preparing:
    """A store that notes each call of what a login starts in the background, with its thread, and sets
    ``resumed`` once the interrupted prefetches were resumed."""

    def __init__(self):
        self.calls = []
        self.resumed = threading.Event()

    def prepare(self):
        self.calls.append(("prepare", threading.current_thread()))

    def resume_prefetches(self):
        self.calls.append(("resume_prefetches", threading.current_thread()))
        self.resumed.set()


def fake_services(**parts):
    """Services of fakes: ``parts``, an idle cache, and None for each other part."""
    none = dict.fromkeys(("api", "store", "unlock_status", "unlocker"))
    return main.Services(**{**none, "cache": IdleCache(), **parts})


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
    failing = fake_services()
    failing.authenticate = Failing().authenticate
    monkeypatch.setitem(main.app.dependency_overrides, main.built_services, lambda: failing)
    r = client.post("/login", json={"email": "a@b", "password": "hunter2"})
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}


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


def test_a_client_that_goes_away_mid_upload_is_one_line_not_a_traceback(loader_env, caplog):
    """The soak met it: an upload whose client gave up while the loader waited for the Resource API was a
    500 with an ERROR and a traceback once its body was read."""
    main.use_services(lambda s: fake_services(store=UploaderStore()))
    part = b'--xyz\r\nContent-Disposition: form-data; name="folder"\r\n\r\nmodels\r\n'
    messages = [{"type": "http.request", "body": part, "more_body": True}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload/m.bin",
        "raw_path": b"/upload/m.bin",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "http_version": "1.1",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 40000),
        "headers": [(b"host", b"localhost"), (b"content-type", b"multipart/form-data; boundary=xyz")],
    }
    with caplog.at_level(logging.INFO):
        asyncio.run(main.app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert json.loads(sent[1]["body"]) == {"detail": "the client went away before its request was read"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("went away" in r.getMessage() for r in caplog.records)


def test_a_stop_lets_the_downloads_in_flight_commit(loader_env):
    # A load ends with its last byte, before its big part is hashed and committed: a stop waits for that.
    cache = IdleCache()
    main.use_services(lambda s: fake_services(cache=cache))
    with TestClient(main.app, base_url=LOCAL):
        assert main.services().cache is cache
        assert not cache.settled
    assert cache.settled == [main.SETTLE_SECONDS]


def test_a_login_prepares_the_cdn_clients_then_resumes_the_prefetches_in_the_background():
    # The first load then finds cdn.yaml fetched and the CDN clients built; then the prefetches a restart
    # interrupted go on, with the clients ready.
    store = Preparing()
    svc = fake_services(api=SigningIn(), store=store)
    assert svc.authenticate("u@example.com", "pw") == "the user"
    assert store.resumed.wait(5)
    assert [name for name, _ in store.calls] == ["prepare", "resume_prefetches"]
    threads = {thread for _, thread in store.calls}
    assert len(threads) == 1 and threading.current_thread() not in threads


class RefusingSignIn:
    """A Resource API session whose every login is refused."""

    def login(self, creds):
        raise errors.AuthError("invalid email or password")


def test_a_failed_login_resumes_no_prefetch():
    store = Preparing()
    svc = fake_services(api=RefusingSignIn(), store=store)
    with pytest.raises(errors.AuthError):
        svc.authenticate("u@example.com", "wrong")
    svc.api = SigningIn()
    svc.authenticate("u@example.com", "pw")
    assert store.resumed.wait(5)
    # One prepare and one resume, those of the login that succeeded (started after the failed one).
    assert [name for name, _ in store.calls] == ["prepare", "resume_prefetches"]


def test_a_newline_in_a_request_path_cannot_forge_a_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="loader")
    client.get("/health%0aINFO%20loader%20forged")
    lines = [line for record in caplog.records for line in record.getMessage().splitlines()]
    assert not [line for line in lines if line.startswith("INFO loader forged")]
    assert any("/health\\nINFO loader forged" in line for line in lines)


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


@pytest.fixture
def library_log_levels():
    """The library loggers' levels, put back after a test that runs main.configure_logging."""
    names = ("botocore", "boto3", "s3transfer", "urllib3", "urllib3.connectionpool", "docker")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_a_resource_api_retry_is_told_once_in_the_loaders_words(caplog, library_log_levels):
    import api_client

    def warnings_of_a_retried_login():
        answers = iter([DROP, (200, {"token": make_token({"nameid": "u1", "role": "Operator"})})])
        server = ApiServer(lambda m, p, b, h: next(answers))
        try:
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                api_client.ResourceApi(server.url, lambda: "hw", backoff=0).login(Credentials("a@b", "pw"))
        finally:
            server.close()
        return [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]

    assert "urllib3.connectionpool" in {name for name, _ in warnings_of_a_retried_login()}  # it tells it too
    main.configure_logging("INFO")
    assert warnings_of_a_retried_login() == [("loader.api", "POST /login attempt 1: ProtocolError: retrying")]


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
    trust = svc.store.trust
    trust.unsigned_loads, trust.signed_loads, trust.refusals = 11, 12, 13
    svc.cache.bytes_resumed = 10
    families = scrape()
    counters = {
        "loader_bytes_loaded": 5_000_000_123,
        "loader_bytes_uploaded": 7,
        "loader_cache_hits": 3,
        "loader_cache_misses": 4,
        "loader_cdn_downloads": 5,
        "loader_cache_refetches": 6,
        "loader_format1_loads": 8,
        "loader_unsigned_manifest_loads": 11,
        "loader_signed_manifest_loads": 12,
        "loader_signature_refusals": 13,
        "loader_cache_evictions": 0,  # a fresh cache has evicted nothing
        "loader_cdn_bytes_resumed": 10,
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
    ops = {s.labels["kind"]: s.value for s in families["loader_operations_in_progress"].samples}
    assert ops == {"load": 0, "login": 0, "stream": 0}
    stream = svc.workers.begin("stream", "models/m.bin")
    ops = {s.labels["kind"]: s.value for s in scrape()["loader_operations_in_progress"].samples}
    assert ops["stream"] == 1
    svc.workers.end(stream)
    import heap

    free = families["loader_buffer_memory_free_bytes"]
    assert free.type == "gauge" and free.samples[0].value == heap.buffers.left
    assert "loader_load_memory_free_bytes" not in families
    for gauge in ("loader_cache_bytes_used", "loader_cache_bytes_max", "loader_downloads_in_progress"):
        assert families[gauge].type == "gauge"
    assert [s.value for s in families["loader_downloads_in_progress"].samples] == [0]


# --- field transfers: /prefetch, /downloads and their metrics (contract section 8) --------------------

GIB = 1024**3


def download_status(name, state, done=0, total=5 * GIB, resumed=0, error=None):
    return {
        "folder": "models",
        "name": name,
        "state": state,
        "bytesDone": done,
        "bytesTotal": total,
        "bytesResumed": resumed,
        "error": error,
    }


def on_event_loop():
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class BudgetCache(IdleCache):
    """A cache with a download in each state and half its budget used; notes whether each call of
    ``usage`` or ``transfers`` ran on the event loop."""

    hits = misses = downloads = handed = refetches = 0
    evictions, bytes_resumed = 2, 3 * 2**20
    USAGE = {"bytesUsed": 5 * GIB, "bytesMax": 10 * GIB, "bytesFree": 4 * GIB}
    TRANSFERS = [
        download_status("a.bin", "fetching", done=GIB, resumed=GIB // 2),
        download_status("b.bin", "verifying", done=5 * GIB),
        download_status("c.bin", "cached", done=5 * GIB),
        download_status("d.bin", "failed", error="the CDN answered 503"),
    ]

    def __init__(self):
        super().__init__()
        self.on_loop = []

    def usage(self):
        self.on_loop.append(on_event_loop())
        return dict(self.USAGE)

    def transfers(self):
        self.on_loop.append(on_event_loop())
        return [dict(t) for t in self.TRANSFERS]


class PrefetchStore:
    """A store whose prefetch of a name answers ``answers[name]``: (status, download status), or an error
    it raises; a name in ``held`` waits for ``go`` first. ``calls`` notes each (folder, name) and whether it
    ran on the event loop."""

    format1_loads = 0
    trust = SimpleNamespace(unsigned_loads=0, signed_loads=0, refusals=0)

    def __init__(self, answers, held=()):
        self.answers = answers
        self.held = held
        self.go = threading.Event()
        self.calls = []

    def prefetch(self, folder, name):
        self.calls.append((folder, name, on_event_loop()))
        if name in self.held:
            self.go.wait(30)
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer


STARTED = download_status("big.bin", "fetching", done=0)
CACHED = download_status("warm.bin", "cached", done=5 * GIB)
NO_ROOM = "no room in the cache for models/huge.bin: 5368709120 bytes needed, 1073741824 bytes available"
PREFETCH_ANSWERS = {
    "big.bin": (202, STARTED),
    "warm.bin": (200, CACHED),
    "..bad": errors.BadRequest("invalid name: ..bad"),
    "anonymous.bin": errors.NotLoggedIn(),
    "missing.bin": errors.NotFound("no such resource: models/missing.bin"),
    "huge.bin": errors.StorageError(NO_ROOM),
    "crawling.bin": errors.UpstreamTimeout("the CDN made less than 16384 bytes/s for 30 s"),
}


@pytest.fixture
def prefetching(loader_env):
    """A client of an app whose store prefetches from PREFETCH_ANSWERS, its cache a BudgetCache."""
    store, cache = PrefetchStore(PREFETCH_ANSWERS, held={"held.bin"}), BudgetCache()
    main.use_services(
        lambda s: fake_services(store=store, cache=cache, api=NoSession(), unlock_status=FakeUnlockStatus())
    )
    with TestClient(main.app, base_url=LOCAL, raise_server_exceptions=False) as c:
        yield c, store, cache


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


def test_metrics_show_the_cache_budget_evictions_resumed_bytes_and_downloads_in_progress(prefetching):
    from prometheus_client.parser import text_string_to_metric_families

    client, _, cache = prefetching
    r = client.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}

    def value(name, kind):
        assert families[name].type == kind, name
        [sample] = families[name].samples
        return sample.value

    assert value("loader_cache_bytes_used", "gauge") == 5 * GIB
    assert value("loader_cache_bytes_max", "gauge") == 10 * GIB
    assert value("loader_downloads_in_progress", "gauge") == 2  # fetching and verifying; not cached, failed
    assert value("loader_cache_evictions", "counter") == 2
    assert value("loader_cdn_bytes_resumed", "counter") == 3 * 2**20
    assert cache.on_loop and not any(cache.on_loop)  # the scrape reads the disk off the event loop


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


class CutOffStore:
    """A store whose every load announces 3 MiB, sends one MiB and then fails its check."""

    def load(self, folder, name):
        import binary_split

        def chunks():
            yield b"x" * 2**20
            raise errors.IntegrityError("block 1 of models/m.bin does not match its manifest")

        return binary_split.Plaintext(3 * 2**20, chunks())


def test_a_load_cut_off_after_its_answer_began_is_one_warning_and_no_server_error(loader_env, caplog):
    """The soak's logs showed uvicorn's ERROR beside the loader's warning for each cut-off load: the ASGI
    app ended without finishing the body, which is how the loader cuts it off on purpose."""
    import socket

    import uvicorn

    main.use_services(lambda s: fake_services(store=CutOffStore()))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(main.create_app(), log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    caplog.set_level(logging.INFO)
    thread.start()
    until(lambda: server.started)
    try:
        conn = http.client.HTTPConnection(*sock.getsockname(), timeout=30)
        conn.request(
            "POST", "/load/m.bin", body=b'{"folder": "models"}', headers={"Content-Type": "application/json"}
        )
        answer = conn.getresponse()
        assert answer.status == 200 and answer.getheader("Content-Length") == str(3 * 2**20)
        with pytest.raises(http.client.IncompleteRead):  # the server closes it after logging
            answer.read()
        conn.close()
    finally:
        server.should_exit = True
        thread.join(30)
    cut = [r for r in caplog.records if "cut off after its answer began" in r.getMessage()]
    assert [(r.name, r.levelname) for r in cut] == [("loader", "WARNING")]
    assert "block 1 of models/m.bin does not match its manifest" in cut[0].getMessage()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@contextlib.contextmanager
def served(app):
    """``app`` under a real uvicorn server on a free loopback port (flow control, transports): its address."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    until(lambda: server.started)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(30)


class EndlessStore:
    """A store whose every load is 1 GiB of 4 MiB chunks; ``closed`` is set once a load's chunks are closed
    (the loader let its buffers go)."""

    def __init__(self):
        self.closed = threading.Event()

    def load(self, folder, name):
        import binary_split

        def chunks():
            try:
                while True:
                    yield b"x" * 4 * 2**20
            finally:
                self.closed.set()

        return binary_split.Plaintext(2**30, chunks())


def test_a_client_that_reads_nothing_is_cut_off_after_the_stall_time_and_its_buffers_freed(
    loader_env, monkeypatch, caplog
):
    import socket

    monkeypatch.setenv("CLIENT_STALL_TIMEOUT", "1")
    main.settings.cache_clear()
    store = EndlessStore()
    main.use_services(lambda s: fake_services(store=store, api=NoSession(), unlock_status=FakeUnlockStatus()))
    caplog.set_level(logging.INFO)
    with served(main.create_app()) as address:
        stalled = socket.create_connection(address)
        body = b'{"folder": "models"}'
        stalled.sendall(
            b"POST /load/m.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # The client reads nothing: within the stall time (and a margin) its load is let go.
        assert store.closed.wait(15), "the stalled load's chunks were never closed"
        until(lambda: not [o for o in status_of_served(address)["operations"] if o["kind"] == "stream"])
        stalled.settimeout(10)
        received = 0
        try:
            while chunk := stalled.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass  # aborted: what was queued for it is gone too
        assert received < 2**30  # a broken transfer, never a whole answer
        stalled.close()
    cut = [r.getMessage() for r in caplog.records if "cut off after its answer began" in r.getMessage()]
    assert len(cut) == 1 and "the client read nothing for 1 s" in cut[0]


def status_of_served(address):
    conn = http.client.HTTPConnection(*address, timeout=10)
    conn.request("GET", "/status")
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return answer


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


class NoSession:
    authenticated = False


class FakeUnlockStatus:
    duration = None

    def snapshot(self):
        return {"state": "idle", "error": None, "bytesDone": 0, "bytesTotal": 0, "images": []}


def health_of(address):
    conn = http.client.HTTPConnection(*address, timeout=10)
    conn.request("GET", "/health")
    answer = conn.getresponse()
    result = answer.status, json.loads(answer.read())
    conn.close()
    return result
