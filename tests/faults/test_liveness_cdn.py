"""Liveness (contract section 11) against the CDN: a CDN that trickles costs a load a bounded time (a 504)
and nothing else, a later load downloads afresh once the CDN is well, and a CDN's answer out of range is a
502, never a 500."""

import os
import threading
import time

import pytest

from constants import CDN_RESUME_BACKOFF, CDN_RESUMES
from devstack.wait import until
from tests.faults.conftest import PASSWORD, MiB, files_under, model_name, start_loader

pytestmark = pytest.mark.integration

SPEED_LIMIT = 64 * 1024
SPEED_TIME = 2
# A trickle is dropped within two windows of its start (the first may still have had its bytes); a load
# gives up after the first transfer and its CDN_RESUMES resumes, each after its backoff. The rest (the
# Resource API, HEAD, GETs on loopback) takes well under the slack.
GIVE_UP = (CDN_RESUMES + 1) * 2 * SPEED_TIME + CDN_RESUME_BACKOFF * 2**CDN_RESUMES + 10


@pytest.fixture
def loader(stack, proxy, tmp_path):
    """A loader whose CDN transfers must make SPEED_LIMIT bytes/s over SPEED_TIME seconds."""
    with start_loader(
        tmp_path / "loader", stack, CDN_SPEED_LIMIT=SPEED_LIMIT, CDN_SPEED_TIME=SPEED_TIME
    ) as process:
        yield process


def big_path(n):
    return f"/models/{n}.big"


def published(stack, size, format=2):
    n, data = model_name(), os.urandom(size)
    stack.publish("models", n, data, format=format)
    return n, data


def in_background(call):
    """``call`` on a thread of its own; the list its result will be in."""
    outcome = []
    threading.Thread(target=lambda: outcome.append(call()), daemon=True).start()
    return outcome


def test_a_trickling_cdn_is_a_504_in_bounded_time_and_a_later_load_downloads_afresh(
    stack, proxy, user, loader
):
    """Reliability: the CDN trickles a model's big part at 1 KiB/s, for good | the load answers 504 "made less
    than ... bytes/s" within (resumes + 1) x 2 x speed time; /health and other models answer meanwhile; no
    partial file is left; once the CDN is well the same model loads 200, byte for byte, from a fresh
    download (the failed one is never joined)"""
    assert loader.login(user, PASSWORD).status_code == 200
    cached, cached_data = published(stack, MiB + 3)
    assert loader.load(cached, "models").content == cached_data
    n, data = published(stack, 6 * MiB + 7)
    proxy.trickle_next(1024, n=None, method="GET", path=big_path(n))
    started = time.monotonic()
    stuck = in_background(lambda: loader.load(n, "models", timeout=GIVE_UP + 30))
    until(lambda: proxy.trickles() >= 1, 30, "the CDN never began to trickle")

    assert loader.get("/health").status_code == 200
    r = loader.load(cached, "models")
    assert r.status_code == 200 and r.content == cached_data  # from the cache
    fresh, fresh_data = published(stack, 2 * MiB + 5)
    r = loader.load(fresh, "models")
    assert r.status_code == 200 and r.content == fresh_data  # from the CDN, which answers it well

    until(lambda: stuck, GIVE_UP, "the load of the trickling model never ended")
    elapsed = time.monotonic() - started
    r = stuck[0]
    assert r.status_code == 504, r.text
    assert (
        r.json()["detail"]
        == f"the CDN transfer of models/{n}.big made less than {SPEED_LIMIT} bytes/s for {SPEED_TIME} s"
    )
    assert elapsed <= GIVE_UP
    # each transfer pinned to the ETag: the object's end and its start, each resumed a bounded number of times
    transfers = [s for s in proxy.seen() if s.method == "GET" and s.path == big_path(n)]
    assert len({t.headers.get("if-match") for t in transfers}) == 1
    assert CDN_RESUMES + 1 <= len(transfers) <= 2 * (CDN_RESUMES + 1)
    cache = loader.env["MODEL_CACHE_DIR"]

    # What the download held is kept to resume (contract 8.1): a .part only with its record, no final file.
    def kept_to_resume():
        files = [f for f in files_under(cache) if f.startswith(f"models/{n}.big")]
        parts = [f for f in files if f.endswith(".part")]
        paired = all(f.removesuffix(".part") + ".record" in files for f in parts)
        return paired and f"models/{n}.big" not in files

    until(kept_to_resume, 10, "a .part file was left without its record, or a final file appeared")

    proxy.clear_faults()
    proxy.reset_counts()
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    assert proxy.count("GET", big_path(n)) >= 1  # fetched afresh
    assert loader.cached_big_part("models", n).read_bytes()  # and committed


def test_a_cdn_just_fast_enough_is_never_dropped(stack, proxy, user, loader):
    """Reliability: the CDN sends a big part at 4x the speed limit, over two windows | 200, one transfer"""
    assert loader.login(user, PASSWORD).status_code == 200
    n, data = published(stack, MiB - 100)  # one block: one transfer
    proxy.trickle_next(4 * SPEED_LIMIT, n=None, method="GET", path=big_path(n))
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    assert proxy.count("GET", big_path(n)) == 1 and proxy.trickles() == 1


@pytest.mark.parametrize("length", [str(10**20), "-1", "many"])
def test_a_head_that_announces_an_absurd_size_is_a_502(stack, proxy, user, loader, length):
    """Reliability: a format-1 model's HEAD answers Content-Length 10**20 (or -1, or no number) | 502
    "...is not valid...", never a 500 (10**20 was a MemoryError); the next load works"""
    assert loader.login(user, PASSWORD).status_code == 200
    n, data = published(stack, MiB, format=1)
    proxy.header_next("Content-Length", length, method="HEAD", path=big_path(n))
    r = loader.load(n, "models")
    assert r.status_code == 502, r.text
    assert r.json()["detail"].startswith(f"the CDN's answer for models/{n}.big is not valid")
    assert loader.load(n, "models").content == data
