"""The Resource API misbehaves: too slow, failing, or answering garbage with a 200."""

import os
import time

import pytest

from devstack.wait import until
from tests.faults.conftest import PASSWORD, model_name, start_loader

pytestmark = pytest.mark.integration

API_TIMEOUT = 2
# The client tries 3 times (constants.API_ATTEMPTS); each try may wait for the connect and the read timeout,
# with 0 s + 0.5 s of backoff between. Far more than that is a hang, not a timeout.
BOUND = 15.0


@pytest.fixture
def slow_loader(tmp_path, stack, api_faults):
    with start_loader(tmp_path / "loader", stack, API_TIMEOUT=API_TIMEOUT) as process:
        yield process


def timed(call):
    start = time.monotonic()
    r = call()
    return r, time.monotonic() - start


def test_slow_login_is_504_within_the_timeout(slow_loader, api_faults, user):
    """Reliability: Resource API slower than API_TIMEOUT on /login | 504 "did not answer in time" after 3
    tries, within 15 s at API_TIMEOUT=2; the next login works"""
    api_faults.set_fault("POST /login", delay=API_TIMEOUT + 8, count=None)
    api_faults.reset_counters()
    r, elapsed = timed(lambda: slow_loader.login(user, PASSWORD))
    assert r.status_code == 504, r.text
    assert "in time" in r.json()["detail"]
    assert API_TIMEOUT <= elapsed < BOUND, elapsed
    assert api_faults.counters().get("POST /login") == 3
    api_faults.clear_faults()
    assert slow_loader.login(user, PASSWORD).status_code == 200


def test_slow_resource_is_504_within_the_timeout(slow_loader, api_faults, stack, user):
    """Reliability: Resource API slower than API_TIMEOUT on a resource | /load answers 504 within 15 s at
    API_TIMEOUT=2; the next load works"""
    n = model_name()
    data = os.urandom(100_000)
    stack.publish("models", n, data)
    assert slow_loader.login(user, PASSWORD).status_code == 200
    api_faults.set_fault("POST /resources/get/models", delay=API_TIMEOUT + 8, count=None)
    r, elapsed = timed(lambda: slow_loader.load(n, "models"))
    assert r.status_code == 504, r.text
    assert "in time" in r.json()["detail"]
    assert elapsed < BOUND, elapsed
    api_faults.clear_faults()
    r = slow_loader.load(n, "models")
    assert r.status_code == 200 and r.content == data


def test_api_503_for_a_while_is_retried(slow_loader, api_faults, user):
    """Reliability: Resource API answers 503 twice, then recovers | retried with backoff; the login
    succeeds"""
    api_faults.set_fault("POST /login", status=503, count=2)
    api_faults.reset_counters()
    r = slow_loader.login(user, PASSWORD)
    assert r.status_code == 200, r.text
    assert api_faults.counters().get("POST /login") == 3


def test_api_500_is_502(slow_loader, api_faults, user):
    """Reliability: Resource API answers 500 | 502 naming the upstream status, no retry storm"""
    api_faults.set_fault("POST /login", status=500, count=None)
    api_faults.reset_counters()
    r = slow_loader.login(user, PASSWORD)
    assert r.status_code == 502 and "500" in r.json()["detail"]
    assert api_faults.counters().get("POST /login") == 1


@pytest.mark.parametrize("garbage", ["html", "truncated_json", "not_jwt", "empty", "random"])
def test_garbage_login_answer_is_502(slow_loader, api_faults, user, garbage):
    """Reliability: Resource API answers /login with 200 and garbage (HTML, truncated JSON, a token that is
    not a JWT, empty, random bytes) | 502 "no valid JWT"; not logged in"""
    api_faults.set_fault("POST /login", status=200, garbage=garbage)
    r = slow_loader.login(user, PASSWORD)
    assert r.status_code == 502, r.text
    assert r.json()["detail"] == "the Resource API's sign-in answer carries no valid JWT"
    assert slow_loader.get("/status").json()["authenticated"] is False


@pytest.mark.parametrize("garbage", ["html", "truncated_json", "empty", "random"])
def test_garbage_resource_answer_is_502(slow_loader, api_faults, stack, user, garbage):
    """Reliability: Resource API answers a small part with 200 and garbage | 502 "decryption failed"; nothing
    is streamed, the next load works"""
    n = model_name()
    data = os.urandom(50_000)
    stack.publish("models", n, data)
    assert slow_loader.login(user, PASSWORD).status_code == 200
    api_faults.set_fault("POST /resources/get/models", status=200, garbage=garbage)
    r = slow_loader.load(n, "models")
    assert r.status_code == 502, r.text
    assert "decrypt" in r.json()["detail"]
    assert slow_loader.load(n, "models").content == data


def test_garbage_cdn_config_is_502(slow_loader, api_faults, stack, user):
    """Reliability: Resource API answers cdn.yaml with garbage | 502 "decryption failed"; the session stays
    usable"""
    n = model_name()
    data = os.urandom(50_000)
    stack.publish("models", n, data)
    # A login fetches cdn.yaml ahead of the first load (in the background, its failure only logged), and
    # the load asks again: garbage for both.
    api_faults.set_fault("POST /resources/get", status=200, garbage="html", count=2)
    assert slow_loader.login(user, PASSWORD).status_code == 200
    until(
        lambda: "could not prepare the CDN clients yet (DecryptionError)" in slow_loader.log(),
        what="the login did not fetch cdn.yaml",
        every=0.05,
    )
    r = slow_loader.load(n, "models")
    assert r.status_code == 502 and "decrypt" in r.json()["detail"], r.text
    assert slow_loader.load(n, "models").content == data
