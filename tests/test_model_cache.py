"""model_cache: the cache is the loader's own: whatever it meets on its disk that it cannot use (a damaged
sidecar, a symbolic link, a FIFO, a folder where a file goes) costs at most a download, never a failed or hung
load, and nothing outside the cache root is ever written or deleted; hits and misses, a changed or stale part
fetched again, concurrent and offline loads, a download joined only while it is under way, and the disk
budget. Against moto's S3 and the in-memory API."""

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

import heap
import main
import model_cache
from cdn_manager import ObjectInfo
from constants import MAX_SIDECAR_BYTES
from devstack import wait
from devstack.wait import until
from download import Download, TransferConfig
from errors import (
    StorageError,
    UpstreamError,
)
from model_cache import BigPartCache, Expect
from tests.store_fakes import (
    BLOCK,
    EndAfter,
    _streaming,
    ended,
    go_offline,
    load,
    make_store,
    publish,
)

SIZE = 5 * BLOCK + 5000  # a big part of six blocks, the last one short
BOUND = 20  # seconds a load may take here before it counts as hung


def bounded(call, timeout=BOUND):
    """``call()``'s result; a load that hangs (in an open() of a FIFO, say) fails the test instead."""
    return wait.bounded(call, timeout, "the load did not end")


def release_fifo(path):
    """Let an open() that blocks on the FIFO at ``path`` (the old code's) go on, so no thread stays stuck."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no FIFO any more, or nobody waiting on it


def snapshot(root):
    """Every entry below ``root``: its kind, and a file's bytes or a link's target."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(root))] = ("file", p.read_bytes())
        else:
            out[str(p.relative_to(root))] = ("dir", None)
    return out


def format1(tmp_path, s3, size=SIZE):
    """(store, api, cache, data, big) with a format-1 model loaded once: its part is in the cache."""
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(size)
    big = publish(s3, api, data)
    assert load(store) == data
    assert cache.settle(10)
    return store, api, cache, data, big


def sealed(tmp_path, s3):
    """(store, api, cache, data, big) with a sealed model uploaded: its part is in the cache."""
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(SIZE)
    up = store.begin_upload("m.bin")
    up.write(data)
    up.finish("models")
    big = s3.get_object(Bucket="models", Key="m.bin.big")["Body"].read()
    assert os.path.exists(cache.path("models", "m.bin.big.meta"))
    return store, api, cache, data, big


def sidecar(cache):
    return Path(cache.path("models", "m.bin.big.meta"))


def digests(big, block_size):
    return [hashlib.sha256(big[i : i + block_size]).hexdigest() for i in range(0, len(big), block_size)]


def assert_cached_afresh(cache, big, block_size=BLOCK):
    """The part and a sound sidecar are in the cache again, as regular files."""
    assert cache.settle(10)
    part, meta = Path(cache.path("models", "m.bin.big")), sidecar(cache)
    for p in (part, meta):
        assert stat.S_ISREG(os.lstat(p).st_mode), p
    assert part.read_bytes() == big
    written = json.loads(meta.read_text())
    assert written["blockSize"] == block_size and written["blocks"] == digests(big, block_size)


# --- sidecars that cannot be used -------------------------------------------------------------------


def test_a_format1_sidecar_for_another_block_size_is_discarded_and_fetched_again(tmp_path, s3, caplog):
    """The sidecar names blocks of twice the size (with the right digests of those blocks): the old code
    took it, checked the part's end against it with its own block size, and ran off the end of its digests
    (IndexError: a 500 on every load, until someone deleted the file)."""
    store, api, cache, data, big = format1(tmp_path, s3)
    meta = json.loads(sidecar(cache).read_text())
    meta.update(blockSize=2 * BLOCK, blocks=digests(big, 2 * BLOCK))
    sidecar(cache).write_text(json.dumps(meta))
    caplog.set_level(logging.WARNING, logger="loader.cdn")
    assert load(store) == data
    assert (cache.downloads, cache.refetches) == (2, 1)
    assert f"is for blocks of {2 * BLOCK} bytes, not {BLOCK}" in caplog.text
    assert_cached_afresh(cache, big)
    assert load(store) == data and cache.hits == 1


def test_a_sealed_sidecar_of_its_version_with_another_block_size_is_discarded(tmp_path, s3, caplog):
    store, api, cache, data, big = sealed(tmp_path, s3)
    meta = json.loads(sidecar(cache).read_text())
    meta.update(blockSize=2 * BLOCK, blocks=digests(big, 2 * BLOCK))
    sidecar(cache).write_text(json.dumps(meta))
    caplog.set_level(logging.WARNING, logger="loader.cdn")
    assert load(store) == data
    assert (cache.downloads, cache.refetches) == (1, 1)
    assert "damaged" in caplog.text
    assert_cached_afresh(cache, big)


def _edit(**fields):
    def edit(meta):
        meta.update(fields)
        return json.dumps(meta).encode()

    return edit


DAMAGED = {
    "not JSON": lambda meta: b"\x00\xff{not json",
    "not UTF-8": lambda meta: json.dumps(meta).encode().replace(b'"size"', b'"\xff\xfe"'),
    "empty": lambda meta: b"",
    "a JSON list": lambda meta: json.dumps([meta]).encode(),
    "nested too deep": lambda meta: b"[" * 200_000 + b"]" * 200_000,
    "size infinite": lambda meta: json.dumps(meta).encode().replace(b'"size": ', b'"size": 1e400, "x": '),
    "size negative": _edit(size=-1, blocks=[]),
    "size huge": _edit(size=2**70, blockSize=2**70),
    "size a string": lambda meta: _edit(size=str(meta["size"]))(meta),
    "size a float": lambda meta: _edit(size=float(meta["size"]))(meta),
    "size a bool": _edit(size=True, blocks=[hashlib.sha256(b"x").hexdigest()]),
    "blockSize a bool": _edit(blockSize=True),
    "blockSize zero": _edit(blockSize=0),
    "blockSize a string": _edit(blockSize=str(BLOCK)),
    "blockSize huge": lambda meta: _edit(blockSize=2**62, blocks=meta["blocks"][:1])(meta),
    "etag not a string": _edit(etag=123),
    "version a number": _edit(version=7),
    "blocks missing": lambda meta: json.dumps({k: v for k, v in meta.items() if k != "blocks"}).encode(),
    "blocks not hex": lambda meta: _edit(blocks=["zz" * 32] * len(meta["blocks"]))(meta),
    "blocks too short": lambda meta: _edit(blocks=[d[:10] for d in meta["blocks"]])(meta),
    "blocks not strings": lambda meta: _edit(blocks=[1] * len(meta["blocks"]))(meta),
}


@pytest.mark.parametrize("how", DAMAGED)
def test_a_damaged_sidecar_is_discarded_and_the_part_fetched_again(tmp_path, s3, caplog, how):
    """Garbage and absurd numbers: never a 500 (the old code raised RecursionError or OverflowError on some,
    took strings and floats for numbers, and left the others where they were): the part is discarded and
    fetched again, with a warning."""
    store, api, cache, data, big = format1(tmp_path, s3)
    meta = json.loads(sidecar(cache).read_text())
    sidecar(cache).write_bytes(DAMAGED[how](meta))
    caplog.set_level(logging.WARNING, logger="loader.cdn")
    assert load(store) == data
    assert (cache.downloads, cache.refetches) == (2, 1)
    assert "is damaged" in caplog.text
    assert_cached_afresh(cache, big)


def test_a_sidecar_over_the_cap_is_discarded_and_the_part_fetched_again(tmp_path, s3, caplog):
    """A sidecar larger than MAX_SIDECAR_BYTES is not read (here a sound one, padded with blanks past the
    cap): the old code read it whole and used it."""
    store, api, cache, data, big = format1(tmp_path, s3)
    padded = sidecar(cache).read_bytes() + b" " * MAX_SIDECAR_BYTES
    sidecar(cache).write_bytes(padded)
    caplog.set_level(logging.WARNING, logger="loader.cdn")
    assert load(store) == data
    assert (cache.downloads, cache.refetches) == (2, 1)
    assert f"is larger than {MAX_SIDECAR_BYTES} bytes" in caplog.text
    assert_cached_afresh(cache, big)


def test_a_sidecar_of_another_version_is_only_stale(tmp_path, s3, caplog):
    """A sealed part's sidecar that names another manifest (and so another block size) is replaced by the
    fetch, not counted as damaged."""
    store, api, cache, data, big = sealed(tmp_path, s3)
    meta = json.loads(sidecar(cache).read_text())
    meta.update(version="another", blockSize=2 * BLOCK, blocks=digests(big, 2 * BLOCK))
    sidecar(cache).write_text(json.dumps(meta))
    caplog.set_level(logging.WARNING, logger="loader.cdn")
    assert load(store) == data
    assert (cache.downloads, cache.refetches) == (1, 0)
    assert "damaged" not in caplog.text
    assert_cached_afresh(cache, big)


# --- what stands where a file of the cache goes --------------------------------------------------


def make_fifo(path):
    os.unlink(path)
    os.mkfifo(path)


def make_folder(path):
    os.unlink(path)
    os.mkdir(path)
    (Path(path) / "inside").write_bytes(b"x")


def make_link(path):
    """A link to a copy of the file, outside the cache (a sound file: the old code followed it)."""
    outside = Path(path).parent.parent.parent / ("outside-" + os.path.basename(path))
    shutil.copyfile(path, outside)
    os.unlink(path)
    os.symlink(outside, path)
    return outside


KINDS = {"a FIFO": make_fifo, "a folder": make_folder, "a symbolic link": make_link}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["m.bin.big", "m.bin.big.meta"])
@pytest.mark.parametrize("fmt", ["sealed", "format 1"])
def test_what_is_no_regular_file_in_the_cache_is_fetched_again_never_hangs(tmp_path, s3, fmt, which, kind):
    """A FIFO where the part or its sidecar goes hung the old code's load in open() for good; a folder there
    made every commit fail; a link was followed out of the cache. Each is now a damaged part: removed (a link
    itself, never its target) and fetched again, within a bound."""
    store, api, cache, data, big = (sealed if fmt == "sealed" else format1)(tmp_path, s3)
    path = cache.path("models", which)
    outside = KINDS[kind](path)
    kept = outside.read_bytes() if outside is not None else None
    try:
        assert bounded(lambda: load(store)) == data
    finally:
        release_fifo(path)
    assert cache.downloads == (1 if fmt == "sealed" else 2)
    assert_cached_afresh(cache, big)
    assert bounded(lambda: load(store)) == data and cache.hits == 1
    if outside is not None:
        assert outside.read_bytes() == kept  # the link's target is untouched


def outside_folder(tmp_path, cache, bucket="models", damage=True):
    """Move the cache's folder of ``bucket`` (its cached part damaged) out of the cache, link it back in its
    place, and add a file and a leftover .part file beside: (its path, what it holds)."""
    target = tmp_path / f"outside-{bucket.strip('.')}"
    folder = Path(cache.root, bucket)
    if folder.exists():
        shutil.move(folder, target)
    else:
        target.mkdir()
    big = target / "m.bin.big"
    if damage and big.exists():
        raw = bytearray(big.read_bytes())
        raw[len(raw) // 2] ^= 0x01  # the old code discarded it: deleted, through the link
        big.write_bytes(bytes(raw))
    (target / "keep.txt").write_bytes(b"not the loader's")
    (target / "m.bin.big.0123.part").write_bytes(b"not the loader's either")
    folder.symlink_to(target, target_is_directory=True)
    return target, snapshot(target)


@pytest.mark.parametrize("fmt", ["sealed", "format 1"])
def test_a_symlinked_bucket_folder_is_replaced_and_nothing_outside_the_cache_is_touched(tmp_path, s3, fmt):
    store, api, cache, data, big = (sealed if fmt == "sealed" else format1)(tmp_path, s3)
    target, before = outside_folder(tmp_path, cache)
    # A loader started on this cache sweeps it (no .part file behind the link goes), then loads.
    store, _, cache = make_store(tmp_path, s3, api=api)
    assert bounded(lambda: load(store)) == data
    assert_cached_afresh(cache, big)
    folder = Path(cache.root, "models")
    assert folder.is_dir() and not folder.is_symlink()
    assert snapshot(target) == before
    assert load(store) == data and cache.hits == 1


def test_an_upload_through_symlinked_folders_writes_nothing_outside_the_cache(tmp_path, s3):
    """The staging folder and the bucket's folder both links out of the cache: the upload's staging file,
    its commit and the discard of the old part all stay inside."""
    store, api, cache, data, big = sealed(tmp_path, s3)
    target, before = outside_folder(tmp_path, cache)
    staging, staged_before = outside_folder(tmp_path, cache, ".staging")
    new = os.urandom(SIZE)
    up = store.begin_upload("m.bin")
    up.write(new)
    assert up.finish("models") == len(new)
    assert snapshot(target) == before and snapshot(staging) == staged_before
    for name in ("models", ".staging"):
        assert not Path(cache.root, name).is_symlink()
    assert load(store) == new and cache.hits == 1


def test_a_discard_never_deletes_through_a_symlinked_folder(tmp_path, s3):
    store, api, cache, data, big = sealed(tmp_path, s3)
    target, before = outside_folder(tmp_path, cache, damage=False)
    cache.discard("models", "m.bin.big")
    assert snapshot(target) == before
    assert not Path(cache.root, "models").is_symlink()


def test_a_fifo_leftover_is_swept_without_blocking_and_links_are_not_followed(tmp_path):
    from model_cache import BigPartCache

    root = tmp_path / "cache"
    (root / "models").mkdir(parents=True)
    os.mkfifo(root / "models" / "m.bin.big.0123.part")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "x.big.0123.part").write_bytes(b"not the loader's")
    (root / "linked").symlink_to(target, target_is_directory=True)
    bounded(lambda: BigPartCache(root))
    assert not (root / "models" / "m.bin.big.0123.part").exists()
    assert (target / "x.big.0123.part").read_bytes() == b"not the loader's"


# --- leftovers at start (contract section 8.1) ---------------------------------------------------


HEX = "0123456789abcdef" * 2  # the middle of a download's file names


def test_the_sweep_keeps_a_part_with_its_record_and_removes_a_lone_part_or_record(tmp_path):
    from model_cache import BigPartCache

    folder = tmp_path / "cache" / "models"
    folder.mkdir(parents=True)
    names = {
        "pair": (f"a.big.{HEX}.part", f"a.big.{HEX}.record"),
        "lone part": (f"b.big.{HEX}.part",),
        "lone record": (f"c.big.{HEX}.record",),
        "upload's part": ("d.big.0123.part",),
        "cached": ("e.big", "e.big.meta"),
    }
    for group in names.values():
        for name in group:
            (folder / name).write_bytes(b"x")
    BigPartCache(tmp_path / "cache")
    left = {p.name for p in folder.iterdir()}
    assert left == set(names["pair"]) | set(names["cached"])


# --- the disk budget (contract section 8.3) ------------------------------------------------------


def budgeted(tmp_path, s3, max_bytes, **options):
    """A store whose cache keeps within ``max_bytes`` (and asks nothing of the free space)."""
    config = TransferConfig(cache_max_bytes=max_bytes, cache_min_free=0)
    return make_store(tmp_path, s3, cache_options={"config": config}, **options)


def cached(cache, name):
    return os.path.exists(cache.path("models", name + ".big")), os.path.exists(
        cache.path("models", name + ".big.meta")
    )


def three_models(s3, api):
    """Three format-1 models of SIZE bytes: {name: plaintext}, and the size of each big part."""
    models = {name: os.urandom(SIZE) for name in ("a.bin", "b.bin", "c.bin")}
    sizes = {len(publish(s3, api, data, name)) for name, data in models.items()}
    (big,) = sizes
    return models, big


def test_the_least_recently_loaded_part_is_evicted_when_a_download_needs_room(tmp_path, s3):
    store, api, cache = budgeted(tmp_path, s3, 0)
    models, big = three_models(s3, api)
    cache.disk.max_bytes = 2 * big + 2 * 4096  # two parts and their sidecars, never three
    for name in ("a.bin", "b.bin", "a.bin"):  # a is loaded last: b is the least recently loaded
        assert load(store, name) == models[name]
        ended(cache)
    assert cache.downloads == 2 and cache.hits == 1
    assert load(store, "c.bin") == models["c.bin"]
    ended(cache)
    assert cached(cache, "b.bin") == (False, False) and cache.evictions == 1
    assert cached(cache, "a.bin") == (True, True) and cached(cache, "c.bin") == (True, True)
    assert cache.usage()["bytesUsed"] <= cache.disk.max_bytes
    assert load(store, "a.bin") == models["a.bin"] and cache.hits == 2


def test_a_part_being_streamed_is_never_evicted(tmp_path, s3):
    store, api, cache = budgeted(tmp_path, s3, 0)
    models, big = three_models(s3, api)
    cache.disk.max_bytes = big + 4096  # one part and its sidecar
    assert load(store, "a.bin") == models["a.bin"]
    ended(cache)
    plaintext = store.load("models", "a.bin")  # a warm load of a, streaming
    chunks = iter(plaintext)
    first = bytes(next(chunks))
    with pytest.raises(StorageError, match=r"no room in the model cache for models/b\.bin\.big: it needs"):
        store.load("models", "b.bin")
    assert cached(cache, "a.bin") == (True, True) and cache.evictions == 0
    assert first + b"".join(bytes(c) for c in chunks) == models["a.bin"]
    del plaintext, chunks
    assert load(store, "b.bin") == models["b.bin"]  # a's stream has ended: a may go now
    ended(cache)
    assert cached(cache, "a.bin") == (False, False) and cache.evictions == 1


def test_a_part_being_downloaded_is_never_evicted(tmp_path, s3):
    release = threading.Event()
    store, api, cache = budgeted(tmp_path, s3, 0, download_client=EndAfter(s3, release, "bytes=0-"))
    models, big = three_models(s3, api)
    cache.disk.max_bytes = big + 4096
    plaintext = store.load("models", "a.bin")  # its download is held in flight
    chunks = iter(plaintext)
    first = bytes(next(chunks))
    with pytest.raises(StorageError, match="no room in the model cache"):
        store.load("models", "b.bin")
    assert cache.evictions == 0 and len(list(Path(cache.root).rglob("a.bin.big.*.part"))) == 1
    release.set()
    assert first + b"".join(bytes(c) for c in chunks) == models["a.bin"]
    ended(cache)
    assert cached(cache, "a.bin") == (True, True)


def test_a_part_larger_than_the_budget_is_refused_with_the_bytes(tmp_path, s3):
    memory = heap.Budget(64 * BLOCK)
    store, api, cache = budgeted(tmp_path, s3, 0, memory=memory)
    models, big = three_models(s3, api)
    cache.disk.max_bytes = big - 1
    with pytest.raises(StorageError) as refused:
        store.load("models", "a.bin")
    assert f"it needs {big} bytes, {big - 1} are available" in refused.value.detail
    assert main.status_of(refused.value) == 507
    with pytest.raises(StorageError, match="no room"):
        store.prefetch("models", "a.bin")
    assert cache.downloads == 0 and not list(Path(cache.root).rglob("*.part"))
    assert memory.left == memory.total  # the download's first buffer went back
    assert cache.usage() == {"bytesUsed": 0, "bytesMax": big - 1, "bytesFree": big - 1}


def upload(store, name, data):
    up = store.begin_upload(name)
    up.write(data)
    up.finish("models")


def test_an_upload_s_part_joins_the_cache_within_its_budget(tmp_path, s3):
    """An upload's size is known only once it is staged: its commit evicts the least recently loaded parts
    until the cache fits its budget again (the soak found uploads taking the cache over it)."""
    store, api, cache = budgeted(tmp_path, s3, 0)
    models, big = three_models(s3, api)
    for name in ("a.bin", "b.bin"):
        assert load(store, name) == models[name]
        ended(cache)
    cache.disk.max_bytes = 2 * big + 2 * 4096  # two parts and their sidecars, never three
    data = os.urandom(SIZE)
    upload(store, "d.bin", data)
    assert cached(cache, "d.bin") == (True, True)  # the newest
    assert cached(cache, "a.bin") == (False, False)  # the least recently loaded, evicted
    assert cached(cache, "b.bin") == (True, True)
    assert cache.evictions == 1 and cache.disk.usage() <= cache.disk.max_bytes


def test_an_upload_larger_than_the_budget_is_not_kept_in_the_cache(tmp_path, s3):
    store, api, cache = budgeted(tmp_path, s3, 0)
    models, big = three_models(s3, api)
    assert load(store, "a.bin") == models["a.bin"]
    ended(cache)
    cache.disk.max_bytes = big + 4096  # a's part fits, d's never can
    data = os.urandom(2 * SIZE)
    upload(store, "d.bin", data)  # the upload itself succeeds
    assert cached(cache, "d.bin") == (False, False)
    assert cached(cache, "a.bin") == (True, True)  # nothing evicted for a part that can never fit
    with pytest.raises(StorageError, match="no room"):  # and a load of it is the clear 507
        store.load("models", "d.bin")


def test_load_fills_the_cache_then_hits_it(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(200_000)
    publish(s3, api, data)
    assert load(store) == data
    assert cache.settle(10)  # the load ends with its last byte; the commit follows
    assert (cache.misses, cache.hits, cache.downloads) == (1, 0, 1)
    assert load(store) == data
    assert (cache.misses, cache.hits, cache.downloads) == (1, 1, 1)


def listed_after_it_ends(release):
    """A Download class whose thread lingers after its commit until ``release``: the moment a download that
    has ended is still listed, held open."""

    class ListedAfterItEnds(Download):
        def run(self, fd, cdn):
            super().run(fd, cdn)
            assert release.wait(30)

    return ListedAfterItEnds


def deleted_after_its_commit(tmp_path, s3, release):
    """(store, api, cache, data) after a load whose download committed and stays listed until ``release``
    is set, with the cached part and its sidecar deleted since (an operator clearing the cache)."""
    store, api, cache = make_store(tmp_path, s3, cache_options={"download": listed_after_it_ends(release)})
    data = os.urandom(200_000)
    publish(s3, api, data)
    assert load(store) == data
    committed = cache.downloading("models", "m.bin.big")
    until(lambda: committed.done)
    assert committed.failure is None and cache.downloading("models", "m.bin.big") is committed
    for name in ("m.bin.big.meta", "m.bin.big"):
        os.unlink(cache.path("models", name))
    return store, api, cache, data


def test_a_cache_file_deleted_just_after_its_download_committed_is_fetched_again(tmp_path, s3):
    """The soak found a 500 (FileNotFoundError): a load after the cached part was deleted (an operator
    clearing the cache; the soak's cold loads) found the download that had just committed it still listed,
    joined it, and opened the deleted file. A download that has ended is never joined: the load fetches
    afresh."""
    release = threading.Event()
    store, api, cache, data = deleted_after_its_commit(tmp_path, s3, release)
    assert load(store) == data
    assert cache.downloads == 2
    release.set()
    assert cache.settle(10)


@pytest.mark.parametrize("where", ["last", "middle"])
def test_a_changed_cache_byte_is_detected_and_refetched(tmp_path, s3, where):
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(100_000)
    publish(s3, api, data)
    load(store)
    assert cache.settle(10)
    path = cache.path("models", "m.bin.big")
    raw = bytearray(open(path, "rb").read())
    i = len(raw) - 1 if where == "last" else len(raw) // 2
    raw[i] ^= 0x55
    open(path, "wb").write(raw)
    assert load(store) == data
    assert cache.downloads == 2


def test_stale_cache_is_refreshed(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    publish(s3, api, b"old" * 5000)
    assert load(store) == b"old" * 5000
    publish(s3, api, b"new" * 6000)
    assert load(store) == b"new" * 6000
    assert cache.downloads == 2


def test_offline_uses_the_verified_cache_only(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(50_000)
    publish(s3, api, data)
    load(store)
    assert cache.settle(10)
    go_offline(api)
    assert load(store) == data
    cache.discard("models", "m.bin.big")
    with pytest.raises(UpstreamError):
        store.load("models", "m.bin")


def test_the_downloads_listed_are_those_under_way_and_the_last_that_ended(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    names = [f"m{i}.bin" for i in range(model_cache.ENDED_KEPT + 2)]
    for name in names:
        size = len(publish(s3, api, os.urandom(1000), name))
        load(store, name)
        ended(cache)
    listed = cache.transfers()
    assert [s["name"] for s in listed] == names[-model_cache.ENDED_KEPT :]
    assert {(s["state"], s["bytesDone"], s["bytesTotal"]) for s in listed} == {("cached", size, size)}


def test_the_cache_works_where_the_filesystem_refuses_o_direct(tmp_path, s3):
    refused = []

    def no_direct(path, flags, *args):
        """os.open on a filesystem that refuses O_DIRECT."""
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "O_DIRECT refused")
        return os.open(path, flags, *args)

    store, api, cache = make_store(tmp_path, s3, cache_options={"opener": no_direct})
    data = os.urandom(300_000)
    big = publish(s3, api, data)
    assert load(store) == data
    assert cache.settle(10)
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big
    assert load(store) == data and (cache.hits, cache.downloads) == (1, 1)
    assert refused  # the cache and its download asked for O_DIRECT, and went on without it


def test_a_download_that_commits_as_a_load_opens_it_with_its_part_deleted_is_fetched_again(tmp_path, s3):
    """A load opens the download it found under way; if that commits in the very moment and the cached
    part is deleted right after (the cache cleared), the load fetches it afresh, as one a moment later
    would, instead of failing on the missing file."""
    opened = []

    class CommitsAsItIsOpened(Download):
        def open_reader(self):
            if not opened:  # the first download only: it commits, then its part is deleted
                opened.append(self)
                until(lambda: self.done)
                for name in ("m.bin.big.meta", "m.bin.big"):
                    os.unlink(self.cache.path("models", name))
            return super().open_reader()

    store, api, cache = make_store(tmp_path, s3, cache_options={"download": CommitsAsItIsOpened})
    data = os.urandom(200_000)
    publish(s3, api, data)
    assert load(store) == data
    assert opened[0].failure is None and cache.downloads == 2
    assert cache.settle(10)


def test_a_commit_goes_through_when_the_old_sidecar_goes_away_as_it_commits(tmp_path):
    """A commit removes the old sidecar first; a discard (a load that found a bad block, an upload) or
    another commit of the part may remove it in that very moment. The commit looked whether it existed,
    then met FileNotFoundError unlinking it and failed: a download failed for nothing (fetched again
    later), or an upload warned that it could not keep its part in the cache."""

    def discard_first(path):
        cache.discard("models", "m.bin.big")  # lands between the commit's look and its unlink
        os.unlink(path)

    cache = BigPartCache(str(tmp_path), block_size=4, unlink=discard_first)
    for version, data in enumerate((b"old!", b"new!")):
        part = cache.new_part("models", "m.bin.big")
        open(part, "wb").write(data)
        cache.commit(
            "models", "m.bin.big", part, ObjectInfo(4, f'"{version}"'), None, [hashlib.sha256(data).digest()]
        )
    assert open(cache.path("models", "m.bin.big"), "rb").read() == b"new!"
    assert json.load(open(cache.path("models", "m.bin.big.meta")))["etag"] == '"1"'


def test_a_chunk_kept_past_the_next_one_fails_loudly(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    big = publish(s3, api, os.urandom(300_000))
    for _ in range(2):  # while it downloads, then from the cache
        _, chunks = cache.open("models", "m.bin.big", store.cdn(), Expect("models/m.bin"))
        first = next(chunks)
        n = len(first)
        assert bytes(first) == big[:n]
        second = next(chunks)
        with pytest.raises(ValueError):
            bytes(first)  # its buffer now holds the second chunk: the old view is released
        assert bytes(second) == big[n : n + len(second)]
        chunks.close()
        assert cache.settle(10)
    assert cache.hits == 1


def in_background(call):
    """``call`` on a thread of its own; the list it leaves its result (or exception) in."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except Exception as exc:  # noqa: BLE001 - what the caller met
            outcome.append(exc)

    threading.Thread(target=run, daemon=True).start()
    return outcome


def test_offline_follows_a_download_still_in_flight(tmp_path, s3):
    store, api, cache, chunks, big, data, first, calls, release = _streaming(tmp_path, s3)
    go_offline(api)
    offline = in_background(lambda: load(store))
    until(lambda: cache.misses == 2)  # it follows the download, not committed yet
    assert not offline
    release.set()
    until(lambda: offline)
    assert offline == [data]
    chunks.close()
    assert cache.settle(10) and cache.downloads == 1
    assert load(store) == data and cache.hits == 1


def test_offline_a_download_that_has_ended_is_not_followed(tmp_path, s3):
    """Offline, a load followed the listed download even once it had ended, as _fetch no longer does: with
    the cached part deleted since its commit it opened the missing file (a 507 for a CDN that is down)."""
    release = threading.Event()
    store, api, cache, _ = deleted_after_its_commit(tmp_path, s3, release)
    go_offline(api)
    with pytest.raises(UpstreamError):
        store.load("models", "m.bin")
    release.set()
    assert cache.settle(10)


def test_a_part_discarded_in_flight_is_never_committed(tmp_path, s3):
    store, api, cache, chunks, big, data, first, calls, release = _streaming(tmp_path, s3)
    cache.discard("models", "m.bin.big")
    release.set()
    assert first + b"".join(bytes(c) for c in chunks) == data  # it finishes for its load
    assert cache.settle(10)
    assert not list((tmp_path / "cache").rglob("m.bin.big*"))  # no part, no record, no cache file, no sidecar


def test_a_newer_version_is_not_overwritten_by_an_older_download(tmp_path, s3):
    # the older download is held in flight until the newer one has committed
    store, api, cache, chunks, old_big, old, first, calls, release = _streaming(tmp_path, s3)
    big = publish(s3, api, b"new" * 60_000)
    assert load(store) == b"new" * 60_000
    assert cache.settle(0.1) is False  # the older one is still in flight
    release.set()
    assert first + b"".join(bytes(c) for c in chunks) == old  # it finishes for its load...
    assert cache.settle(10) and cache.downloads == 2
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big  # ...and never lands
    assert load(store) == b"new" * 60_000 and cache.hits == 1


def test_concurrent_loads_share_one_download(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(2_000_000)
    publish(s3, api, data)
    results, gate = [], threading.Barrier(8)

    def worker():
        gate.wait()
        results.append(load(store))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [data] * 8
    assert cache.downloads == 1
