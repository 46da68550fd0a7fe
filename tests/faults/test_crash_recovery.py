"""The loader is killed (SIGKILL) in the middle of a CDN download and started again on the same cache."""

import os

import pytest
import requests

from devstack.wait import until
from tests.faults.conftest import (
    PASSWORD,
    MiB,
    block_span,
    fetched_ranges,
    files_under,
    model_name,
    recorded_blocks,
    resume_files,
    sha256,
    start_loader,
    the_one,
    tmpfs,
    wait_download,
)

pytestmark = pytest.mark.integration


def kill_mid_download(loader, proxy, name, data, after=4 * MiB):
    """Start a load, hold the CDN transfer of the object's start still after ``after`` bytes, read a
    little, wait until the download's record holds the object's first block (whole before the stall), and
    SIGKILL the loader. The client must then see a broken transfer, never a response that ends as if it were
    whole. (The object's end is fetched first and whole: the load checks it.)
    """
    proxy.stall_next(after, 60.0, method="GET", path=f"/models/{name}.big", starts=range(1))
    cache = loader.env["MODEL_CACHE_DIR"]
    with loader.load(name, "models", stream=True, timeout=30) as r:
        assert r.status_code == 200
        chunks = r.iter_content(64 * 1024)
        got = next(chunks)
        assert got == data[: len(got)]

        def first_block_recorded():
            records = resume_files(cache, "models", name, "record")
            return bool(records) and 0 in recorded_blocks(records[0])

        until(first_block_recorded, 30, lambda: f"block 0 never recorded: {files_under(cache)}", every=0.02)
        loader.kill()
        with pytest.raises(requests.RequestException):
            for chunk in chunks:
                got += chunk
        assert len(got) < len(data)
    # The held exchange would keep SeaweedFS writing into a stalled connection (which slows its other
    # readers of the object); cut it, as the dead loader's kernel would have. The proxy returns on its port.
    proxy.stop()
    proxy.start()


def gets(proxy):
    return sum(1 for seen in proxy.seen() if seen.method == "GET")


def cdn_big(stack, name):
    return stack.s3_admin_client().get_object(Bucket="models", Key=name + ".big")["Body"].read()


def final_file_is_right_or_absent(cache, name, expected):
    """No file under the final name ever holds other bytes than the CDN's big part."""
    final = cache / "models" / (name + ".big")
    return not final.exists() or final.read_bytes() == expected


def resumed(cache, name):
    """The leftover ``.part`` and ``.record`` of ``name`` a killed download left, and the blocks its record
    holds."""
    part = the_one(resume_files(cache, "models", name, "part"), "leftover .part")
    record = the_one(resume_files(cache, "models", name, "record"), "leftover .record")
    return part, record, recorded_blocks(record)


def overlaps(ranges, start, end):
    return any(first < end and start < last for first, last in ranges)


def test_sigkill_mid_download_then_restart_loads_the_right_bytes(tmp_path, stack, user, proxy):
    """Reliability: loader killed (SIGKILL) mid-download, then restarted | the next load returns the right
    bytes; the leftover .part is resumed: the blocks its record holds are hashed again, never fetched again,
    the others are fetched; no wrong file ever appears under the final name"""
    data = os.urandom(40 * MiB)
    n = model_name()
    stack.publish("models", n, data)
    big = cdn_big(stack, n)
    path = f"/models/{n}.big"
    cache = tmp_path / "cache"
    first = start_loader(tmp_path / "first", stack, MODEL_CACHE_DIR=cache).start()
    try:
        assert first.login(user, PASSWORD).status_code == 200
        kill_mid_download(first, proxy, n, data)
    finally:
        first.stop()
    part, record, held = resumed(cache, n)  # the kill did land mid-download, and left its record
    assert 0 in held and len(held) < -(-len(big) // (4 * MiB)), sorted(held)
    assert final_file_is_right_or_absent(cache, n, big)

    proxy.reset_counts()
    with start_loader(tmp_path / "second", stack, MODEL_CACHE_DIR=cache) as second:
        assert second.login(user, PASSWORD).status_code == 200
        r = second.load(n, "models")
        assert r.status_code == 200 and sha256(r.content) == sha256(data)
        assert final_file_is_right_or_absent(cache, n, big)
        # Pieced onto the leftover: what its record held is not fetched again, all the rest is.
        ranges = fetched_ranges(proxy, path, len(big))
        for index in range(-(-len(big) // (4 * MiB))):
            start, end = block_span(index, len(big))
            if index in held:
                assert not overlaps(ranges, start, end), (index, ranges, sorted(held))
            else:
                assert overlaps(ranges, start, end), (index, ranges, sorted(held))
        wait_download(second, "models", n)
        assert (cache / "models" / (n + ".big")).read_bytes() == big
        assert not part.exists() and not resume_files(cache, "models", n, "part")
        before = gets(proxy)
        assert second.load(n, "models").content == data  # and now served from the cache
        assert gets(proxy) == before


def test_crash_leftovers_do_not_fill_a_small_disk(tmp_path, stack, user, proxy):
    """Reliability: loader killed mid-download on a small cache disk, then restarted | the leftover
    preallocated .part is resumed in place, not doubled nor fetched again whole: the next load fits on a
    disk too small for two copies and succeeds with the right bytes"""
    # Larger than the first segment, so the stall in it holds the load mid-stream; the stall comes after the
    # first 4 MiB block, which the load checks and sends before it. 32 MiB: room for one 20 MiB part, not two.
    with tmpfs(tmp_path / "cache", "32m") as disk:
        data = os.urandom(20 * MiB)
        n = model_name()
        stack.publish("models", n, data)
        big = cdn_big(stack, n)
        small_disk = {"MODEL_CACHE_DIR": disk.path, "MODEL_CACHE_MIN_FREE_BYTES": MiB}
        first = start_loader(tmp_path / "first", stack, **small_disk).start()
        try:
            assert first.login(user, PASSWORD).status_code == 200
            kill_mid_download(first, proxy, n, data, after=5 * MiB)
        finally:
            first.stop()
        part, _, held = resumed(disk.path, n)
        assert held

        proxy.reset_counts()
        with start_loader(tmp_path / "second", stack, **small_disk) as second:
            assert second.login(user, PASSWORD).status_code == 200
            r = second.load(n, "models")
            assert r.status_code == 200, (r.status_code, r.text[:200])
            assert r.content == data
            wait_download(second, "models", n)
            sent = proxy.sent("GET", f"/models/{n}.big")
            assert 0 < sent < len(big), (
                f"the CDN sent {sent} of {len(big)} bytes: the leftover was not resumed"
            )
        assert (disk.path / "models" / (n + ".big")).read_bytes() == big
        assert not [f for f in files_under(disk.path) if f.endswith(".part")]
