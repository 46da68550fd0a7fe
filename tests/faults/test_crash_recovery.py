"""The loader is killed (SIGKILL) in the middle of a CDN download and started again on the same cache."""

import hashlib
import os

import pytest
import requests

from tests.faults.conftest import PASSWORD, MiB, files_under, model_name, start_loader, tmpfs

pytestmark = pytest.mark.integration


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def kill_mid_download(loader, proxy, name, data, after=4 * MiB):
    """Start a load, hold the CDN transfer of the object's start still after ``after`` bytes, read a
    little, SIGKILL the loader. The client must then see a broken transfer, never a response that ends as
    if it were whole. (The object's end is fetched first and whole: the load checks it.)
    """
    proxy.stall_next(after, 60.0, method="GET", path=f"/models/{name}.big", starts=range(1))
    with loader.load(name, "models", stream=True, timeout=30) as r:
        assert r.status_code == 200
        chunks = r.iter_content(64 * 1024)
        got = next(chunks)
        assert got == data[: len(got)]
        loader.kill()
        with pytest.raises(requests.RequestException):
            for chunk in chunks:
                got += chunk
        assert len(got) < len(data)
    # The held exchange would keep SeaweedFS writing into a stalled connection (which slows its other
    # readers of the object); cut it, as the dead loader's kernel would have. The proxy returns on its port.
    proxy.stop()
    proxy.start()


def fetched_ranges(proxy, size):
    """The byte ranges of the object the CDN was asked for (a download may be split in segments), merged."""
    spans = []
    for seen in proxy.seen():
        if seen.method == "GET":
            first, _, last = seen.headers.get("range", "bytes=0-").removeprefix("bytes=").partition("-")
            spans.append((int(first), int(last) + 1 if last else size))
    merged = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def gets(proxy):
    return sum(1 for seen in proxy.seen() if seen.method == "GET")


def cdn_big(stack, name):
    return stack.s3_admin_client().get_object(Bucket="models", Key=name + ".big")["Body"].read()


def final_file_is_right_or_absent(cache, name, expected):
    """No file under the final name ever holds other bytes than the CDN's big part."""
    final = cache / "models" / (name + ".big")
    return not final.exists() or final.read_bytes() == expected


def test_sigkill_mid_download_then_restart_loads_the_right_bytes(tmp_path, stack, user, proxy):
    """Reliability: loader killed (SIGKILL) mid-download, then restarted | the next load returns the right
    bytes; the leftover .part file is never used and no wrong file appears under the final name"""
    data = os.urandom(40 * MiB)
    n = model_name()
    stack.publish("models", n, data)
    big = cdn_big(stack, n)
    cache = tmp_path / "cache"
    first = start_loader(tmp_path / "first", stack, MODEL_CACHE_DIR=cache).start()
    try:
        assert first.login(user, PASSWORD).status_code == 200
        kill_mid_download(first, proxy, n, data)
    finally:
        first.stop()
    leftovers = files_under(cache)
    assert [f for f in leftovers if f.endswith(".part")], leftovers  # the kill did land mid-download
    assert final_file_is_right_or_absent(cache, n, big)

    proxy.reset_counts()
    with start_loader(tmp_path / "second", stack, MODEL_CACHE_DIR=cache) as second:
        assert second.login(user, PASSWORD).status_code == 200
        r = second.load(n, "models")
        assert r.status_code == 200 and sha256(r.content) == sha256(data)
        # All of it fetched afresh, nothing pieced onto the leftover .part.
        assert fetched_ranges(proxy, len(big)) == [(0, len(big))]
        assert second.cached_big_part("models", n).read_bytes() == big
        before = gets(proxy)
        assert second.load(n, "models").content == data  # and now served from the cache
        assert gets(proxy) == before


def test_crash_leftovers_do_not_fill_a_small_disk(tmp_path, stack, user, proxy):
    """Reliability: loader killed mid-download on a small cache disk, then restarted | the leftover
    preallocated .part file is swept at start, so the next load has room and succeeds"""
    # Larger than the first segment, so the stall in it holds the load mid-stream; the stall comes after the
    # first 4 MiB block, which the load checks and sends before it.
    with tmpfs(tmp_path / "cache", "32m") as disk:
        data = os.urandom(20 * MiB)
        n = model_name()
        stack.publish("models", n, data)
        first = start_loader(tmp_path / "first", stack, MODEL_CACHE_DIR=disk.path).start()
        try:
            assert first.login(user, PASSWORD).status_code == 200
            kill_mid_download(first, proxy, n, data, after=5 * MiB)
        finally:
            first.stop()
        assert [f for f in files_under(disk.path) if f.endswith(".part")]

        with start_loader(tmp_path / "second", stack, MODEL_CACHE_DIR=disk.path) as second:
            assert second.login(user, PASSWORD).status_code == 200
            r = second.load(n, "models")
            assert r.status_code == 200, (r.status_code, r.text[:200])
            assert r.content == data
        assert not [f for f in files_under(disk.path) if f.endswith(".part")]
