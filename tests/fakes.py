"""In-process fakes for unit tests: an HTTP server answering from a function on a loopback port (a Resource
API, an S3 endpoint, a Docker Engine), so a client's whole stack (requests, urllib3 and its Retry, botocore
and its retries) runs as it does against the real one."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt

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
