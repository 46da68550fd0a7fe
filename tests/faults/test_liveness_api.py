"""Liveness (contract section 11): a Resource API that misbehaves never hangs nor crashes the loader.

The reference API itself misbehaves (devstack.api.faults): it trickles an answer a byte a second, or answers a
sign-in with 300 MB, with JSON nested 100,000 deep, or with a JWT whose exp is 1e999 or NaN.
"""

import os
import threading
import time

import pytest
import requests

from devstack.processes.loader import proc_field
from tests.faults.conftest import PASSWORD, model_name, start_loader

pytestmark = pytest.mark.integration

API_TIMEOUT = 2  # each read: a byte a second never runs it out
API_DEADLINE = 6  # the whole call
MARGIN = 4.0  # generous: the deadline holds to a few tenths of a second
MiB = 1024 * 1024


@pytest.fixture
def liveness_loader(tmp_path, stack, api_faults):
    with start_loader(
        tmp_path / "loader", stack, API_TIMEOUT=API_TIMEOUT, API_DEADLINE=API_DEADLINE
    ) as process:
        yield process


def timed(call):
    start = time.monotonic()
    r = call()
    return r, time.monotonic() - start


def assert_no_traceback(process):
    log = process.log()
    assert "Traceback" not in log, log[-3000:]


def assert_trickles(stack, path, body):
    """The premise: the reference API sends the head of ``path``'s answer at once, then a byte a second."""
    start = time.monotonic()
    with requests.post(f"{stack.api_url}{path}", json=body, stream=True, timeout=5) as r:
        assert r.status_code == 200 and time.monotonic() - start < 1.0
        assert len(r.raw.read(2)) == 2 and time.monotonic() - start >= 1.0


def test_trickling_login_is_504_at_the_deadline_and_health_stays_200(liveness_loader, api_faults, user):
    """Reliability: Resource API trickles its /login answer a byte a second (every read on time) | 504 "did
    not answer in time" within API_DEADLINE, /health 200 meanwhile; the next login works"""
    api_faults.set_trickle("POST /login", 1, count=None)
    assert_trickles(api_faults, "/login", {"email": user, "password": PASSWORD})
    outcome = []
    caller = threading.Thread(
        target=lambda: outcome.append(timed(lambda: liveness_loader.login(user, PASSWORD)))
    )
    caller.start()
    health = []
    while caller.is_alive():
        health.append(timed(lambda: liveness_loader.get("/health", timeout=5)))
        caller.join(0.5)
    [(r, elapsed)] = outcome
    assert r.status_code == 504, r.text
    assert (
        r.json()["detail"] == f"the Resource API did not answer POST /login in time (within {API_DEADLINE} s)"
    )
    assert API_DEADLINE - 0.5 <= elapsed < API_DEADLINE + MARGIN, elapsed
    assert len(health) >= 5 and all(h.status_code == 200 and took < 1.0 for h, took in health), health
    api_faults.clear_faults()
    assert liveness_loader.login(user, PASSWORD).status_code == 200
    assert_no_traceback(liveness_loader)


def test_trickling_resource_is_504_at_the_deadline_then_the_load_works(
    liveness_loader, api_faults, stack, user
):
    """Reliability: Resource API trickles the manifest and small part a byte a second | /load answers 504
    within API_DEADLINE; once it answers again the same load is 200 with the exact bytes"""
    n = model_name()
    data = os.urandom(100_000)
    stack.publish("models", n, data)
    assert liveness_loader.login(user, PASSWORD).status_code == 200
    api_faults.set_trickle("POST /resources/get/models", 1, count=None)
    r, elapsed = timed(lambda: liveness_loader.load(n, "models"))
    assert r.status_code == 504, r.text
    assert "POST /resources/get/models in time" in r.json()["detail"]
    assert API_DEADLINE - 0.5 <= elapsed < API_DEADLINE + MARGIN, elapsed
    api_faults.clear_faults()
    r = liveness_loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    assert_no_traceback(liveness_loader)


def test_huge_login_answer_is_502_and_costs_no_memory(liveness_loader, api_faults, user):
    """Reliability: Resource API answers /login with 300 MB (no Content-Length) | 502 "is not valid: larger
    than 65536 bytes" after reading at most the cap; the loader's memory does not grow by the answer"""
    liveness_loader.get("/status")  # the compiled modules are loaded before memory is measured
    before = proc_field(liveness_loader.pid, "VmHWM")
    api_faults.set_fault("POST /login", garbage="huge")
    r = liveness_loader.login(user, PASSWORD)
    assert r.status_code == 502, r.text
    assert r.json()["detail"] == (
        "the Resource API's answer to POST /login is not valid: larger than 65536 bytes"
    )
    growth = proc_field(liveness_loader.pid, "VmHWM") - before
    assert growth < 50 * 1024, f"the loader's peak memory grew by {growth} KiB"
    assert proc_field(liveness_loader.pid, "VmRSS") < before + 50 * 1024
    assert liveness_loader.get("/status").json()["authenticated"] is False
    assert_no_traceback(liveness_loader)


def test_deep_json_login_answer_is_502_without_a_traceback(liveness_loader, api_faults, user):
    """Reliability: Resource API answers /login with JSON nested 100,000 deep | 502 "is not valid" (the
    200,000 bytes are over the cap; under it the depth is checked before parsing), no traceback"""
    api_faults.set_fault("POST /login", garbage="deep_json")
    r = liveness_loader.login(user, PASSWORD)
    assert r.status_code == 502, r.text
    assert "is not valid" in r.json()["detail"]
    assert liveness_loader.get("/health").status_code == 200
    assert_no_traceback(liveness_loader)


def test_a_manifest_nested_100000_deep_is_502_without_a_traceback(liveness_loader, stack, user):
    """Reliability: the Resource API serves a manifest nested 100,000 deep (under its 8 MiB cap) | 502 "the
    manifest of <folder>/<name> is not valid: JSON nested deeper than 32" before any parsing recursion; no
    traceback (a RecursionError, a 500, before); the next load of a sound manifest works"""
    n = model_name("deep")
    data = os.urandom(100_000)
    stack.publish("models", n, data)
    assert liveness_loader.login(user, PASSWORD).status_code == 200
    sound = stack.manifest("models", n)
    stack.put_manifest("models", n, b"[" * 100_000 + b"]" * 100_000)
    r = liveness_loader.load(n, "models")
    assert r.status_code == 502, r.text
    assert r.json()["detail"] == f"the manifest of models/{n} is not valid: JSON nested deeper than 32"
    stack.put_manifest("models", n, sound)
    assert liveness_loader.load(n, "models").content == data
    assert_no_traceback(liveness_loader)


@pytest.mark.parametrize("garbage", ["jwt_exp_inf", "jwt_exp_nan"])
def test_jwt_whose_exp_is_no_time_is_502(liveness_loader, api_faults, user, garbage):
    """Reliability: Resource API signs in with a JWT whose exp is 1e999 or NaN | 502 "is not valid: its JWT's
    exp is not a time", not logged in, no traceback"""
    api_faults.set_fault("POST /login", garbage=garbage)
    r = liveness_loader.login(user, PASSWORD)
    assert r.status_code == 502, r.text
    assert "POST /login is not valid: its JWT's exp is not a time" in r.json()["detail"]
    assert liveness_loader.get("/status").json()["authenticated"] is False
    assert_no_traceback(liveness_loader)
