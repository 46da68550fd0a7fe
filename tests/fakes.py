"""In-process fakes for unit tests: an HTTP server answering from a function on a loopback port (a Resource
API, an S3 endpoint, a Docker Engine), so a client's whole stack (requests, urllib3 and its Retry, botocore
and its retries) runs as it does against the real one; and fakes of the Services' parts, for apps of
main.py."""

import asyncio
import contextlib
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt

import errors
from devstack.wait import until

# What a route may answer instead of (status, body[, headers]):
DROP = "drop"  # the connection closes without an answer
STALL = "stall"  # no answer at all, until the server closes (the client's read timeout runs out)


def make_token(claims):
    return jwt.encode(claims, "test-secret-that-is-long-enough-32b", algorithm="HS256")


class ApiServer:
    """Answers each request from ``route(method, path, body, headers)``: ``(status, bytes | dict)``, or
    ``(status, body, {header: value})``, or DROP, or STALL. ``calls`` lists (method, path, Authorization);
    an exception a route raises is kept in ``errors`` (and the connection dropped)."""

    def __init__(self, route):
        self.route = route
        self.calls = []
        self.errors = []
        self._closing = threading.Event()
        server = self

        class Request(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's naming
                server._answer(self)

            do_POST = do_HEAD = do_PUT = do_GET

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Request)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True, name="fake-api").start()

    def _answer(self, request):
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        self.calls.append((request.command, request.path, request.headers.get("Authorization")))
        try:
            result = self.route(request.command, request.path, body, request.headers)
        except BaseException as exc:  # noqa: BLE001 - raised again by close(), in the test
            self.errors.append(exc)
            result = DROP
        if result == STALL:
            self._closing.wait(30)
        if result in (DROP, STALL):
            request.close_connection = True
            return
        status, payload, *headers = result
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        request.send_response(status)
        for name, value in (headers[0] if headers else {}).items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)

    def close(self):
        """Stop serving; a route's failure (an assert inside it) fails the test here."""
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self.errors:
            raise self.errors[0]


# --- fakes of the Services' parts, for apps of main.py ----------------------------------------------

LOCAL = "http://localhost"  # the loader answers its loopback names only (contract section 10)


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


def fake_services(**parts):
    """Services of fakes: ``parts``, an idle cache, and None for each other part."""
    import main

    none = dict.fromkeys(("api", "store", "unlock_status", "unlocker"))
    return main.Services(**{**none, "cache": IdleCache(), **parts})


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

    def stats(self):
        """The real cache's figures (model_cache.BigPartCache.stats), read from this one's."""
        from model_cache import BigPartCache

        return BigPartCache.stats(self)


class PrefetchStore:
    """A store whose prefetch of a name answers ``answers[name]``: (status, download status), or an error
    it raises; a name in ``held`` waits for ``go`` first. ``calls`` notes each (folder, name) and whether it
    ran on the event loop."""

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

    def stats(self):
        return {
            "format1_loads": 0,
            "unsigned_manifest_loads": 0,
            "signed_manifest_loads": 0,
            "signature_refusals": 0,
        }


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


def status_of_served(address):
    conn = http.client.HTTPConnection(*address, timeout=10)
    conn.request("GET", "/status")
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return answer


class NoSession:
    authenticated = False


class FakeUnlockStatus:
    def snapshot(self):
        return {"state": "idle", "error": None, "bytesDone": 0, "bytesTotal": 0, "images": []}

    def stats(self):
        return {"unlock_state": "idle", "unlock_duration_seconds": 0.0}
