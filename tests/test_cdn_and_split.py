"""cdn_manager and binary_split against moto's in-process S3 and an in-memory Resource API."""

import base64
import errno
import fcntl
import gc
import hashlib
import json
import logging
import mmap
import os
import threading

import pytest

import aligned_io
import model_cache
import security
from binary_split import LOAD_BUFFERS, small_size, validate_folder, validate_name
from cdn_manager import CdnConfig, CdnManager, ObjectInfo
from constants import CDN_ATTEMPTS, CDN_RESUMES
from devstack.wait import until
from download import TAIL, Download, TransferConfig, segments, tail_start
from errors import (
    BadRequest,
    DecryptionError,
    Forbidden,
    IntegrityError,
    NotFound,
    PayloadTooLarge,
    StorageError,
    UpstreamError,
)
from heap import Budget
from model_cache import BigPartCache, Expect
from tests.fakes import DROP, ApiServer
from tests.store_fakes import (
    BLOCK,
    MIB,
    YAML,
    EndAfter,
    FlakyClient,
    ended,
    go_offline,
    load,
    make_store,
    publish,
)


def test_config_from_yaml_hides_secrets():
    cfg = CdnConfig.from_yaml(YAML)
    assert cfg.downloader == ("dk", "ds-secret") and cfg.uploader == ("uk", "us-secret")
    assert "secret" not in repr(cfg)
    with pytest.raises(UpstreamError):
        CdnConfig.from_yaml("host: x\n")
    with pytest.raises(UpstreamError):
        CdnConfig.from_yaml(": : [")


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "x" * 129, "-a", "a\n", "a b"])
def test_invalid_names_refused(name):
    with pytest.raises(BadRequest):
        validate_name(name)


@pytest.mark.parametrize("folder", ["Models", "ab", "a_b", "../x", "a" * 64, "-ab", "models\n"])
def test_invalid_folders_refused(folder):
    with pytest.raises(BadRequest):
        validate_folder(folder)


def test_split_size_rule():
    assert [small_size(n) for n in (0, 32, 100, 10239, 10240, 10**9)] == [0, 9, 30, 3071, 3072, 3072]


@pytest.mark.parametrize("size", [0, 1, 100, 10_000, 10_223, 10_224, 300_001])
def test_upload_then_load_round_trip_and_split(tmp_path, s3, size):
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(size)
    up = store.begin_upload("m.bin")
    for i in range(0, len(data), 4099):
        up.write(data[i : i + 4099])
    assert up.finish("models") == size
    small = api.store[("models", "m.bin.small")]
    big = s3.get_object(Bucket="models", Key="m.bin.big")["Body"].read()
    manifest = json.loads(api.store[("models", "m.bin.manifest")])
    blob_len = 16 + (size // 16 + 1) * 16
    assert len(small) == small_size(blob_len) and len(small) + len(big) == blob_len
    # Sealed: under the upload's own data key, never the compiled-in resource key.
    key = base64.b64decode(manifest["key"])
    assert len(key) == 32 and key != security.resource_key()
    assert security.decrypt(key, small + big) == data
    assert manifest["format"] == 2 and (manifest["size"], manifest["blobSize"]) == (size, blob_len)
    assert manifest["small"] == hashlib.sha256(small).hexdigest()
    assert manifest["big"] == hashlib.sha256(big).hexdigest()
    assert manifest["blocks"] == block_digests(big, manifest["blockSize"])
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big
    assert not [p for p in (tmp_path / "cache").rglob("*.part")]
    assert load(store) == data


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


def test_a_big_part_with_a_bad_end_fails_before_streaming(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    big = publish(s3, api, os.urandom(100_000))
    s3.put_object(Bucket="models", Key="m.bin.big", Body=big[:-17] + bytes([big[-17] ^ 0x55]) + big[-16:])
    with pytest.raises(DecryptionError):
        store.load("models", "m.bin")  # the cold path: the end of the blob is checked before a byte streams
    assert cache.settle(10)  # the download itself goes on into the cache
    assert os.path.exists(cache.path("models", "m.bin.big.meta"))
    with pytest.raises(DecryptionError):
        store.load("models", "m.bin")  # the cached part fails its check, is discarded and fetched once more
    assert cache.downloads == 2


def test_stale_cache_is_refreshed(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    publish(s3, api, b"old" * 5000)
    assert load(store) == b"old" * 5000
    publish(s3, api, b"new" * 6000)
    assert load(store) == b"new" * 6000
    assert cache.downloads == 2


def test_prepare_builds_the_cdn_clients_once_ahead_of_the_first_load(tmp_path, s3):
    built = []
    store, api, cache = make_store(tmp_path, s3, built=built)
    data = os.urandom(50_000)
    publish(s3, api, data)
    store.prepare()
    assert built == [YAML]
    assert load(store) == data and built == [YAML]  # the first load found the clients built


def test_prepare_only_logs_a_failure_the_load_then_reports(tmp_path, s3, caplog):
    store, api, cache = make_store(tmp_path, s3)
    api.cdn_yaml = lambda: (_ for _ in ()).throw(UpstreamError("the Resource API is unreachable"))
    caplog.set_level(logging.INFO, logger="loader.split")
    store.prepare()  # no exception: a login does not fail for it
    assert "could not prepare the CDN clients yet (UpstreamError)" in caplog.text
    publish(s3, api, os.urandom(1000))
    with pytest.raises(UpstreamError):
        store.load("models", "m.bin")


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


class RecordingSha256:
    """hashlib.sha256 that records the name of the thread that hashed each block: injected as the cache's
    hasher, it shows who took each block's digest, and how often."""

    def __init__(self, calls):
        self._h, self._calls = hashlib.sha256(), calls

    def update(self, data):
        self._calls.append(threading.current_thread().name)
        self._h.update(data)

    def digest(self):
        return self._h.digest()


def recording_store(tmp_path, s3, download_client=None):
    calls = []
    hashing = {"hasher": lambda: RecordingSha256(calls)}
    store, api, cache = make_store(tmp_path, s3, download_client=download_client, cache_options=hashing)
    return store, api, cache, calls


def block_digests(big, block_size=64 * 1024):
    return [hashlib.sha256(big[i : i + block_size]).hexdigest() for i in range(0, len(big), block_size)]


def fetchers_of(key="models/m.bin.big"):
    """The name prefix of the fetcher threads of a download of ``key``."""
    return f"cdn-{key}-"


def test_a_cold_load_hashes_no_block_itself_the_fetchers_hash_each_block_once(tmp_path, s3):
    """The fetchers hash each block as it comes and hand it to the load with its digest: the load (its own
    thread or its read-ahead) hashes none a second time, and the download none after the load (no
    hash_grace, no hashing of the rest: this replaces the tests of the download hashing what its loads
    left)."""
    store, api, cache, calls = recording_store(tmp_path, s3)
    data = os.urandom(300_000)
    big = publish(s3, api, data)
    assert load(store) == data
    assert cache.settle(10)
    assert len(calls) == len(block_digests(big))
    assert all(name.startswith(fetchers_of()) for name in calls), calls
    assert cache.handed == len(block_digests(big))
    meta = json.load(open(cache.path("models", "m.bin.big.meta")))
    assert meta["blocks"] == block_digests(big) and meta["version"] is None
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big
    assert not list((tmp_path / "cache").rglob("*.part"))
    assert not list((tmp_path / "cache").rglob("*.record"))


def _streaming(tmp_path, s3, size=3 * MIB):
    """A download held in flight while a load streams it: the segment from the object's start holds back its
    last block until ``release`` is set (the object's end comes first, in a segment of its own, for the
    check before the answer), and the load has taken its first block. Returns (store, api, cache, chunks,
    big, data, first, calls, release) once every block but that last one is in."""
    release = threading.Event()
    store, api, cache, calls = recording_store(tmp_path, s3, EndAfter(s3, release, "bytes=0-"))
    data = os.urandom(size)
    big = publish(s3, api, data)
    plaintext = store.load("models", "m.bin")
    chunks = iter(plaintext)
    first = bytes(next(chunks))
    download = cache.downloading("models", "m.bin.big")
    until(lambda: download.bytes_done == len(big) - BLOCK)
    assert not download.done
    return store, api, cache, chunks, big, data, first, calls, release


def test_a_load_that_leaves_early_leaves_nothing_to_hash(tmp_path, s3):
    """A load gone after its first block: the download hashed each block as it came, so its commit hashes
    nothing more, and every block was hashed exactly once."""
    store, api, cache, chunks, big, data, first, calls, release = _streaming(tmp_path, s3)
    chunks.close()
    release.set()
    assert cache.settle(10)
    assert len(calls) == len(block_digests(big)) and all(n.startswith(fetchers_of()) for n in calls)
    assert json.load(open(cache.path("models", "m.bin.big.meta")))["blocks"] == block_digests(big)
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big


def test_the_commit_does_not_wait_for_a_load_that_stalls(tmp_path, s3):
    """A load whose client stopped reading holds no commit back (nor any hashing: there is none left to
    do); what it reads after the commit is still whole and right."""
    store, api, cache, chunks, big, data, first, calls, release = _streaming(tmp_path, s3)
    release.set()
    assert cache.settle(10) and os.path.exists(cache.path("models", "m.bin.big.meta"))
    assert first + b"".join(bytes(c) for c in chunks) == data
    # the fetchers hashed each block once; the load hashed only the blocks it read back from the disk (those
    # not handed over to it in memory, the fetchers having gone on without it)
    fetched = [n for n in calls if n.startswith(fetchers_of())]
    assert len(fetched) == len(block_digests(big))
    assert len(calls) - len(fetched) == len(block_digests(big)) - cache.handed


def test_a_block_changed_on_the_disk_under_a_download_is_never_served_nor_committed(tmp_path, s3):
    """A load that reads a block of a download back from the disk (none is handed over here) checks it
    against the digest the fetcher took as it came: a block changed on the disk meanwhile stops the load
    short of it, and fails the download, which is never committed."""
    release = threading.Event()
    store, api, cache = make_store(
        tmp_path,
        s3,
        download_client=EndAfter(s3, release, "bytes=0-"),
        cache_options={"config": TransferConfig(handoff_blocks=0)},
    )
    data = os.urandom(MIB)
    big = publish(s3, api, data)
    plaintext = store.load("models", "m.bin")
    chunks = iter(plaintext)
    got = bytes(next(chunks))
    download = cache.downloading("models", "m.bin.big")
    until(lambda: download.bytes_done == len(big) - BLOCK)
    with open(download.part, "r+b") as f:
        f.seek(10 * BLOCK + 7)
        f.write(b"\x00\xff")
    with pytest.raises(IntegrityError, match="block 10 of models/m.bin.big does not match"):
        for chunk in chunks:
            got += bytes(chunk)
    assert data.startswith(got) and len(got) <= 3072 - 16 + 10 * BLOCK  # nothing that depends on block 10
    release.set()
    ended(cache)
    assert cache.handed == 0 and not os.path.exists(cache.path("models", "m.bin.big.meta"))
    (status,) = cache.transfers()
    assert status["state"] == "failed" and "block 10" in status["error"]
    assert load(store) == data and cache.downloads == 2


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


def _open_flags(path_part):
    """The open flags of this process's descriptors whose path contains ``path_part``."""
    flags = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if path_part in os.readlink(f"/proc/self/fd/{fd}"):
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    flags.append(int(next(x for x in f if x.startswith("flags:")).split()[1], 8))
        except (OSError, StopIteration):
            pass
    return flags


def test_a_download_writes_its_part_past_the_page_cache(tmp_path, s3):
    store, api, cache, chunks, big, data, first, calls, release = _streaming(tmp_path, s3)
    # The download (held in flight) has the .part open: one descriptor bypasses the page cache.
    assert any(f & os.O_DIRECT for f in _open_flags(".part"))
    chunks.close()
    release.set()
    assert cache.settle(10)
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big
    assert load(store) == data and cache.hits == 1


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


def test_read_at_reads_any_range(tmp_path):
    data = os.urandom(3 * 4096 + 123)
    (tmp_path / "f").write_bytes(data)
    buf = aligned_io.aligned_buffer(8192)
    with aligned_io.open_reader(str(tmp_path / "f")) as f:
        assert fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT  # this filesystem allows it
        end = len(data)
        ranges = [(0, 4096), (1, 100), (4095, 4098), (5000, 8192), (end - 5, 5), (end - 5, 50), (end, 10)]
        for pos, n in ranges:
            assert bytes(aligned_io.read_at(f.fileno(), buf, pos, n)) == data[pos : pos + n]


def test_read_at_reads_through_the_page_cache_when_o_direct_refuses_a_read(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_DIRECT)
    try:
        misaligned = memoryview(bytearray(3 * 4096 + 1))[1:]  # an odd address: O_DIRECT refuses it
        assert bytes(aligned_io.read_at(fd, misaligned, 10, 100)) == data[10:110]
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)


@pytest.mark.parametrize("stop", ["at the end", "half-way"])
def test_read_blocks_frees_its_buffers_without_the_cyclic_gc(tmp_path, stop):
    """The soak found the loader's RSS growing by hundreds of MB over a run: every load's read-ahead
    buffers sat in a reference cycle (the generator's closure scope and the inner function it ran on the
    pool) until the cyclic GC came by. Reference counting alone must free them."""
    block = 64 * 1024
    data = os.urandom(6 * block + 5)
    (tmp_path / "f").write_bytes(data)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the cyclic GC finds is kept in gc.garbage, for a look
    try:
        with aligned_io.open_reader(str(tmp_path / "f")) as f:
            blocks = aligned_io.read_blocks(f.fileno(), len(data), block, hashlib.sha256)
            for i, view, digest in blocks:
                assert bytes(view) == data[i * block : (i + 1) * block]
                assert digest == hashlib.sha256(view).digest()
                if stop == "half-way" and i == 2:
                    break
            del view
            blocks.close()
            del blocks
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, mmap.mmap | memoryview)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []


class HandingWriter:
    """The writer of a file for read_blocks (``source``): hands the even blocks over in memory, filled with
    their index (not what the file holds), with the digest it took of them as they came; has the odd ones
    read from the file. Records the buffers it handed and the ones given back."""

    def __init__(self, block):
        self.size, self.handed, self.back = block, [], []

    def block(self, index, end, timeout):
        if index % 2:
            return True
        buf = memoryview(bytearray([index]) * self.size)
        self.handed.append(buf)
        return buf, hashlib.sha256(bytes([index]) * (end - index * self.size)).digest()

    def give_back(self, buf):
        self.back.append(buf)


@pytest.mark.parametrize("stop", [None, 1, 2])
def test_read_blocks_takes_the_digest_of_a_block_handed_over_and_gives_every_buffer_back(tmp_path, stop):
    """A block a download hands over in memory is the block the load checks and sends, with the digest the
    download took of those very bytes as they came: read_blocks hashes it no second time (it hashes only
    what it reads from the file). Each buffer goes back once, also when the load stops early."""
    block = 64 * 1024
    data = os.urandom(6 * block + 5)
    (tmp_path / "f").write_bytes(data)
    writer = HandingWriter(block)
    seen, hashed = [], []

    def hasher():
        hashed.append(1)
        return hashlib.sha256()

    with aligned_io.open_reader(str(tmp_path / "f")) as f:
        blocks = aligned_io.read_blocks(f.fileno(), len(data), block, hasher, source=writer)
        for i, view, digest in blocks:
            expected = data[i * block : (i + 1) * block] if i % 2 else bytes([i]) * len(view)
            assert bytes(view) == expected and digest == hashlib.sha256(expected).digest()
            seen.append(i)
            if i == stop:
                break
        blocks.close()
    assert seen == list(range(7 if stop is None else stop + 1))
    assert writer.handed and sorted(map(id, writer.back)) == sorted(map(id, writer.handed))
    # the file was read (and hashed) for the odd blocks only, those read ahead included
    assert 0 < len(hashed) <= len([i for i in range(7) if i % 2])
    assert len(hashed) >= len([i for i in seen if i % 2])


def test_a_cold_load_takes_every_block_from_memory_and_the_budget_comes_back(tmp_path, s3):
    """The blocks a download fetches reach the load that follows it in memory: none is read back from the
    disk (a cold GiB read the disk for a GiB while writing one, and was 20 % slower). The one memory budget
    (the load's buffers, the download's first buffer, its other fetchers' and the hand-over's) is whole
    again once both have ended."""
    budget = Budget(64 * BLOCK)
    # A lead of every block: however late the load asks on a busy machine, no block goes past the hand-over.
    config = TransferConfig(handoff_blocks=64)
    store, api, cache = make_store(tmp_path, s3, memory=budget, cache_options={"config": config})
    data = os.urandom(3 * MIB + 5)
    big = publish(s3, api, data)
    assert load(store) == data
    ended(cache)
    assert cache.handed == -(-len(big) // BLOCK)
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big
    assert budget.left == budget.total and budget.waiting == 0


def test_a_download_holds_its_first_buffer_until_it_ends(tmp_path, s3):
    """A download's first fetcher buffer comes from a reservation taken before it starts (waited for, so a
    download always moves) and released at its end; the load's buffers are the load's own, released with
    its stream."""
    budget = Budget(64 * BLOCK)
    release = threading.Event()
    store, api, cache = make_store(
        tmp_path, s3, memory=budget, download_client=EndAfter(s3, release, "bytes=0-")
    )
    data = os.urandom(MIB)
    publish(s3, api, data)
    plaintext = store.load("models", "m.bin")  # kept: the load's own reservation lives with it
    chunks = iter(plaintext)
    next(chunks)
    assert budget.left <= budget.total - (LOAD_BUFFERS + 1) * BLOCK  # the load's, and the download's first
    chunks.close()
    assert budget.left <= budget.total - BLOCK
    del plaintext, chunks
    download = cache.downloading("models", "m.bin.big")
    assert not download.done
    assert budget.left <= budget.total - BLOCK  # the load is gone: the download still holds its own
    release.set()
    assert cache.settle(10)
    until(lambda: budget.left == budget.total, what="the download's buffers never came back")


def test_a_load_that_stalls_does_not_hold_its_download_back(tmp_path, s3):
    """The fetchers keep near a load only while it moves on: one whose client stopped reading leaves them
    free within pace_stall, and the download commits."""
    budget = Budget(16 * BLOCK)  # the load's 7 blocks, the download's first; the hand-over gets what is left
    store, api, cache = make_store(tmp_path, s3, memory=budget)
    data = os.urandom(3 * MIB)  # 48 blocks
    big = publish(s3, api, data)
    chunks = iter(store.load("models", "m.bin"))
    first = bytes(next(chunks))  # and no more for now
    assert cache.settle(10)
    assert first + b"".join(bytes(c) for c in chunks) == data
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big
    ended(cache)
    assert budget.left == budget.total


def test_a_failed_download_gives_its_budget_back(tmp_path, s3):
    budget = Budget(16 * BLOCK)
    flaky = FlakyClient(s3, failures=100, after=3 * BLOCK)  # each GET breaks off after 3 blocks
    store, api, cache = make_store(tmp_path, s3, download_client=flaky, memory=budget)
    publish(s3, api, os.urandom(MIB))
    with pytest.raises(UpstreamError):
        load(store)
    ended(cache)
    assert budget.left == budget.total
    # a format-1 part is never resumed: nothing of it is kept
    assert not list((tmp_path / "cache").rglob("*.part")) and not list((tmp_path / "cache").rglob("*.record"))


class BrokenCdn:
    """A CDN whose every transfer breaks off for good."""

    chunk_size = 4096

    def fill(self, bucket, key, info, buf, start=0, end=None, stop=None):
        raise UpstreamError("the CDN transfer kept breaking off")


def test_a_load_joining_a_download_as_it_fails_gets_its_error(tmp_path):
    """The soak found a 500 (FileNotFoundError): a load joined a download in the moment it failed, after
    its .part file was deleted but before the failure was told, and opened the missing file. The load
    must get the download's failure, a clear status: the failure is set before the part goes."""
    joined = []

    def join():
        try:
            joined.append(failing.open_reader())
        except Exception as exc:  # noqa: BLE001 - what the load would have met
            joined.append(exc)

    class JoinedAsItsPartGoes(Download):
        def _remove(self):
            """Lets a load join right before the .part file goes, and removes it right after."""
            reader = threading.Thread(target=join)
            reader.start()
            reader.join(0.5)
            super()._remove()

    cache = BigPartCache(str(tmp_path))
    info = ObjectInfo(10_000, '"e"')
    failing = JoinedAsItsPartGoes(cache, "models", "m.bin.big", info, None, None, 4096)
    failing.run(failing.prepare(), BrokenCdn())
    until(lambda: joined)
    assert isinstance(joined[0], UpstreamError), joined
    assert failing.failure is joined[0] and not os.path.exists(failing.part)


def test_a_download_whose_file_cannot_be_opened_for_a_load_is_a_storage_error(tmp_path):
    """A disk error as a load opens the download's file (out of descriptors, say) is the loader's 507,
    never a raw OSError (a 500)."""

    def out_of_descriptors_for_reads(path, flags, mode=0o777):
        if flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return os.open(path, flags, mode)

    cache = BigPartCache(str(tmp_path), opener=out_of_descriptors_for_reads)
    download = Download(cache, "models", "m.bin.big", ObjectInfo(10_000, '"e"'), None, None, 4096)
    fd = download.prepare()
    with pytest.raises(StorageError, match=r"the model cache failed on models/m.bin.big \(EMFILE\)"):
        download.open_reader()
    download.run(fd, BrokenCdn())  # fails, and cleans up
    assert not os.path.exists(download.part)


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


def test_a_ranged_get_answered_with_the_wrong_length_is_refused(s3):
    s3.put_object(Bucket="models", Key="x.big", Body=os.urandom(100_000))

    class WholeObject:  # a CDN that ignores Range and sends the whole object
        def __getattr__(self, name):
            return getattr(s3, name)

        def get_object(self, **kw):
            kw.pop("Range")
            return s3.get_object(**kw)

    cdn = CdnManager(download_client=WholeObject(), upload_client=s3)
    info = cdn.head("models", "x.big")
    with pytest.raises(IntegrityError):
        list(cdn.fill("models", "x.big", info, memoryview(bytearray(cdn.chunk_size)), 1000, 2000))


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


def test_interrupted_download_resumes_pinned_to_the_etag(tmp_path, s3):
    flaky = FlakyClient(s3, failures=2, after=70_000, ranges=("bytes=0-", "bytes=70000-"))
    store, api, _ = make_store(tmp_path, s3, download_client=flaky)
    data = os.urandom(300_000)
    big = publish(s3, api, data)
    assert load(store) == data
    tail, last = tail_start(len(big), BLOCK), len(big) - 1
    # the object's end first, then the rest from its start, resumed twice where it broke off
    assert sorted(flaky.gets) == sorted(
        [f"bytes={tail}-{last}", f"bytes=0-{tail - 1}", f"bytes=70000-{tail - 1}", f"bytes=140000-{tail - 1}"]
    )


def test_a_body_that_ends_early_is_resumed_not_returned_short(tmp_path, s3):
    flaky = FlakyClient(s3, failures=1, after=1000, end_early=True, ranges="bytes=0-")
    store, api, _ = make_store(tmp_path, s3, download_client=flaky)
    data = os.urandom(100_000)
    big = publish(s3, api, data)
    assert load(store) == data
    tail, last = tail_start(len(big), BLOCK), len(big) - 1
    assert sorted(flaky.gets) == sorted(
        [f"bytes={tail}-{last}", f"bytes=0-{tail - 1}", f"bytes=1000-{tail - 1}"]
    )


def test_large_objects_are_fetched_as_segments_in_parallel(tmp_path, s3):
    flaky = FlakyClient(s3, failures=1, after=5_000_000, ranges="bytes=0-")
    store, api, cache = make_store(tmp_path, s3, download_client=flaky)
    data = os.urandom(40 * MIB + 12_345)
    big = publish(s3, api, data)
    assert load(store) == data
    tail = tail_start(len(big), BLOCK)
    # the block with the last bytes, a 16 MiB segment, then 8 MiB segments near the end; the first segment
    # broke off after 5 MB and was resumed inside that segment only
    assert sorted(flaky.gets, key=lambda r: int(r.split("=")[1].split("-")[0])) == [
        f"bytes=0-{16 * MIB - 1}",
        f"bytes=5000000-{16 * MIB - 1}",
        f"bytes={16 * MIB}-{24 * MIB - 1}",
        f"bytes={24 * MIB}-{32 * MIB - 1}",
        f"bytes={32 * MIB}-{tail - 1}",
        f"bytes={tail}-{len(big) - 1}",
    ]
    assert cache.settle(10)  # the commit follows the load
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big


@pytest.mark.parametrize(
    "size", [0, 1, 31, 32, 33, MIB, MIB + 31, MIB + 32, MIB + 33, 40 * MIB + 5, 113 * MIB, 1024 * MIB - 3040]
)
@pytest.mark.parametrize("block", [MIB, 4 * MIB])
def test_segments_cover_the_object_once_its_end_first(size, block):
    config = TransferConfig()
    big, small = config.segment, config.small_segment
    order = segments(size, block)
    covered = sorted(order)
    assert [s for s, _ in covered] == [0, *[e for _, e in covered[:-1]]] or not covered
    assert (covered[-1][1] if covered else 0) == size
    if size - TAIL >= block:
        # the end first: whole blocks, from the one that holds the last TAIL bytes
        start, end = order[0]
        assert end == size and start % block == 0 and start <= size - TAIL < start + block
        assert order[1:] == covered[:-1]
        # then from the start: large segments, the last few small
        lengths = [e - s for s, e in order[1:]]
        assert all(x == big or x <= small for x in lengths)
        large = [x == big for x in lengths]
        assert large == sorted(large, reverse=True)
        assert sum(x for x in lengths if x <= small) >= min(sum(lengths), config.fetchers * small)
        assert any(large) or sum(lengths) < big + config.fetchers * small
    elif size:
        assert order == [(0, size)]


def test_segments_of_the_missing_blocks_only_in_runs_of_whole_blocks_the_tail_first():
    b = BLOCK
    size = 20 * b + 5  # 21 blocks; the last TAIL bytes lie in blocks 19 and 20
    config = TransferConfig(fetchers=1, segment=2 * b, small_segment=b)
    order = segments(size, b, {20, 0, 1, 2, 5, 6, 19}, config)
    # the tail's blocks, then runs of consecutive blocks, each cut into segments of whole blocks: large ones
    # while enough is left for the fetchers' small ones at the end
    assert order == [(19 * b, size), (0, 2 * b), (2 * b, 3 * b), (5 * b, 6 * b), (6 * b, 7 * b)]
    assert segments(size, b, {3}, config) == [(3 * b, 4 * b)]
    assert segments(size, b, {20}, config) == [(20 * b, size)]
    assert segments(size, b, set(), config) == []
    assert segments(size, b, None, config) == segments(size, b, range(21), config)


def test_segment_sizes_come_from_the_transfer_config():
    size = 100 * BLOCK + 1
    config = TransferConfig(fetchers=2, segment=10 * BLOCK, small_segment=3 * BLOCK)
    lengths = [e - s for s, e in segments(size, BLOCK, config=config)[1:]]
    assert sum(lengths) == tail_start(size, BLOCK)
    assert lengths[0] == 10 * BLOCK and set(lengths) <= {10 * BLOCK, 3 * BLOCK, BLOCK, 2 * BLOCK}
    # segments of less than a block are whole blocks all the same
    tiny = TransferConfig(segment=1, small_segment=1)
    assert all(e - s == BLOCK for s, e in segments(size, BLOCK, config=tiny)[1:])


@pytest.mark.parametrize(
    "option,value",
    [
        ("fetchers", 0),
        ("fetchers", True),
        ("segment", 0),
        ("small_segment", -1),
        ("segment", 1.5),
        ("memory_bytes", -1),
        ("handoff_blocks", "12"),
        ("max_bytes_per_s", -1),
        ("cache_max_bytes", None),
        ("cache_min_free", -1),
        ("checkpoint_bytes", -1),
    ],
)
def test_a_transfer_config_refuses_what_is_no_count(option, value):
    with pytest.raises(ValueError, match=option):
        TransferConfig(**{option: value})


def test_a_transfer_config_from_the_settings():
    class Settings:
        load_memory_bytes, cdn_max_bytes_per_s = 64 * MIB, 1000
        model_cache_max_bytes, model_cache_min_free_bytes = 5 * MIB, 7

    config = TransferConfig.from_settings(Settings())
    assert (config.memory_bytes, config.max_bytes_per_s) == (64 * MIB, 1000)
    assert (config.cache_max_bytes, config.cache_min_free) == (5 * MIB, 7)
    assert config.fetchers == TransferConfig().fetchers


def test_a_transfer_that_keeps_breaking_fails_and_leaves_no_partial_file(tmp_path, s3):
    flaky = FlakyClient(s3, failures=100, after=10)
    store, api, cache = make_store(tmp_path, s3, download_client=flaky)
    publish(s3, api, os.urandom(100_000))
    with pytest.raises(UpstreamError):
        load(store)
    ended(cache)  # the load is told at once; the part goes once the fetchers have ended
    assert not list((tmp_path / "cache").rglob("*.part"))
    assert not os.path.exists(cache.path("models", "m.bin.big"))


def test_a_body_that_keeps_breaking_is_resumed_a_bounded_number_of_times(s3):
    flaky = FlakyClient(s3, failures=100, after=10)
    s3.put_object(Bucket="models", Key="x.big", Body=os.urandom(1000))
    cdn = CdnManager(download_client=flaky, upload_client=s3, resume_backoff=0)
    info = cdn.head("models", "x.big")
    with pytest.raises(UpstreamError, match="kept breaking off") as caught:
        list(cdn.fill("models", "x.big", info, memoryview(bytearray(cdn.chunk_size))))
    # each resume from where the body before broke off, CDN_RESUMES of them; the last break is the cause
    assert flaky.gets == [f"bytes={10 * i}-999" for i in range(1 + CDN_RESUMES)]
    assert isinstance(caught.value.__cause__, ConnectionResetError)


@pytest.fixture
def fake_s3():
    """``fake_s3(route)``: a CdnManager (the real botocore clients) against an ApiServer answering
    ``route``, and the server."""
    servers = []

    def make(route):
        servers.append(ApiServer(route))
        config = CdnConfig(servers[-1].url, ("dk", "ds-secret"), ("uk", "us-secret"))
        return CdnManager(config), servers[-1]

    yield make
    for server in servers:
        server.close()


def test_a_cdn_request_is_retried_by_botocore_alone(fake_s3):
    """botocore's standard mode retries a request that fails, CDN_ATTEMPTS times in all; nothing retries on
    top of it (a GET refused for good, or whose connection drops every time, is not asked again)."""
    answers = iter([(503, b""), (500, b""), (200, b"", {"ETag": '"e1"'})])
    cdn, server = fake_s3(lambda m, p, b, h: next(answers))
    assert cdn.head("models", "x.big").etag == '"e1"'
    assert len(server.calls) == 3

    for answer, error in (((503, b""), "answered 503"), (DROP, "unreachable")):
        cdn, server = fake_s3(lambda m, p, b, h, answer=answer: answer)
        buf = memoryview(bytearray(cdn.chunk_size))
        with pytest.raises(UpstreamError, match=error) as caught:
            list(cdn.fill("models", "x.big", ObjectInfo(1000, '"e1"'), buf))
        assert [c[:2] for c in server.calls] == [("GET", "/models/x.big")] * CDN_ATTEMPTS
        assert caught.value.__cause__ is not None


def test_cdn_uploads_are_not_hashed_for_their_signature(tmp_path, fake_s3):
    """Parts and PUTs go out as UNSIGNED-PAYLOAD: botocore takes no SHA-256 of the body (the manifest's
    digests cover every byte); everything else of the request is still signed."""
    seen = []

    def route(method, path, body, headers):
        seen.append((method, headers.get("x-amz-content-sha256"), len(body)))
        return 200, b"", {"ETag": '"e1"'}

    cdn, server = fake_s3(route)
    staged = tmp_path / "m.bin.big"
    staged.write_bytes(os.urandom(100_000))
    assert cdn.upload_file("models", "m.bin.big", str(staged)) == '"e1"'
    assert ("PUT", "UNSIGNED-PAYLOAD", 100_000) in seen
    assert {content for _, content, _ in seen} == {"UNSIGNED-PAYLOAD"}
    assert "SignedHeaders=" in server.calls[0][2] and "x-amz-content-sha256" in server.calls[0][2]


def test_a_cdn_upload_of_a_staged_file_that_cannot_be_read_is_a_storage_error(tmp_path, s3):
    cdn = CdnManager(download_client=s3, upload_client=s3)
    gone = str(tmp_path / "gone.part")
    with pytest.raises(StorageError):
        cdn.upload_file("models", "m.bin.big", gone)
    with pytest.raises(StorageError):
        cdn.part_upload("models", "m.bin.big", gone).finish(0)


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


def test_missing_resource_is_not_found(tmp_path, s3):
    store, _, _ = make_store(tmp_path, s3)
    with pytest.raises(NotFound):
        store.load("models", "nope.bin")


def test_operator_may_not_upload_and_limit_is_enforced(tmp_path, s3):
    store, _, _ = make_store(tmp_path, s3, roles=("Operator",))
    with pytest.raises(Forbidden):
        store.begin_upload("m.bin")
    store, _, _ = make_store(tmp_path, s3, max_upload=1000)
    up = store.begin_upload("m.bin")
    with pytest.raises(PayloadTooLarge):
        up.write(b"x" * 1001)
    assert not list((tmp_path / "cache").rglob("*.part"))
