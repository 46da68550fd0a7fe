import json
import logging
import threading
import time

import pytest

import security
from api_client import ResourceApi
from constants import API_ATTEMPTS
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
