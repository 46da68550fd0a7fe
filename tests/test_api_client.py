"""api_client: the Resource API client (contract section 3) against a fake API on a loopback port: login and
its claims, the statuses mapped to the error hierarchy, token renewal, retries and their bounds, the
deadline of a whole call, and the caps on what an answer may hold."""

import base64
import json
import logging
import socket
import threading
import time

import pytest

import security
from api_client import ResourceApi
from constants import (
    API_ATTEMPTS,
    MAX_CDN_YAML_ANSWER,
    MAX_KEY_FRAGMENT_ANSWER,
    MAX_LOGIN_ANSWER,
    MAX_MANIFEST_ANSWER,
    MAX_SMALL_ANSWER,
    MAX_UPLOAD_ANSWER,
)
from credentials import Credentials
from errors import AuthError, HardwareMismatch, NotFound, NotLoggedIn, UpstreamError, UpstreamTimeout
from tests.fakes import DROP, STALL, ApiServer, make_token

HW = "CPU: Test. GPU: . Memory: 1024. DriveSerial: SN1"
CREDS = Credentials("op@azaion.local", "pw-1")
CLAIMS = {"nameid": "u1", "unique_name": "op@azaion.local", "role": "Operator"}


@pytest.fixture
def api_with():
    """``api_with(route, **options)``: a ResourceApi (no backoff) against an ApiServer answering ``route``."""
    servers = []

    def make(route, **kw):
        server = ApiServer(route)
        servers.append(server)
        return ResourceApi(server.url, lambda: HW, backoff=0, **kw), server

    yield make
    for server in servers:
        server.close()


def wrapped(data, email="op@azaion.local", password="pw-1"):
    return security.encrypt(security.api_key(email, password, HW), data)


def test_login_reads_claims_and_keeps_no_password_in_repr(api_with):
    api, handler = api_with(lambda m, p, b, h: (200, {"token": make_token(CLAIMS)}))
    user = api.login(CREDS)
    assert (user.id, user.email, user.roles) == ("u1", "op@azaion.local", ("Operator",))
    assert handler.calls == [("POST", "/login", None)]
    assert api.authenticated


@pytest.mark.parametrize("status", [401, 403])
def test_bad_credentials(api_with, status):
    api, _ = api_with(lambda m, p, b, h: (status, {"detail": "no"}))
    with pytest.raises(AuthError):
        api.login(CREDS)
    assert not api.authenticated


@pytest.mark.parametrize("payload", [{"token": "not-a-jwt"}, {"nope": 1}, {"token": 5}])
def test_login_garbage_is_an_upstream_error(api_with, payload):
    api, _ = api_with(lambda m, p, b, h: (200, payload))
    with pytest.raises(UpstreamError):
        api.login(CREDS)


def test_login_html_is_an_upstream_error(api_with):
    api, _ = api_with(lambda m, p, b, h: (200, b"<html>oops</html>"))
    with pytest.raises(UpstreamError):
        api.login(CREDS)


def test_get_resource_unwraps_with_the_hardware_bound_key(api_with):
    def route(method, path, body, headers):
        if path == "/login":
            return 200, {"token": make_token(CLAIMS)}
        assert path == "/resources/get/models"
        assert json.loads(body) == {"fileName": "m.small", "password": "pw-1", "hardware": HW}
        assert headers["Authorization"].startswith("Bearer ")
        return 200, wrapped(b"small-part-bytes")

    api, _ = api_with(route)
    api.login(CREDS)
    assert api.get_resource("models", "m.small") == b"small-part-bytes"


def test_calls_need_a_session(api_with):
    api, handler = api_with(lambda m, p, b, h: (500, b""))
    with pytest.raises(NotLoggedIn):
        api.get_resource("models", "m.small")
    assert handler.calls == []


@pytest.mark.parametrize(
    "status,error",
    [(404, NotFound), (409, HardwareMismatch), (403, AuthError), (500, UpstreamError), (418, UpstreamError)],
)
def test_statuses_map_to_the_hierarchy(api_with, status, error):
    def route(method, path, body, headers):
        return (200, {"token": make_token(CLAIMS)}) if path == "/login" else (status, b"{}")

    api, _ = api_with(route)
    api.login(CREDS)
    with pytest.raises(error):
        api.get_resource("models", "m.small")


def test_401_renews_the_token_once_and_retries(api_with):
    tokens = iter([make_token(dict(CLAIMS, n=1)), make_token(dict(CLAIMS, n=2))])
    first = {}

    def route(method, path, body, headers):
        if path == "/login":
            return 200, {"token": next(tokens)}
        if not first:
            first["token"] = headers["Authorization"]
            return 401, b""
        assert headers["Authorization"] != first["token"]
        return 200, wrapped(b"ok")

    api, handler = api_with(route)
    api.login(CREDS)
    assert api.get_resource("models", "m.small") == b"ok"
    assert [c[1] for c in handler.calls] == [
        "/login",
        "/resources/get/models",
        "/login",
        "/resources/get/models",
    ]


def test_a_second_401_is_an_auth_error_not_a_loop(api_with):
    def route(method, path, body, headers):
        return (200, {"token": make_token(CLAIMS)}) if path == "/login" else (401, b"")

    api, handler = api_with(route)
    api.login(CREDS)
    with pytest.raises(AuthError):
        api.get_resource("models", "m.small")
    assert len(handler.calls) == 4


def test_expired_jwt_is_renewed_before_the_call(api_with):
    logins = []

    def route(method, path, body, headers):
        if path == "/login":
            logins.append(1)
            exp = 1 if len(logins) == 1 else 4_000_000_000
            return 200, {"token": make_token(dict(CLAIMS, exp=exp))}
        return 200, wrapped(b"ok")

    api, handler = api_with(route)
    api.login(CREDS)
    assert api.get_resource("models", "m.small") == b"ok"
    assert [c[1] for c in handler.calls] == ["/login", "/login", "/resources/get/models"]


def test_503_and_connection_errors_are_retried_with_a_bound(api_with, caplog):
    answers = iter([DROP, (503, b""), (200, {"token": make_token(CLAIMS)})])
    api, handler = api_with(lambda m, p, b, h: next(answers), attempts=3)
    with caplog.at_level(logging.WARNING, logger="loader.api"):
        api.login(CREDS)
    assert len(handler.calls) == 3
    # one warning per retry, saying why
    assert [r.getMessage() for r in caplog.records if r.name == "loader.api"] == [
        "POST /login attempt 1: ProtocolError: retrying",
        "POST /login attempt 2: status 503: retrying",
    ]

    api2, handler2 = api_with(lambda m, p, b, h: (503, b""), attempts=3)
    with pytest.raises(UpstreamError, match="answered 503"):
        api2.login(CREDS)
    assert len(handler2.calls) == 3


def test_the_default_policy_tries_a_call_three_times(api_with):
    api, handler = api_with(lambda m, p, b, h: (502, b""))
    with pytest.raises(UpstreamError, match="answered 502"):
        api.login(CREDS)
    assert len(handler.calls) == API_ATTEMPTS == 3


def test_a_dropped_upload_is_sent_again_whole(api_with):
    """POSTs are retried too (every call of the contract is idempotent), with the same body."""
    bodies = []

    def route(method, path, body, headers):
        if path == "/login":
            return 200, {"token": make_token(CLAIMS)}
        bodies.append(body)
        return DROP if len(bodies) == 1 else (201, b"")

    api, _ = api_with(route)
    api.login(CREDS)
    api.upload("models", "m.small", b"SMALLPART")
    assert len(bodies) == 2 and bodies[0] == bodies[1] and b"SMALLPART" in bodies[1]


def test_a_status_the_api_asks_to_retry_after_is_retried(api_with):
    """A Retry-After is honoured: a 429 that names one is tried again, one that does not is an error."""
    answers = iter([(429, b"", {"Retry-After": "0"}), (200, {"token": make_token(CLAIMS)})])
    api, handler = api_with(lambda m, p, b, h: next(answers))
    api.login(CREDS)
    assert len(handler.calls) == 2

    api2, handler2 = api_with(lambda m, p, b, h: (429, b""))
    with pytest.raises(UpstreamError, match="answered 429"):
        api2.login(CREDS)
    assert len(handler2.calls) == 1


def test_an_unreachable_api_is_an_upstream_error_after_the_tries(api_with):
    api, server = api_with(lambda m, p, b, h: (200, b""))
    server.close()  # nothing listens on its port any more
    with pytest.raises(UpstreamError, match="unreachable") as caught:
        api.login(CREDS)
    assert not isinstance(caught.value, UpstreamTimeout)
    assert caught.value.__cause__ is not None  # the cause is kept


def test_timeout_maps_to_upstream_timeout(api_with):
    api, handler = api_with(lambda m, p, b, h: STALL, attempts=2, timeout=(5.0, 0.3))
    with pytest.raises(UpstreamTimeout):
        api.login(CREDS)
    assert len(handler.calls) == 2


def test_cdn_yaml_is_fetched_once_per_session(api_with):
    def route(method, path, body, headers):
        if path == "/login":
            return 200, {"token": make_token(CLAIMS)}
        assert path == "/resources/get" and json.loads(body)["fileName"] == "cdn.yaml"
        return 200, wrapped(b"host: http://s3\n")

    api, handler = api_with(route)
    api.login(CREDS)
    assert api.cdn_yaml() == api.cdn_yaml() == "host: http://s3\n"
    assert [c[1] for c in handler.calls] == ["/login", "/resources/get"]


def test_answers_far_larger_than_a_small_part_are_refused(api_with):
    def route(method, path, body, headers):
        return (200, {"token": make_token(CLAIMS)}) if path == "/login" else (200, b"x" * (2 * 1024 * 1024))

    api, _ = api_with(route)
    api.login(CREDS)
    with pytest.raises(UpstreamError):
        api.get_resource("models", "m.small")


def test_key_fragment_and_upload(api_with):
    seen = {}

    def route(method, path, body, headers):
        if path == "/login":
            return 200, {"token": make_token(CLAIMS)}
        if path == "/binary-split/key-fragment":
            return 200, b"\x01\x02fragment"
        seen["upload"] = (path, body)
        return 201, b""

    api, _ = api_with(route)
    api.login(CREDS)
    assert api.key_fragment() == b"\x01\x02fragment"
    api.upload("models", "m.small", b"SMALLPART")
    path, body = seen["upload"]
    assert path == "/resources/models" and b'name="data"; filename="m.small"' in body and b"SMALLPART" in body


def test_a_renewal_for_the_session_before_never_lands_in_a_new_login(api_with):
    other = Credentials("up@azaion.local", "pw-2")
    claims_b = {"nameid": "u2", "unique_name": "up@azaion.local", "role": "ResourceUploader"}
    renewing, release = threading.Event(), threading.Event()
    logins = []

    def route(method, path, body, headers):
        if path == "/login":
            email = json.loads(body)["email"]
            logins.append(email)
            if email == CREDS.email and len(logins) > 1:  # the renewal of the first session
                renewing.set()
                assert release.wait(10)
            claims = CLAIMS if email == CREDS.email else claims_b
            return 200, {
                "token": make_token({**claims, "exp": time.time() + (3600 if len(logins) > 1 else -1)})
            }
        return 200, wrapped(b"small part")

    api, _ = api_with(route)
    api.login(CREDS)  # its token has expired already: the next call renews it
    outcome = []
    caller = threading.Thread(target=lambda: outcome.append(_outcome(api.get_resource, "models", "m.small")))
    caller.start()
    assert renewing.wait(10)
    user = api.login(other)  # a new /login while the old session's renewal is under way
    release.set()
    caller.join(10)
    # The new login's user, credentials and token stand (the renewal installs its user with its token),
    # and the call that renewed for the old session fails instead of going on with the new one's token.
    assert api.user.id == user.id == "u2" and api.credentials() is other
    assert outcome == [AuthError]


def _outcome(call, *args):
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        return type(exc)
    return None


# --- liveness: deadlines, caps, values (contract section 11) -----------------------------------------------

DEADLINE = 2.0
MARGIN = 3.0  # generous: a deadline that holds ends within a few tenths of a second of it


class RawServer:
    """An HTTP server on a raw socket, for what http.server cannot do: send the head and the body of an
    answer at a given rate (bytes a second, one byte at a time) or without a length. ``route(method, path)``
    gives ``(head, body, head_rate, body_rate)`` (a rate of None: at once); ``sent`` counts the bytes sent,
    ``paths`` the requests."""

    def __init__(self, route):
        self.route = route
        self.sent = 0
        self.paths = []
        self._closing = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True, name="raw-api").start()

    def _accept(self):
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="raw-api-conn").start()

    def _serve(self, conn):
        with conn:
            reader = conn.makefile("rb")
            while not self._closing.is_set():
                request = reader.readline().split()
                if not request:
                    return
                length = 0
                for line in iter(reader.readline, b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                reader.read(length)
                self.paths.append(request[1].decode())
                head, body, head_rate, body_rate = self.route(request[0].decode(), request[1].decode())
                try:
                    self._send(conn, head, head_rate)
                    for chunk in [body] if isinstance(body, bytes) else body:
                        self._send(conn, chunk, body_rate)
                except OSError:
                    return  # the client went away
                if b"connection: close" in head.lower():
                    return

    def _send(self, conn, data, rate):
        if rate is None:
            conn.sendall(data)
            self.sent += len(data)
            return
        for i in range(len(data)):
            if self._closing.wait(1 / rate):
                raise OSError("closing")
            conn.sendall(data[i : i + 1])
            self.sent += 1

    def close(self):
        self._closing.set()
        self._sock.close()


def head(status=200, length=None, close=False):
    lines = [f"HTTP/1.1 {status} X"] + ([f"Content-Length: {length}"] if length is not None else [])
    return ("\r\n".join(lines + (["Connection: close"] if close else [])) + "\r\n\r\n").encode()


@pytest.fixture
def raw_api():
    """``raw_api(route, **options)``: a ResourceApi (no backoff, DEADLINE) against a RawServer."""
    servers = []

    def make(route, **kw):
        server = RawServer(route)
        servers.append(server)
        kw.setdefault("deadline", DEADLINE)
        kw.setdefault("timeout", (1.0, 5.0))
        return ResourceApi(server.url, lambda: HW, backoff=0, **kw), server

    yield make
    for server in servers:
        server.close()


def login_answer(claims=CLAIMS, pad=0):
    """A sign-in answer whose JSON is padded with spaces by ``pad`` bytes."""
    return json.dumps({"token": make_token(claims)}).encode() + b" " * pad


def timed_failure(call, error=UpstreamTimeout):
    start = time.monotonic()
    with pytest.raises(error) as caught:
        call()
    return caught.value, time.monotonic() - start


def test_a_trickling_body_ends_at_the_deadline(raw_api):
    """The head on time, then the body at a byte a second (each read well within the read timeout): the call
    fails at its deadline, not when the body would end (some 15 minutes later)."""
    body = login_answer()
    api, server = raw_api(lambda m, p: (head(200, len(body)), body, None, 1))
    error, elapsed = timed_failure(lambda: api.login(CREDS))
    assert DEADLINE - 0.1 <= elapsed < DEADLINE + MARGIN, elapsed
    assert error.detail == "the Resource API did not answer POST /login in time (within 2 s)"
    assert 0 < server.sent < len(head(200, len(body))) + 10  # it did get a head and a few bytes
    assert not api.authenticated


def test_a_trickling_head_ends_at_the_deadline(raw_api):
    body = login_answer()
    api, _ = raw_api(lambda m, p: (head(200, len(body)), body, 1, None))
    error, elapsed = timed_failure(lambda: api.login(CREDS))
    assert DEADLINE - 0.1 <= elapsed < DEADLINE + MARGIN, elapsed
    assert "within 2 s" in error.detail


def test_a_trickling_resource_and_the_session_after_it(raw_api):
    """get_resource's deadline holds too; the connection it cut is not handed to the next call: that works."""
    slow = threading.Event()
    blob = wrapped(b"small part")

    def route(method, path):
        if path == "/login":
            body = login_answer()
            return head(200, len(body)), body, None, None
        return head(200, len(blob)), blob, None, (1 if slow.is_set() else None)

    api, _ = raw_api(route)
    api.login(CREDS)
    slow.set()
    error, elapsed = timed_failure(lambda: api.get_resource("models", "m.small"))
    assert DEADLINE - 0.1 <= elapsed < DEADLINE + MARGIN, elapsed
    assert "POST /resources/get/models in time" in error.detail
    slow.clear()
    assert api.get_resource("models", "m.small") == b"small part"


def test_the_token_renewal_is_inside_the_calls_deadline(raw_api):
    """A 401 renews the token with a sign-in; that one trickles: the call still ends at its one deadline."""
    logins = []

    def route(method, path):
        if path == "/login":
            logins.append(1)
            body = login_answer()
            return head(200, len(body)), body, None, (1 if len(logins) > 1 else None)
        return head(401, 0), b"", None, None

    api, server = raw_api(route)
    api.login(CREDS)
    error, elapsed = timed_failure(lambda: api.key_fragment())
    assert DEADLINE - 0.1 <= elapsed < DEADLINE + MARGIN, elapsed
    assert error.detail == "the Resource API did not answer POST /login in time (within 2 s)"
    assert server.paths == ["/login", "/binary-split/key-fragment", "/login"]


def test_tries_that_would_outlast_the_deadline_end_at_it(api_with):
    """Ten tries of a second each would take ten: the deadline cuts the third one short."""
    api, handler = api_with(lambda m, p, b, h: STALL, attempts=10, timeout=(1.0, 1.0), deadline=2.5)
    error, elapsed = timed_failure(lambda: api.login(CREDS))
    assert 2.4 <= elapsed < 2.5 + MARGIN, elapsed
    assert "within 2.5 s" in error.detail
    assert len(handler.calls) == 3


def test_a_retry_after_past_the_deadline_is_not_waited_for(api_with):
    api, handler = api_with(lambda m, p, b, h: (503, b"", {"Retry-After": "5"}), deadline=DEADLINE)
    error, elapsed = timed_failure(lambda: api.login(CREDS))
    assert elapsed < 1.0, elapsed  # no use waiting 5 s for a try that may not start
    assert len(handler.calls) == 1 and "within 2 s" in error.detail


def test_a_retry_after_that_is_no_time_falls_back_to_the_backoff(api_with):
    """urllib3 itself raised InvalidHeader out of requests for this (a 500 of the loader)."""
    answers = iter([(503, b"", {"Retry-After": "soon"}), (200, {"token": make_token(CLAIMS)})])
    api, handler = api_with(lambda m, p, b, h: next(answers))
    api.login(CREDS)
    assert len(handler.calls) == 2


def test_one_watchdog_thread_for_every_call(api_with):
    api, _ = api_with(lambda m, p, b, h: (200, {"token": make_token(CLAIMS)}))
    for _ in range(20):
        api.login(CREDS)
    assert [t.name for t in threading.enumerate()].count("api-deadlines") == 1


CAP_CASES = {
    # name: (the call, whether its answer is a blob under the API key, the cap)
    "login": (lambda api: api.login(CREDS), False, MAX_LOGIN_ANSWER),
    "small": (lambda api: api.get_resource("models", "m.small"), True, MAX_SMALL_ANSWER),
    "manifest": (lambda api: api.get_resource("models", "m.manifest"), True, MAX_MANIFEST_ANSWER),
    "cdn.yaml": (lambda api: api.cdn_yaml(), True, MAX_CDN_YAML_ANSWER),
    "key fragment": (lambda api: api.key_fragment(), False, MAX_KEY_FRAGMENT_ANSWER),
    "upload": (lambda api: api.upload("models", "m.small", b"SMALL"), False, MAX_UPLOAD_ANSWER),
}


def answer_of(size, blob):
    """An answer of exactly ``size`` bytes: a blob (whose plaintext is as long as fits), or plain bytes."""
    if not blob:
        return b"y" * size
    plaintext = b"a" * ((size - 16) // 16 - 1) * 16
    data = wrapped(plaintext)
    assert len(data) == size, "choose a size of 16 * n"
    return data


def cap_api(api_with, name, size):
    call, blob, _ = CAP_CASES[name]
    answer = answer_of(size, blob) if name != "login" else login_answer(pad=size - len(login_answer()))

    def route(method, path, body, headers):
        if path == "/login":
            return 200, answer if name == "login" else login_answer()
        return (201 if name == "upload" else 200), answer

    api, _ = api_with(route)
    if name != "login":
        api.login(CREDS)
    return api, call


@pytest.mark.parametrize("name", list(CAP_CASES))
def test_an_answer_one_byte_over_its_cap_is_not_valid(api_with, name):
    api, call = cap_api(api_with, name, CAP_CASES[name][2] + (16 if CAP_CASES[name][1] else 1))
    with pytest.raises(
        UpstreamError, match=f"is not valid: larger than {CAP_CASES[name][2]} bytes"
    ) as caught:
        call(api)
    assert not isinstance(caught.value, UpstreamTimeout)


@pytest.mark.parametrize("name", list(CAP_CASES))
def test_an_answer_at_its_cap_is_taken(api_with, name):
    api, call = cap_api(api_with, name, CAP_CASES[name][2])
    call(api)


def test_a_manifest_may_be_larger_than_a_small_part(api_with):
    """The cap is the one of the name asked for: a manifest of a large model is far above a small part's."""
    api, call = cap_api(api_with, "manifest", MAX_SMALL_ANSWER * 4)
    assert len(call(api)) > MAX_SMALL_ANSWER * 3
    with pytest.raises(UpstreamError, match="is not valid"):
        api.get_resource("models", "m.small")


def test_a_huge_answer_without_a_length_is_cut_at_the_cap(raw_api):
    """300 MB with no Content-Length: read up to the cap, refused, the rest never taken from the socket."""
    mib = b"x" * (1024 * 1024)
    api, server = raw_api(lambda m, p: (head(200, close=True), (mib for _ in range(300)), None, None))
    error, elapsed = timed_failure(lambda: api.login(CREDS), UpstreamError)
    assert (
        error.detail
        == f"the Resource API's answer to POST /login is not valid: larger than {MAX_LOGIN_ANSWER} bytes"
    )
    assert server.sent < 32 * 1024 * 1024, server.sent  # the socket buffers at most
    assert elapsed < DEADLINE


def test_a_huge_answer_with_its_length_is_refused_unread(raw_api):
    api, server = raw_api(lambda m, p: (head(200, 300 * 1024 * 1024), iter(()), None, None))
    with pytest.raises(UpstreamError, match="is not valid: larger than"):
        api.login(CREDS)


@pytest.mark.parametrize(
    "answer",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"token": ' + b"[" * 33 + b"]" * 33 + b"}",
        b'{"token": "x", "deep": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    ],
    ids=["30000", "33", "beside-the-token"],
)
def test_a_login_answer_nested_too_deep_is_not_valid(api_with, answer):
    """30,000 nested arrays (in 60 KB, under the cap) were a RecursionError in json.loads: a 500."""
    api, _ = api_with(lambda m, p, b, h: (200, answer))
    with pytest.raises(
        UpstreamError, match=r"answer to POST /login is not valid: JSON nested deeper than 32"
    ):
        api.login(CREDS)
    assert not api.authenticated


def jwt_by_hand(payload):
    """A JWT of the payload bytes as they are (PyJWT would not encode 1e999 or NaN), any signature."""
    segments = (b'{"alg": "HS256", "typ": "JWT"}', payload, b"signature")
    return ".".join(base64.urlsafe_b64encode(s).rstrip(b"=").decode() for s in segments)


def test_a_jwt_nested_too_deep_is_not_valid(api_with):
    token = jwt_by_hand(b'{"nameid": "1", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")
    api, _ = api_with(lambda m, p, b, h: (200, {"token": token}))
    with pytest.raises(UpstreamError, match="is not valid: its JWT nests deeper than 32"):
        api.login(CREDS)


@pytest.mark.parametrize("exp", [b"1e999", b"-1e999", b"NaN", b"-1", b"1e13", b'"tomorrow"'])
def test_a_jwt_whose_exp_is_no_time_is_not_valid(api_with, exp):
    """exp 1e999 was an OverflowError in int(), NaN a ValueError: each a 500."""
    token = jwt_by_hand(b'{"nameid": "1", "unique_name": "a@b", "exp": ' + exp + b"}")
    api, _ = api_with(lambda m, p, b, h: (200, {"token": token}))
    with pytest.raises(UpstreamError, match=r"POST /login is not valid: its JWT's exp is not a time"):
        api.login(CREDS)
    assert not api.authenticated
