"""Liveness under hostile peers: what the loader answers each one, how soon, and how soon it works again.

    .venv/bin/python bench/liveness.py

Starts SeaweedFS and the reference Resource API (devstack) with a fault proxy in front of SeaweedFS, a fake
Docker Engine (it takes any archive) and the loader as `python main.py` with short liveness settings (printed
first), then throws each fault of docs/contract.md "Liveness" at it once, in turn:

     1  the Resource API trickles its /login answer a byte a second
     2  the Resource API trickles a folder's resources (manifest, small part) a byte a second: a /load
     3  40 loads stuck on a Resource API that delays one folder for a minute: /health, /login, /status,
        /metrics and another model's load meanwhile, and how the stuck loads end
     4  an unlock whose key fragment does not come, then a new POST /unlock
     5  the CDN trickles a model's big part at 1 KiB/s
     6  20 clients that stop reading a cached 96 MiB model, with LOAD_MEMORY_BYTES at its default (128 MiB)
        and at 64 MiB, each on a loader of its own: its RSS before, at the peak and after, and the time
        until all were let go
     7  a 300 MB /login answer: the loader's RSS growth
     8  a /login answer of JSON nested 100,000 deep, a JWT whose exp is 1e999, one whose exp is NaN
     9  a manifest whose size is 2**64 or 2**63-1, a cdn.yaml whose host is file:///etc/passwd, 127.0.0.1:9000
        or http://[::1, a format-1 part whose HEAD announces Content-Length 10**20
    10  on the cache disk: a sidecar naming another blockSize, a FIFO at the .big, a bucket folder that is a
        symbolic link to a folder outside (the loader restarted on it)
    11  an upload form with two folder fields

One line per case: the status (an unlock's state), the seconds to that answer, the seconds from clearing the
fault to the first 200 of the same request (a cdn.yaml case's request is a login and a load, as the loader
reads cdn.yaml once a session; an unlock's: a new POST /unlock until `ready`; "-" where nothing is to
clear), /health during the fault (its statuses and slowest answer), and the start of the detail. A status
other than the one README.md and docs/contract.md give is marked "!" and counted in `unexpected`; timings
are printed, never judged. The last line is the RESULT line (on one line):

    RESULT cases=<n> unexpected=<n> login_trickle_s=<s> load_trickle_s=<s> stuck_routes_max_ms=<ms>
           stuck_end_s=<s> unlock_error_s=<s> cdn_trickle_s=<s> stall160_let_go_s=<s> stall160_peak_mb=<n>
           stall160_after_mb=<n> stall64_let_go_s=<s> stall64_peak_mb=<n> stall64_after_mb=<n>
           huge_login_rss_mb=<n> health_503=<n>

stall*_peak_mb and stall*_after_mb: the loader's RSS at the peak and 2 s after all were let go, above its
RSS before the stalled clients; huge_login_rss_mb: the growth of its VmHWM; health_503: /health probes
that answered 503 during any fault. A case the bench could not run prints why and leaves its figures na.
"""

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import MIB  # noqa: E402

from constants import CDN_RESUME_BACKOFF, CDN_RESUMES  # noqa: E402
from devstack import crypto  # noqa: E402
from devstack.cache_damage import link_folder_outside, snapshot  # noqa: E402
from devstack.processes.faultproxy import FaultProxy  # noqa: E402
from devstack.processes.loader import LoaderProcess, proc_field  # noqa: E402
from devstack.split import ensure_bucket  # noqa: E402
from devstack.stack import Stack  # noqa: E402
from devstack.wait import until  # noqa: E402

SETTINGS = {
    "API_TIMEOUT": 2,  # one try's connect and each read
    "API_DEADLINE": 5,  # a whole Resource API call, its tries included
    "CDN_SPEED_LIMIT": 64 * 1024,  # a CDN transfer slower than this (bytes/s) ...
    "CDN_SPEED_TIME": 2,  # ... for this long (s) is dropped and resumed, at last 504
    "CLIENT_STALL_TIMEOUT": 3,  # a /load client that reads nothing this long is cut off
}
OPERATOR, UPLOADER = "liveness@azaion.local", "liveness-up@azaion.local"
PASSWORD = "bench-Pa55"  # noqa: S105 - a throwaway account of the bench's own stack
IMAGE_TAG = "azaion/bench-liveness:1"
# A trickling CDN transfer is dropped within two windows; a load gives up after it and CDN_RESUMES resumes,
# each after its backoff (test_liveness_cdn.py's bound; a bound for the wait, not a verdict).
CDN_GIVE_UP = (CDN_RESUMES + 1) * 2 * SETTINGS["CDN_SPEED_TIME"] + CDN_RESUME_BACKOFF * 2**CDN_RESUMES + 10
RECOVER_WITHIN = 60  # seconds a request may take to work again after its fault is cleared
PROBE_EVERY = 0.25  # seconds between /health probes during a fault
STALLED_CLIENTS = 20
DETAIL = 100  # characters of a detail printed
CASE = 46  # characters of a case's name
FIGURES = (
    "login_trickle_s",
    "load_trickle_s",
    "stuck_routes_max_ms",
    "stuck_end_s",
    "unlock_error_s",
    "cdn_trickle_s",
    "stall160_let_go_s",
    "stall160_peak_mb",
    "stall160_after_mb",
    "stall64_let_go_s",
    "stall64_peak_mb",
    "stall64_after_mb",
    "huge_login_rss_mb",
)


# --- what is printed ---------------------------------------------------------------------------------------


class Table:
    """The lines of the cases, the figures of the RESULT line, and what did not answer as documented."""

    def __init__(self):
        self.cases = 0
        self.unexpected: list[str] = []
        self.health_503 = 0
        self.figures = dict.fromkeys(FIGURES, "na")  # a case that could not run leaves its figures na

    def header(self):
        print(
            f"{'case':<{CASE}} {'status':>7} {'answer_s':>8} {'recover_s':>9}  {'/health during':<26} detail"
        )

    def row(self, case, expected, answer, seconds, recover="-", health=None, *, sub=False):
        """``answer``: (status, detail). ``expected``: the status the docs give (None: no verdict)."""
        status, detail = answer
        mark = ""
        if not sub:
            self.cases += 1
        if expected is not None and status != expected:
            mark = "! "
            self.unexpected.append(f"{case}: {status} (documented: {expected}) {detail}")
        if health is not None:
            self.health_503 += health.count(503)
        name = ("    " + case) if sub else case
        print(
            f"{name:<{CASE}} {mark + str(status):>7} {_secs(seconds):>8} {_secs(recover):>9}  "
            f"{health.summary() if health else '-':<26} {_short(detail)}",
            flush=True,
        )

    def note(self, text):
        print(f"    {text}", flush=True)

    def failed(self, case, exc):
        self.cases += 1
        self.unexpected.append(f"{case}: the bench could not run it ({type(exc).__name__}: {exc})")
        print(
            f"{case:<{CASE}} !  the bench could not run it: {type(exc).__name__}: {_short(str(exc))}",
            flush=True,
        )
        traceback.print_exc(file=sys.stderr)

    def figure(self, key, value, fmt="{:.1f}"):
        self.figures[key] = "na" if value is None else fmt.format(value)


def _secs(value):
    return value if isinstance(value, str) else "never" if value is None else f"{value:.2f}"


def _short(text):
    text = " ".join(str(text).split())
    return text if len(text) <= DETAIL else text[: DETAIL - 1] + "…"


def answer_of(r, expected_body=None):
    """(status, detail) of a loader's answer, or of the exception a call raised."""
    if isinstance(r, BaseException):
        return type(r).__name__, str(r)
    if r.headers.get("content-type", "").startswith("text/plain"):
        return r.status_code, f"{len(r.content)} bytes of text"
    if r.status_code == 200 and expected_body is not None:
        same = hashlib.sha256(r.content).digest() == hashlib.sha256(expected_body).digest()
        return 200, "byte-identical" if same else f"{len(r.content)} bytes, NOT the model"
    try:
        body = r.json()
    except ValueError:
        return r.status_code, r.text[:DETAIL]
    if isinstance(body, dict) and "detail" in body:
        return r.status_code, str(body["detail"])
    text = json.dumps(body)
    return r.status_code, text if len(text) <= 60 else f"{len(r.content)} bytes of JSON"


class HealthWatch:
    """/health probed every PROBE_EVERY s on a thread of its own while the block runs (a fault lasts)."""

    def __init__(self, loader):
        self.url = loader.url + "/health"
        self.seen: list[tuple[object, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, name="health-watch", daemon=True)

    def _probe(self):
        while True:
            start = time.monotonic()
            try:
                status = requests.get(self.url, timeout=5).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            self.seen.append((status, time.monotonic() - start))
            if self._stop.wait(PROBE_EVERY):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def count(self, status):
        return sum(1 for s, _ in self.seen if s == status)

    def summary(self):
        if not self.seen:
            return "no probe"
        counts = Counter(str(s) for s, _ in self.seen)
        worst = max(t for _, t in self.seen)
        return " ".join(f"{s}x{n}" for s, n in sorted(counts.items())) + f" max {worst * 1000:.0f} ms"


# --- timing ----------------------------------------------------------------------------------------------


def timed(call):
    """(``call()``'s answer or the exception it raised, seconds)."""
    start = time.monotonic()
    try:
        answer = call()
    except (requests.RequestException, OSError) as exc:
        answer = exc
    return answer, time.monotonic() - start


def recovery(call, since, timeout=RECOVER_WITHIN):
    """Seconds from ``since`` to the first 200 of ``call()``, tried every 0.1 s; None if none within
    ``timeout``."""

    def works():
        try:
            return call().status_code == 200
        except (requests.RequestException, OSError):
            return False

    try:
        until(works, timeout, every=0.1)
    except TimeoutError:
        return None
    return time.monotonic() - since


def under_fault(loader, set_fault, clear, call, recover_call=None):
    """Set the fault, time ``call`` with /health probed meanwhile, clear the fault, then time until
    ``recover_call`` (default: ``call``) answers 200. (answer, seconds, recovery, health watch)"""
    set_fault()
    try:
        with HealthWatch(loader) as health:
            answer, seconds = timed(call)
    finally:
        cleared = time.monotonic()
        clear()
    return answer, seconds, recovery(recover_call or call, cleared), health


def rss_mb(pid):
    return proc_field(pid, "VmRSS") / 1024


# --- the peers -------------------------------------------------------------------------------------------


class FakeEngine:
    """A Docker Engine that answers its version and takes any archive POSTed to /images/load, naming
    IMAGE_TAG loaded: an unlock that gets its key runs to `ready` against it."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path.split("?")[0].endswith("/version"):
                    self._json(200, {"ApiVersion": "1.41", "Version": "20.10.0"})
                else:
                    self._json(404, {"message": "no such image"})

            def do_POST(self):  # noqa: N802
                self._drain()
                if self.path.split("?")[0].endswith("/images/load"):
                    self._json(200, {"stream": f"Loaded image: {IMAGE_TAG}\n"})
                else:
                    self._json(404, {"message": "not here"})

            def _drain(self):
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        self.rfile.read(size + 2)
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                else:
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.host = f"tcp://127.0.0.1:{self._httpd.server_port}"
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()


def stalled_load(loader, name, folder="models"):
    """A /load whose client sends its request and then reads nothing (a small receive buffer, so the
    loader soon finds its sends waiting): the open socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", loader.port))
    body = json.dumps({"folder": folder}).encode()
    sock.sendall(
        f"POST /load/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def drained(sock):
    """What a stalled client finds once it reads again: the bytes still there, then the end (or a reset)."""
    got = 0
    try:
        sock.settimeout(5)
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    except OSError:
        pass
    finally:
        sock.close()
    return got


# --- the bench's world ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, work, stack, proxy, engine, archive):
        self.work = work
        self.stack = stack
        self.proxy = proxy
        self.engine = engine
        self.env = {
            **SETTINGS,
            "RESOURCE_API_URL": stack.api_url,
            "DOCKER_HOST": engine.host,
            "IMAGES_PATH": archive,
        }
        self.loader = LoaderProcess(work / "loader", **self.env)
        self.table = Table()
        self._models = 0

    def model(self, size, folder="models", format=2, prefix="liv"):
        """A fresh model of ``size`` random bytes published in ``folder``: (name, bytes)."""
        self._models += 1
        name = f"{prefix}-{self._models:02d}-{os.urandom(3).hex()}.bin"
        data = os.urandom(size)
        self.stack.publish(folder, name, data, format=format)
        return name, data

    def login(self, loader=None, email=OPERATOR):
        return (loader or self.loader).login(email, PASSWORD)

    def load(self, name, folder="models", loader=None, timeout=60):
        return (loader or self.loader).load(name, folder, timeout=timeout)

    def cache_dir(self, loader=None):
        return Path((loader or self.loader).env["MODEL_CACHE_DIR"])


# --- the cases -------------------------------------------------------------------------------------------


def api_trickles_login(b):
    answer, seconds, recover, health = under_fault(
        b.loader,
        lambda: b.stack.set_trickle("POST /login", 1, count=None),
        b.stack.clear_faults,
        lambda: b.login(),
    )
    b.table.row("1 API trickles /login (1 B/s)", 504, answer_of(answer), seconds, recover, health)
    b.table.figure("login_trickle_s", seconds, "{:.2f}")


def api_trickles_resource(b):
    name, data = b.model(100_000)
    b.login().raise_for_status()
    answer, seconds, recover, health = under_fault(
        b.loader,
        lambda: b.stack.set_trickle("POST /resources/get/models", 1, count=None),
        b.stack.clear_faults,
        lambda: b.load(name),
    )
    b.table.row(
        "2 API trickles a folder's resources: /load", 504, answer_of(answer), seconds, recover, health
    )
    b.table.figure("load_trickle_s", seconds, "{:.2f}")


def forty_loads_stuck(b):
    name, data = b.model(200_000, folder="slow-models", prefix="stuck")
    other, small = b.model(200_000)
    b.login().raise_for_status()
    b.load(other).raise_for_status()
    loads = [name] + [f"{name}-{i}" for i in range(1, 40)]
    ended: list = [None] * len(loads)
    routes = {}
    b.stack.set_fault("POST /resources/get/slow-models", delay=60, count=None)
    try:
        with HealthWatch(b.loader) as health:
            started = time.monotonic()

            def stuck(i):
                answer, _ = timed(lambda: b.load(loads[i], "slow-models"))
                ended[i] = (answer, time.monotonic() - started)

            threads = [threading.Thread(target=stuck, args=(i,), daemon=True) for i in range(len(loads))]
            for t in threads:
                t.start()
            until(
                lambda: len(b.loader.get("/status", timeout=5).json()["operations"]) >= len(loads),
                10,
                "the 40 loads did not show in /status",
                every=0.05,
            )
            in_progress = time.monotonic() - started
            routes["/health"] = timed(lambda: b.loader.get("/health", timeout=10))
            routes["/login"] = timed(lambda: b.login())
            routes["/status"] = timed(lambda: b.loader.get("/status", timeout=10))
            routes["/metrics"] = timed(lambda: b.loader.get("/metrics", timeout=10))
            routes["/load, another folder"] = timed(lambda: b.load(other))
            deadline = time.monotonic() + 90
            for t in threads:
                t.join(max(0.1, deadline - time.monotonic()))
    finally:
        cleared = time.monotonic()
        b.stack.clear_faults()
    recover = recovery(lambda: b.load(name, "slow-models"), cleared)
    done = [e for e in ended if e is not None]
    statuses = Counter(str(answer_of(a)[0]) for a, _ in done)
    how = " ".join(f"{s}x{n}" for s, n in sorted(statuses.items()))
    if len(done) < len(loads):
        how += f" still running: {len(loads) - len(done)}"
    last = max((t for _, t in done), default=None)
    first = min((t for _, t in done), default=None)
    detail = answer_of(done[0][0])[1] if done else "none ended"
    b.table.row(
        "3 40 loads stuck on an API delay (one folder)",
        f"504x{len(loads)}",
        (how, detail),
        last,
        recover,
        health,
    )
    b.table.note(
        f"the 40 were in /status {in_progress:.2f} s after they began; they ended {_secs(first)} to "
        f"{_secs(last)} s after"
    )
    worst = 0.0
    for route, (answer, seconds) in routes.items():
        expected = small if route.startswith("/load") else None
        b.table.row(f"{route} while stuck", 200, answer_of(answer, expected), seconds, sub=True)
        worst = max(worst, seconds)
    b.table.figure("stuck_routes_max_ms", worst * 1000, "{:.0f}")
    b.table.figure("stuck_end_s", last, "{:.2f}")


def unlock_key_does_not_come(b):
    creds = {"email": UPLOADER, "password": PASSWORD}
    b.stack.set_fault("GET /binary-split/key-fragment", delay=60, count=None)
    try:
        with HealthWatch(b.loader) as health:
            start = time.monotonic()
            posted = b.loader.post("/unlock", json=creds, timeout=10)
            status = b.loader.wait_unlock(60)
            seconds = time.monotonic() - start
    finally:
        cleared = time.monotonic()
        b.stack.clear_faults()
    again = b.loader.post("/unlock", json=creds, timeout=10)
    state = again.json().get("state") if again.status_code == 202 else None
    final = b.loader.wait_unlock(60)
    ready = time.monotonic() - cleared if final["state"] == "ready" else None
    b.table.row(
        "4 unlock: the key fragment does not come",
        "error",
        (status["state"], f"POST /unlock {posted.status_code}; {status.get('error')}"),
        seconds,
        ready,
        health,
    )
    b.table.figure("unlock_error_s", seconds, "{:.2f}")
    b.table.row(
        "a new POST /unlock after the heal",
        202,
        (
            again.status_code,
            f"state {state}, then {final['state']} {final.get('error') or final.get('images')}",
        ),
        time.monotonic() - cleared,
        sub=True,
    )


def cdn_trickles(b):
    b.login().raise_for_status()
    name, data = b.model(6 * MIB + 7)
    big = f"/models/{name}.big"
    answer, seconds, recover, health = under_fault(
        b.loader,
        lambda: b.proxy.trickle_next(1024, n=None, method="GET", path=big),
        b.proxy.clear_faults,
        lambda: b.load(name, timeout=CDN_GIVE_UP + 30),
    )
    b.table.row("5 CDN trickles a big part (1 KiB/s)", 504, answer_of(answer), seconds, recover, health)
    b.table.figure("cdn_trickle_s", seconds, "{:.2f}")


def stalled_clients(b, name, digest, size, budget):
    """20 clients that stop reading ``name`` (cached) on a loader of its own with LOAD_MEMORY_BYTES
    ``budget`` (None: the default)."""
    label = f"{budget // MIB}" if budget else "160"
    env = dict(b.env, **({"LOAD_MEMORY_BYTES": budget} if budget else {}))
    with LoaderProcess(b.work / f"loader-stall-{label}", **env) as loader:
        b.login(loader).raise_for_status()
        with requests.post(
            f"{loader.url}/load/{name}", json={"folder": "models"}, stream=True, timeout=120
        ) as r:
            h = hashlib.sha256()
            for chunk in r.iter_content(MIB):
                h.update(chunk)
        warm = "byte-identical" if r.status_code == 200 and h.hexdigest() == digest else f"{r.status_code}"
        loader.cached_big_part("models", name, timeout=120)
        time.sleep(1.5)  # the loader gives the freed heap back half a second after its last request
        before = rss_mb(loader.pid)
        socks = []
        try:
            with HealthWatch(loader) as health:
                start = time.monotonic()
                for _ in range(STALLED_CLIENTS):
                    socks.append(stalled_load(loader, name))
                peak = before
                let_go = None
                deadline = start + STALLED_CLIENTS * SETTINGS["CLIENT_STALL_TIMEOUT"] + 60
                while time.monotonic() < deadline:
                    peak = max(peak, rss_mb(loader.pid))
                    ops = loader.get("/status", timeout=10).json()["operations"]
                    if not any(o["what"] == f"models/{name}" for o in ops):
                        let_go = time.monotonic() - start
                        break
                    time.sleep(0.1)
        finally:
            got = [drained(s) for s in socks]
        time.sleep(2)  # idle: the loader trims its heap
        after = rss_mb(loader.pid)
        cut = loader.log().count(f"the client read nothing for {SETTINGS['CLIENT_STALL_TIMEOUT']} s")
        whole = sum(1 for n in got if n >= size)
        b.table.row(
            f"6 20 stalled clients, budget {label} MiB",
            None,
            (
                "-",
                f"cut off {cut} of 20; whole answers {whole}; read before the stall {min(got) / MIB:.1f}-"
                f"{max(got) / MIB:.1f} MiB; first load {warm}",
            ),
            let_go,
            "-",
            health,
        )
        b.table.note(
            f"loader RSS before {before:.0f} MB, peak {peak:.0f} MB (+{peak - before:.0f}), 2 s after "
            f"{after:.0f} MB (+{after - before:.0f}); all let go {_secs(let_go)} s after they began"
        )
        b.table.figure(f"stall{label}_let_go_s", let_go)
        b.table.figure(f"stall{label}_peak_mb", peak - before, "{:.0f}")
        b.table.figure(f"stall{label}_after_mb", after - before, "{:.0f}")


def stalled_clients_both_budgets(b):
    name = f"stall-{os.urandom(3).hex()}.bin"
    model = b.work / "stall-model.bin"
    h = hashlib.sha256()
    with open(model, "wb") as f:
        for _ in range(96):
            chunk = os.urandom(MIB)
            h.update(chunk)
            f.write(chunk)
    b.stack.publish("models", name, model)
    model.unlink()
    for budget in (None, 64 * MIB):
        stalled_clients(b, name, h.hexdigest(), 96 * MIB, budget)
    b.table.note("(before the budget a stalled client held about 40 MB: not measurable here, the fix is in)")


def huge_login(b):
    b.loader.get("/status", timeout=10)
    hwm, rss = proc_field(b.loader.pid, "VmHWM"), rss_mb(b.loader.pid)
    answer, seconds, recover, health = under_fault(
        b.loader,
        lambda: b.stack.set_fault("POST /login", garbage="huge", count=1),
        b.stack.clear_faults,
        lambda: b.login(),
    )
    growth = (proc_field(b.loader.pid, "VmHWM") - hwm) / 1024
    b.table.row("7 a 300 MB /login answer", 502, answer_of(answer), seconds, recover, health)
    b.table.note(f"loader VmHWM grew by {growth:.1f} MB, VmRSS {rss:.0f} -> {rss_mb(b.loader.pid):.0f} MB")
    b.table.figure("huge_login_rss_mb", growth)


def garbage_logins(b):
    for garbage, case in (
        ("deep_json", "8 /login: JSON nested 100,000 deep"),
        ("jwt_exp_inf", "8 /login: a JWT whose exp is 1e999"),
        ("jwt_exp_nan", "8 /login: a JWT whose exp is NaN"),
    ):
        answer, seconds, recover, health = under_fault(
            b.loader,
            lambda garbage=garbage: b.stack.set_fault("POST /login", garbage=garbage, count=1),
            b.stack.clear_faults,
            lambda: b.login(),
        )
        b.table.row(case, 502, answer_of(answer), seconds, recover, health)


def hostile_values(b):
    b.login().raise_for_status()
    name, data = b.model(MIB)
    manifest = b.stack.manifest("models", name)
    for size, label in ((2**64, "2**64"), (2**63 - 1, "2**63-1")):
        answer, seconds, recover, health = under_fault(
            b.loader,
            lambda size=size: b.stack.put_manifest("models", name, {**manifest, "size": size}),
            lambda: b.stack.put_manifest("models", name, manifest),
            lambda: b.load(name),
        )
        b.table.row(f"9 a manifest of size {label}", 502, answer_of(answer), seconds, recover, health)

    def login_and_load(model):
        b.login()
        return b.load(model)

    try:
        for host in ("file:///etc/passwd", "127.0.0.1:9000", "http://[::1"):
            model, _ = b.model(MIB)
            answer, seconds, recover, health = under_fault(
                b.loader,
                lambda host=host: b.stack.write_cdn_yaml(host=host),
                lambda: b.stack.write_cdn_yaml(host=b.proxy.url),
                lambda model=model: login_and_load(model),
            )
            b.table.row(f"9 cdn.yaml host {host}", 502, answer_of(answer), seconds, recover, health)
    finally:
        b.stack.write_cdn_yaml(host=b.proxy.url)
        b.login()

    name, data = b.model(MIB, format=1)
    answer, seconds, recover, health = under_fault(
        b.loader,
        lambda: b.proxy.header_next("Content-Length", str(10**20), method="HEAD", path=f"/models/{name}.big"),
        b.proxy.clear_faults,
        lambda: b.load(name),
    )
    b.table.row("9 format-1 HEAD Content-Length 10**20", 502, answer_of(answer), seconds, recover, health)


def damaged_cache(b):
    b.login().raise_for_status()
    # A format-1 part whose sidecar names blocks of 8 MiB (and their digests).
    name, data = b.model(10 * MIB, format=1)
    b.load(name).raise_for_status()
    meta = Path(str(b.loader.cached_big_part("models", name, timeout=60)) + ".meta")
    big = (b.cache_dir() / "models" / (name + ".big")).read_bytes()
    fields = json.loads(meta.read_text())
    block = 2 * fields["blockSize"]
    fields.update(
        blockSize=block,
        blocks=[hashlib.sha256(big[i : i + block]).hexdigest() for i in range(0, len(big), block)],
    )
    meta.write_text(json.dumps(fields))
    with HealthWatch(b.loader) as health:
        answer, seconds = timed(lambda: b.load(name))
    b.table.row("10 sidecar naming another blockSize", 200, answer_of(answer, data), seconds, "-", health)

    # A FIFO where the cached .big goes.
    name, data = b.model(6 * MIB)
    b.load(name).raise_for_status()
    part = b.loader.cached_big_part("models", name, timeout=60)
    part.unlink()
    os.mkfifo(part)
    try:
        with HealthWatch(b.loader) as health:
            answer, seconds = timed(lambda: b.load(name))
    finally:
        try:  # an open() that blocked on the FIFO goes on, so the loader can stop
            os.close(os.open(part, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    b.table.row("10 a FIFO at the cached .big", 200, answer_of(answer, data), seconds, "-", health)

    # The bucket's folder a link to a folder outside, holding a damaged copy, a stranger's file and a .part.
    name, data = b.model(6 * MIB)
    b.load(name).raise_for_status()
    b.loader.cached_big_part("models", name, timeout=60)
    b.loader.stop()
    folder = b.cache_dir() / "models"
    outside = b.work / "outside"
    before = link_folder_outside(folder, outside, name)
    b.loader.start()
    b.login().raise_for_status()
    with HealthWatch(b.loader) as health:
        answer, seconds = timed(lambda: b.load(name))
    status, detail = answer_of(answer, data)
    unchanged = "unchanged" if snapshot(outside) == before else "CHANGED"
    real = "a real folder" if folder.is_dir() and not folder.is_symlink() else "STILL A LINK"
    b.table.row(
        "10 bucket folder a symlink to outside",
        200,
        (status, f"{detail}; outside {unchanged}; the folder now {real}"),
        seconds,
        "-",
        health,
    )


def upload_two_folders(b):
    b.login(email=UPLOADER).raise_for_status()
    name = f"upload-{os.urandom(3).hex()}.bin"
    data = os.urandom(3 * MIB)
    form = [("folder", (None, "models")), ("folder", (None, "evil-bucket")), ("data", (name, data))]
    with HealthWatch(b.loader) as health:
        answer, seconds = timed(lambda: b.loader.post(f"/upload/{name}", files=form, timeout=60))
    published = [
        f
        for f in ("models", "modelsevil-bucket")
        if b.stack.admin.get_file(f, name + ".manifest") is not None
    ]
    status, detail = answer_of(answer)
    detail += f"; published: {', '.join(published) or 'nothing'}"
    b.table.row("11 upload form with two folder fields", 400, (status, detail), seconds, "-", health)
    form = [("folder", (None, "models")), ("data", (name, data))]
    answer, seconds = timed(lambda: b.loader.post(f"/upload/{name}", files=form, timeout=60))
    b.table.row("the same upload with one folder field", 200, answer_of(answer), seconds, sub=True)


CASES = (
    api_trickles_login,
    api_trickles_resource,
    forty_loads_stuck,
    unlock_key_does_not_come,
    cdn_trickles,
    stalled_clients_both_budgets,
    huge_login,
    garbage_logins,
    hostile_values,
    damaged_cache,
    upload_two_folders,
)


def run(b):
    for case in CASES:
        try:
            case(b)
        except Exception as exc:  # noqa: BLE001 - one case that cannot run must not hide the others
            b.table.failed(case.__name__, exc)
        finally:
            b.stack.clear_faults()
            b.proxy.clear_faults()
            if b.loader.proc is None or b.loader.proc.poll() is not None:
                b.loader.start()


def main():
    work = Path(tempfile.mkdtemp(prefix="bench-liveness-"))
    engine = FakeEngine()
    try:
        fragment = os.urandom(32)
        archive = work / "images.enc"
        archive.write_bytes(crypto.encrypt(crypto.archive_key(fragment), os.urandom(4096)))
        with Stack(work / "stack") as stack, FaultProxy(stack.s3_endpoint) as proxy:
            stack.write_cdn_yaml(host=proxy.url)
            ensure_bucket(stack.s3_admin_client(), "models")
            stack.add_user(OPERATOR, PASSWORD, ["Operator"])
            stack.add_user(UPLOADER, PASSWORD, ["ResourceUploader"])
            stack.set_key_fragment(fragment)
            b = Bench(work, stack, proxy, engine, archive)
            print("loader settings: " + " ".join(f"{k}={v}" for k, v in SETTINGS.items()), flush=True)
            b.loader.start()
            try:
                print(f"loader answered /health {b.loader.started_in:.2f} s after its start", flush=True)
                b.table.header()
                run(b)
                tracebacks = b.loader.log().count("Traceback")
            except BaseException:
                print(f"loader log (tail):\n{b.loader.log()[-3000:]}", file=sys.stderr)
                raise
            finally:
                b.loader.stop()
        t = b.table
        print(f"tracebacks in the loader's log: {tracebacks}")
        for line in t.unexpected:
            print(f"not as documented: {line}")
        figures = " ".join(f"{k}={v}" for k, v in t.figures.items())
        print(f"RESULT cases={t.cases} unexpected={len(t.unexpected)} {figures} health_503={t.health_503}")
    finally:
        engine.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
