"""The CDN (S3) misbehaves: failing for a while, failing for good, or sending a short body."""

import os

import pytest
import requests

from tests.faults.conftest import PASSWORD, MiB, files_under, model_name

pytestmark = pytest.mark.integration


@pytest.fixture
def published(stack, loader, user):
    data = os.urandom(6 * MiB + 7)
    n = model_name()
    stack.publish("models", n, data)
    assert loader.login(user, PASSWORD).status_code == 200
    return n, data


def big_path(n):
    return f"/models/{n}.big"


def cached_files(loader):
    return files_under(loader.env["MODEL_CACHE_DIR"])


@pytest.mark.parametrize("method", ["HEAD", "GET"])
@pytest.mark.parametrize("status", [500, 503])
def test_cdn_errors_for_a_while_are_retried(loader, proxy, published, method, status):
    """Reliability: CDN answers 500/503 twice (HEAD or GET), then recovers | retried; the load returns the
    right bytes"""
    n, data = published
    proxy.fail_next(status, n=2, method=method, path=big_path(n))
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    # the two refused requests, then one HEAD, or one GET per segment (the object's last MiB, the rest)
    assert proxy.count(method, big_path(n)) == 2 + (1 if method == "HEAD" else 2)


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_cdn_failing_for_good_is_502(loader, proxy, published, method):
    """Reliability: CDN answers 503 to every try | 502 "the CDN answered 503" after a bounded number of tries;
    nothing cached; the next load works once it recovers"""
    n, data = published
    proxy.fail_next(503, n=None, method=method, path=big_path(n))
    try:
        r = loader.load(n, "models")
    except requests.RequestException as exc:
        pytest.fail(
            f"200, then a cut transfer ({type(exc).__name__}), for a GET the CDN refused outright: "
            "the failure is known before the first byte, so it should be a 502"
        )
    assert r.status_code == 502, r.text
    assert "CDN" in r.json()["detail"] and "503" in r.json()["detail"]
    # a bounded number of tries for the HEAD, or for each of the two segments fetched at once
    assert proxy.count(method, big_path(n)) <= (6 if method == "HEAD" else 2 * 6)
    assert not any(f.endswith(".big") for f in cached_files(loader))
    proxy.clear_faults()
    assert loader.load(n, "models").content == data


def test_truncated_body_is_detected_and_resumed(loader, proxy, published):
    """Reliability: CDN sends a truncated body (full Content-Length, half the bytes) once | detected; resumed
    with a Range GET pinned to the ETag; the right bytes"""
    n, data = published
    proxy.truncate_next(method="GET", path=big_path(n), starts=range(1))  # the segment from byte 0
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    gets = [s for s in proxy.seen() if s.method == "GET" and s.path == big_path(n)]
    starts = {int(g.headers["range"].removeprefix("bytes=").partition("-")[0]): g for g in gets}
    assert len(gets) == 3 and 0 in starts, [g.headers.get("range") for g in gets]  # end, start, resumed
    tail = max(starts)
    resumed_at, resumed = next((at, g) for at, g in starts.items() if 0 < at < tail)
    # resumed where the first segment broke off, pinned to the same ETag
    assert resumed.headers.get("if-match") == starts[0].headers.get("if-match") is not None


def test_truncated_body_every_time_is_never_a_whole_file(stack, loader, user, proxy):
    """Reliability: CDN truncates every body | refused with 502 before any byte when the object's end never
    arrives (it is fetched first), else cut off short of the announced Content-Length; never
    a short file that looks whole; no file under the final name; the next load works"""
    assert loader.login(user, PASSWORD).status_code == 200
    for size, truncated, streamed in ((6 * MiB + 7, None, False), (40 * MiB + 7, range(16 * MiB), True)):
        data = os.urandom(size)
        n = model_name()
        stack.publish("models", n, data)
        # every GET cut short (the end of the object never arrives), or only those inside the first segment
        proxy.truncate_next(n=None, method="GET", path=big_path(n), starts=truncated)
        got, status = b"", None
        with pytest.raises(requests.RequestException):
            with loader.load(n, "models", stream=True) as r:
                status = r.status_code
                if r.status_code != 200:
                    raise requests.HTTPError(f"refused with {r.status_code}")
                assert r.headers["content-length"] == str(size)
                for chunk in r.iter_content(64 * 1024):
                    got += chunk
        assert status == (200 if streamed else 502)
        assert got == data[: len(got)] and len(got) < len(data)
        files = cached_files(loader)
        # Never a file under the final name; a .part only with its record, kept to resume (contract 8.1).
        assert not any(f.endswith(".big") for f in files)
        assert all(f.removesuffix(".part") + ".record" in files for f in files if f.endswith(".part"))
        proxy.clear_faults()
    assert loader.load(n, "models").content == data
