"""Field transfers (contract section 8): a download survives a kill or a power cut and is resumed, not
fetched again; all CDN downloads keep to one bandwidth cap; the cache keeps to its disk budget; a model can
be staged ahead of need with POST /prefetch and watched on GET /downloads.

A download is interrupted at about its half by holding every GET of the object at that offset in the fault
proxy (``hold_at``: whatever the loader's segments and threads, exactly the bytes before it come), waiting
until the download's record (``<key>.<32 hex>.record`` beside its ``.part``: a JSON header line, then one
verified block index per line) holds every block before it, and killing the loader with SIGKILL.
"""

import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.wait import until
from tests.faults.conftest import (
    BLOCK,
    PASSWORD,
    MiB,
    Stream,
    block_span,
    cdn_object,
    covered,
    download_of,
    fetched_ranges,
    files_of,
    metric,
    model_name,
    recorded_blocks,
    resume_files,
    sha256,
    start_loader,
    tail_start,
    the_one,
    wait_download,
)

pytestmark = pytest.mark.integration

HOLD = 300.0  # seconds a held transfer waits: longer than any test, which kills the loader first
STATUS_KEYS = {"folder", "name", "state", "bytesDone", "bytesTotal", "bytesResumed", "error"}
CAP = 20_000_000  # bytes a second


@dataclass
class Interrupted:
    """A download killed with the loader at ``at`` bytes into its big part of ``size`` bytes."""

    name: str
    data: bytes
    size: int
    etag: str
    at: int
    cache: Path
    part: Path
    record: Path
    recorded: set
    during: dict | None  # its entry in GET /downloads while it was held

    @property
    def path(self):
        return f"/models/{self.name}.big"

    def held_bytes(self):
        """Bytes of the blocks the record holds."""
        return sum(end - start for start, end in (block_span(i, self.size) for i in self.recorded))


def interrupt(tmp_path, stack, user, proxy, data, *, prefetch=False):
    """Publish ``data``, start its cold download (a load read to the end, or a prefetch) on a loader whose
    cache is ``tmp_path/cache``, hold the transfer at the block boundary nearest its half, and SIGKILL the
    loader once the record holds every block before it. The proxy is restarted (the held exchanges cut, as
    the dead loader's kernel would) and its faults and counts cleared."""
    name = model_name("ft")
    stack.publish("models", name, data)
    size, etag = cdn_object(stack, "models", name)
    at = size // 2 // BLOCK * BLOCK
    cache = tmp_path / "cache"
    proxy.hold_at(at, HOLD, path=f"/models/{name}.big", until=tail_start(size))
    first = start_loader(tmp_path / "first", stack, MODEL_CACHE_DIR=cache).start()
    stream = None
    try:
        assert first.login(user, PASSWORD).status_code == 200
        if prefetch:
            r = first.post(f"/prefetch/{name}", json={"folder": "models"})
            assert r.status_code == 202, (r.status_code, r.text[:300])
        else:
            stream = Stream(first, name)
            stream.start()
        before_at = set(range(at // BLOCK))

        def held():
            records = resume_files(cache, "models", name, "record")
            return bool(records) and before_at <= recorded_blocks(records[0])

        until(
            held,
            60,
            lambda: (
                f"the record never held blocks 0..{at // BLOCK - 1}: "
                f"{files_of(cache, 'models', name)}; loader log: {first.log()[-3000:]}"
            ),
            every=0.05,
        )
        during = download_of(first, "models", name)
        first.kill()
    finally:
        first.stop()
        proxy.stop()
        proxy.start()
        proxy.clear_faults()
    if stream is not None:
        stream.result()
        # The client saw a broken transfer, never an answer that ends as if it were whole.
        assert stream.status == 200 and stream.error is not None and stream.size < len(data), (
            stream.status,
            stream.error,
            stream.size,
        )
    assert not (cache / "models" / (name + ".big")).exists()  # nothing under the final name
    part = the_one(resume_files(cache, "models", name, "part"), "leftover .part")
    record = the_one(resume_files(cache, "models", name, "record"), "leftover .record")
    proxy.reset_counts()
    return Interrupted(name, data, size, etag, at, cache, part, record, recorded_blocks(record), during)


def read_load(loader, name, folder="models", timeout=120):
    """A load read to its end: ``(status, SHA-256 of the body, its size)``; the body's text on an error."""
    stream = Stream(loader, name, folder, timeout)
    stream.run()
    assert stream.error is None, f"the load of {name} broke off after {stream.size} bytes: {stream.error}"
    return stream.status, stream.digest, stream.size


def assert_committed(stack, cache, name):
    """The part under its final name is the CDN's (the manifest's digest) and no .part of it is left."""
    final = cache / "models" / (name + ".big")
    assert final.exists(), files_of(cache, "models", name)
    assert sha256(final.read_bytes()) == stack.manifest("models", name)["big"]
    assert resume_files(cache, "models", name, "part") == []


def test_sigkill_at_half_then_restart_fetches_only_the_rest(tmp_path, stack, user, proxy):
    """Reliability: loader killed (SIGKILL) halfway through a cold 128 MiB download, then restarted on
    the same cache | the next load is byte-identical and the CDN sends at most 55 % of the big part again
    (the blocks the record holds are hashed, not fetched), every GET pinned to the ETag; GET /downloads
    shows the bytes resumed"""
    cut = interrupt(tmp_path, stack, user, proxy, os.urandom(128 * MiB))
    assert cut.during is not None and cut.during["state"] == "fetching", cut.during
    assert cut.during["bytesTotal"] == cut.size, cut.during
    assert cut.at <= cut.during["bytesDone"] < cut.size, cut.during

    with start_loader(tmp_path / "second", stack, MODEL_CACHE_DIR=cut.cache) as second:
        assert second.login(user, PASSWORD).status_code == 200
        status, digest, _ = read_load(second, cut.name)
        assert status == 200 and digest == sha256(cut.data)
        done = wait_download(second, "models", cut.name)
        sent = proxy.sent("GET", cut.path)
        assert sent <= 0.55 * cut.size, (
            f"the CDN sent {sent} of {cut.size} bytes ({sent / cut.size:.0%}) after the restart; "
            f"fetched {fetched_ranges(proxy, cut.path, cut.size)}; record held {sorted(cut.recorded)}"
        )
        assert done["bytesTotal"] == cut.size
        assert done["bytesResumed"] >= cut.at, done
        assert done["bytesResumed"] + sent >= cut.size, (done, sent)
        gets = [s for s in proxy.seen() if s.method == "GET" and s.path == cut.path]
        assert gets and all(s.headers.get("if-match", "").strip('"') == cut.etag for s in gets), [
            s.headers for s in gets
        ]
        assert_committed(stack, cut.cache, cut.name)


def test_power_cut_truncated_part_is_resumed_right(tmp_path, stack, user, proxy):
    """Reliability: power cut mid-download: the .part file cut short at a random length and the record's
    last line left without its newline | the blocks lost are fetched again; the load is byte-identical and
    the committed part is the CDN's"""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    cut = interrupt(tmp_path, stack, user, proxy, os.urandom(48 * MiB))
    length = rng.randrange(1, cut.at)
    os.truncate(cut.part, length)
    text = cut.record.read_bytes()
    cut.record.write_bytes(text[:-1] if text.endswith(b"\n") else text)

    with start_loader(tmp_path / "second", stack, MODEL_CACHE_DIR=cut.cache) as second:
        assert second.login(user, PASSWORD).status_code == 200
        status, digest, _ = read_load(second, cut.name)
        assert status == 200 and digest == sha256(cut.data), f"seed {seed}, .part cut at {length}"
        lost = block_span(length // BLOCK, cut.size)
        assert covered(fetched_ranges(proxy, cut.path, cut.size), *lost), (
            f"seed {seed}: the block {lost} cut off the .part at {length} was not fetched again: "
            f"{fetched_ranges(proxy, cut.path, cut.size)}"
        )
        wait_download(second, "models", cut.name)
        assert_committed(stack, cut.cache, cut.name)


def test_record_claiming_a_zeroed_block_fetches_it_again(tmp_path, stack, user, proxy):
    """Reliability: a block the download's record claims zeroed in the .part (a lost write) | the block is
    hashed before use, fails, and is fetched again; the other blocks the record holds are not; the load is
    byte-identical"""
    seed = random.randrange(2**32)
    cut = interrupt(tmp_path, stack, user, proxy, os.urandom(48 * MiB))
    index = random.Random(seed).choice(sorted(b for b in cut.recorded if b < cut.at // BLOCK))
    start, end = block_span(index, cut.size)
    with open(cut.part, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))

    with start_loader(tmp_path / "second", stack, MODEL_CACHE_DIR=cut.cache) as second:
        assert second.login(user, PASSWORD).status_code == 200
        status, digest, _ = read_load(second, cut.name)
        assert status == 200 and digest == sha256(cut.data), f"seed {seed}, block {index} zeroed"
        ranges = fetched_ranges(proxy, cut.path, cut.size)
        assert covered(ranges, start, end), f"block {index} ({start}-{end}) not fetched again: {ranges}"
        sent = proxy.sent("GET", cut.path)
        assert sent <= cut.size - cut.held_bytes() + (end - start), (
            f"the CDN sent {sent} bytes: more than the blocks the record did not hold plus block {index}; "
            f"fetched {ranges}; record held {sorted(cut.recorded)}"
        )
        wait_download(second, "models", cut.name)
        assert_committed(stack, cut.cache, cut.name)


def test_object_replaced_while_down_discards_the_old_part(tmp_path, stack, user, proxy):
    """Reliability: the CDN object (and its manifest) replaced by a new upload of the same name while the
    loader was down mid-download | the old .part and record are discarded, nothing of them is spliced in:
    the load gives the new model whole"""
    cut = interrupt(tmp_path, stack, user, proxy, os.urandom(48 * MiB))
    new = os.urandom(48 * MiB)  # the same size: only the digests tell the two apart
    stack.publish("models", cut.name, new)
    size, etag = cdn_object(stack, "models", cut.name)
    assert etag != cut.etag and size == cut.size

    with start_loader(tmp_path / "second", stack, MODEL_CACHE_DIR=cut.cache) as second:
        assert second.login(user, PASSWORD).status_code == 200
        status, digest, _ = read_load(second, cut.name)
        assert status == 200 and digest == sha256(new)
        done = wait_download(second, "models", cut.name)
        assert done["bytesResumed"] == 0, done
        assert not cut.part.exists() and not cut.record.exists(), files_of(cut.cache, "models", cut.name)
        assert_committed(stack, cut.cache, cut.name)


def test_bandwidth_cap_holds_a_cold_load_to_its_rate(tmp_path, stack, user, proxy):
    """Reliability: CDN_MAX_BYTES_PER_S=20000000 and a cold 256 MiB load | the load takes the big part's
    size over the cap, ± 10 % (256 MiB is 268 MB: 13.4 s); a warm load of the same model is not capped (at
    least four times the cap)

    The one wall-clock assertion of the suite: the cap is a rate, the issue asks for it as a test. The
    whole load is timed (login done before), so the API calls of the load count against it too.
    """
    data = os.urandom(256 * MiB)
    name = model_name("cap")
    stack.publish("models", name, data)
    size, _ = cdn_object(stack, "models", name)
    expected = size / CAP
    with start_loader(tmp_path / "loader", stack, CDN_MAX_BYTES_PER_S=CAP) as loader:
        assert loader.login(user, PASSWORD).status_code == 200
        start = time.monotonic()
        status, digest, _ = read_load(loader, name)
        cold = time.monotonic() - start
        assert status == 200 and digest == sha256(data)
        assert abs(cold - expected) <= 0.10 * expected, f"cold load {cold:.2f} s, cap says {expected:.2f} s"

        wait_download(loader, "models", name)
        start = time.monotonic()
        status, digest, _ = read_load(loader, name)
        warm = time.monotonic() - start
        assert status == 200 and digest == sha256(data)
        assert size / warm >= 4 * CAP, f"warm load {warm:.2f} s: {size / warm / 1e6:.0f} MB/s"


def test_bandwidth_cap_is_shared_by_concurrent_downloads(tmp_path, stack, user, proxy):
    """Reliability: CDN_MAX_BYTES_PER_S=20000000 and two cold 128 MiB loads of two models at once | they
    share the cap: both together take their two big parts over the cap (13.4 s), ± 10 %, not half of it"""
    models = {}
    for _ in range(2):
        name = model_name("cap2")
        models[name] = os.urandom(128 * MiB)
        stack.publish("models", name, models[name])
    total = sum(cdn_object(stack, "models", name)[0] for name in models)
    expected = total / CAP
    with start_loader(tmp_path / "loader", stack, CDN_MAX_BYTES_PER_S=CAP) as loader:
        assert loader.login(user, PASSWORD).status_code == 200
        streams = [Stream(loader, name) for name in models]
        start = time.monotonic()
        for s in streams:
            s.start()
        for s in streams:
            s.result(120)
        both = time.monotonic() - start
        for s in streams:
            assert s.error is None and s.status == 200 and s.digest == sha256(models[s.name]), (
                s.status,
                s.error,
            )
        assert abs(both - expected) <= 0.10 * expected, f"both loads {both:.2f} s, cap says {expected:.2f} s"


def budget_loader(tmp_path, stack, budget):
    return start_loader(tmp_path / "loader", stack, MODEL_CACHE_MAX_BYTES=budget)


def publish_models(stack, sizes):
    """``{key: (name, data)}`` of fresh models of ``sizes`` (key -> bytes), published."""
    models = {}
    for key, n in sizes.items():
        name = model_name(f"b{key.lower()}")
        data = os.urandom(n)
        stack.publish("models", name, data)
        models[key] = (name, data)
    return models


def load_whole(loader, models, key):
    """Load a model, check its bytes, and wait until its part is committed."""
    name, data = models[key]
    r = loader.load(name, "models")
    assert r.status_code == 200, (key, r.status_code, r.text[:300])
    assert sha256(r.content) == sha256(data), key
    wait_download(loader, "models", name)


def test_disk_budget_evicts_the_least_recently_loaded(tmp_path, stack, user, proxy):
    """Reliability: a cache budget (MODEL_CACHE_MAX_BYTES) of three models and a fourth loaded | the least
    recently loaded part is evicted (its files gone, the others kept, loader_cache_evictions_total 1); a
    warm load counts as a use"""
    models = publish_models(stack, dict.fromkeys("ABCD", 16 * MiB))
    size, _ = cdn_object(stack, "models", models["A"][0])
    budget = 3 * size + size // 2
    cache = tmp_path / "loader" / "cache"
    with budget_loader(tmp_path, stack, budget) as loader:
        assert loader.login(user, PASSWORD).status_code == 200
        for key in "ABC":
            load_whole(loader, models, key)
        # A loaded again (from the cache): B is now the least recently loaded.
        proxy.reset_counts()
        load_whole(loader, models, "A")
        assert proxy.count("GET", f"/models/{models['A'][0]}.big") == 0
        assert metric(loader, "loader_cache_evictions_total") == 0
        load_whole(loader, models, "D")
        assert files_of(cache, "models", models["B"][0]) == []
        for key in "ACD":
            assert models[key][0] + ".big" in files_of(cache, "models", models[key][0]), key
        assert metric(loader, "loader_cache_evictions_total") == 1
        room = loader.get("/downloads").json()["cache"]
        assert room["bytesMax"] == budget and 3 * size <= room["bytesUsed"] <= budget, room


def test_disk_budget_never_evicts_a_part_being_streamed(tmp_path, stack, user, proxy):
    """Reliability: loads that force evictions while a client streams a cached model slowly | the part
    being read is never evicted: the others go, least recently loaded first, and the slow stream ends
    byte-identical"""
    models = publish_models(stack, {"A": 64 * MiB, **dict.fromkeys("BCDEF", 16 * MiB)})
    big_a, _ = cdn_object(stack, "models", models["A"][0])
    size, _ = cdn_object(stack, "models", models["B"][0])
    budget = big_a + 2 * size + size // 2  # A, B and C fit; each of D, E and F needs an eviction
    cache = tmp_path / "loader" / "cache"
    name_a, data_a = models["A"]
    with budget_loader(tmp_path, stack, budget) as loader:
        assert loader.login(user, PASSWORD).status_code == 200
        for key in "ABC":
            load_whole(loader, models, key)
        got = bytearray()
        with loader.load(name_a, "models", stream=True, timeout=120) as r:
            assert r.status_code == 200
            chunks = r.iter_content(MiB)
            got += next(chunks)
            for key in "DEF":
                load_whole(loader, models, key)
                assert name_a + ".big" in files_of(cache, "models", name_a), f"A evicted for {key}"
                got += next(chunks)  # slowly: a MiB between loads
            for chunk in chunks:
                got += chunk
        assert sha256(bytes(got)) == sha256(data_a)
        for key in "BCD":
            assert files_of(cache, "models", models[key][0]) == [], key
        for key in "AEF":
            assert models[key][0] + ".big" in files_of(cache, "models", models[key][0]), key
        assert metric(loader, "loader_cache_evictions_total") == 3


def numbers_in(text):
    return [int(re.sub(r"[,_]", "", n)) for n in re.findall(r"\d[\d,_]*", text)]


def test_a_model_larger_than_the_budget_is_507_naming_the_bytes(tmp_path, stack, user, proxy):
    """Reliability: a model larger than the whole cache budget (MODEL_CACHE_MAX_BYTES) | 507 with a JSON
    detail naming the bytes needed and the bytes available, to /load and to /prefetch; nothing of it is
    left in the cache; a model that fits still loads"""
    models = publish_models(stack, {"L": 24 * MiB, "S": 4 * MiB})
    size, _ = cdn_object(stack, "models", models["L"][0])
    budget = 16 * MiB
    cache = tmp_path / "loader" / "cache"
    name, _ = models["L"]
    with budget_loader(tmp_path, stack, budget) as loader:
        assert loader.login(user, PASSWORD).status_code == 200
        for r in (loader.load(name, "models"), loader.post(f"/prefetch/{name}", json={"folder": "models"})):
            assert r.status_code == 507, (r.status_code, r.text[:300])
            detail = r.json()["detail"]
            numbers = numbers_in(detail)
            assert (
                "bytes" in detail and any(n >= size for n in numbers) and any(n <= budget for n in numbers)
            ), f"the 507's detail does not name the bytes needed ({size}) and available: {detail!r}"
            assert files_of(cache, "models", name) == []
        load_whole(loader, models, "S")


def test_prefetch_stages_a_model_the_load_then_takes_from_the_cache(tmp_path, stack, user, proxy):
    """Reliability: a model prefetched (POST /prefetch) over a capped link | 202 with its download status,
    GET /downloads shows it grow to cached; a second POST meanwhile joins it (the CDN sends the part once),
    one after it answers 200 cached; the load after it asks the CDN nothing and is byte-identical; a
    prefetch without a login is 401"""
    data = os.urandom(32 * MiB)
    name = model_name("pf")
    stack.publish("models", name, data)
    size, _ = cdn_object(stack, "models", name)
    path = f"/models/{name}.big"
    with start_loader(tmp_path / "loader", stack, CDN_MAX_BYTES_PER_S=10_000_000) as loader:
        r = loader.post(f"/prefetch/{name}", json={"folder": "models"})
        assert r.status_code == 401 and "detail" in r.json(), (r.status_code, r.text[:300])
        assert loader.login(user, PASSWORD).status_code == 200

        r = loader.post(f"/prefetch/{name}", json={"folder": "models"})
        assert r.status_code == 202, (r.status_code, r.text[:300])
        status = r.json()
        assert STATUS_KEYS <= set(status), status
        assert (status["folder"], status["name"], status["bytesTotal"]) == ("models", name, size), status
        assert status["state"] in ("fetching", "verifying"), status
        again = loader.post(f"/prefetch/{name}", json={"folder": "models"})
        assert again.status_code == 202 and again.json()["state"] != "cached", again.text[:300]

        seen = []

        def cached():
            entry = download_of(loader, "models", name)
            assert entry is not None and entry["state"] != "failed", entry
            seen.append(entry)
            return entry if entry["state"] == "cached" else None

        done = until(cached, 60, lambda: f"not cached within 60 s: {seen[-1:]}", every=0.1)
        progress = [e["bytesDone"] for e in seen if e["state"] == "fetching"]
        assert len({b for b in progress if 0 < b < size}) >= 2, progress
        assert progress == sorted(progress), progress
        assert all(e["bytesTotal"] == size for e in seen), seen
        assert done["bytesDone"] == size and not done["error"], done
        assert proxy.sent("GET", path) == size  # joined, never doubled

        third = loader.post(f"/prefetch/{name}", json={"folder": "models"})
        assert third.status_code == 200 and third.json()["state"] == "cached", third.text[:300]
        room = loader.get("/downloads").json()["cache"]
        assert {"bytesUsed", "bytesMax", "bytesFree"} <= set(room) and room["bytesUsed"] >= size, room

        proxy.reset_counts()
        status, digest, _ = read_load(loader, name)
        assert status == 200 and digest == sha256(data)
        assert proxy.count("GET", path) == 0, proxy.counts()


def test_prefetch_cut_by_a_kill_goes_on_by_itself_after_the_restart(tmp_path, stack, user, proxy):
    """Reliability: loader killed halfway through a prefetch, restarted and logged in, the prefetch not
    asked for again | it goes on by itself and ends cached (GET /downloads); the CDN sends only the blocks
    the record did not hold; the load after it is byte-identical from the cache"""
    cut = interrupt(tmp_path, stack, user, proxy, os.urandom(48 * MiB), prefetch=True)
    with start_loader(tmp_path / "second", stack, MODEL_CACHE_DIR=cut.cache) as second:
        assert second.login(user, PASSWORD).status_code == 200
        done = wait_download(second, "models", cut.name, timeout=120)
        assert done["bytesResumed"] >= cut.at, done
        sent = proxy.sent("GET", cut.path)
        assert sent <= cut.size - cut.held_bytes(), (
            f"the CDN sent {sent} bytes, the record held {cut.held_bytes()} of {cut.size}: "
            f"{fetched_ranges(proxy, cut.path, cut.size)}"
        )
        assert_committed(stack, cut.cache, cut.name)
        proxy.reset_counts()
        status, digest, _ = read_load(second, cut.name)
        assert status == 200 and digest == sha256(cut.data)
        assert proxy.count("GET", cut.path) == 0, proxy.counts()
