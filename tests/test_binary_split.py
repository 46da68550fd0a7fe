"""binary_split: ModelStore's loads and uploads against moto's S3 and an in-memory Resource API: names and
folders, the split, format 1, and the sealed split (format 2): no byte leaves a load that its manifest does
not vouch for, on every path a load can take."""

import base64
import errno
import gc
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import pytest

import heap
import security
from binary_split import LOAD_BUFFERS, validate_folder, validate_name
from constants import READ_AHEAD
from devstack.wait import until
from download import BlockRecord
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
from manifest import ManifestError, blob_size, small_size
from tests.store_fakes import (
    BLOCK,
    PART,
    YAML,
    WrappedClient,
    block_digests,
    ended,
    go_offline,
    load,
    make_store,
    publish,
)


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


# --- the sealed split (format 2) ----------------------------------------------------------------------

SIZE = 5 * BLOCK + 5000  # a big part of six blocks, the last one short


def upload(store, data, name="m.bin"):
    up = store.begin_upload(name)
    for i in range(0, len(data), 50_000):
        up.write(data[i : i + 50_000])
    return up.finish("models")


def cdn_big(s3, name="m.bin"):
    return s3.get_object(Bucket="models", Key=name + ".big")["Body"].read()


def flip(s3, offset, name="m.bin"):
    big = bytearray(cdn_big(s3, name))
    big[offset] ^= 0x01
    s3.put_object(Bucket="models", Key=name + ".big", Body=bytes(big))


def streamed(store, name="m.bin"):
    """What a load hands out before it stops: (bytes, the error that stopped it or None)."""
    return streamed_from(store.load("models", name))


def streamed_from(plaintext):
    got = bytearray()
    try:
        for chunk in plaintext:
            got += chunk
    except IntegrityError as exc:
        return bytes(got), exc
    return bytes(got), None


@pytest.fixture
def sealed(tmp_path, s3):
    """A store with a sealed model uploaded and its cache emptied (the next load is cold)."""
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(SIZE)
    upload(store, data)
    cache.discard("models", "m.bin.big")
    return store, api, cache, data


def test_a_cold_then_warm_load_is_verified_and_cached_with_its_manifest(sealed, s3):
    store, api, cache, data = sealed
    assert load(store) == data
    assert cache.settle(10) and cache.downloads == 1
    meta = json.load(open(cache.path("models", "m.bin.big.meta")))
    manifest = json.loads(api.store[("models", "m.bin.manifest")])
    assert meta["version"] == "sha256:" + manifest["big"] and meta["blocks"] == manifest["blocks"]
    assert load(store) == data and (cache.hits, cache.downloads) == (1, 1)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_bit_flipped_on_the_cdn_is_never_served(sealed, s3, where):
    store, api, cache, data = sealed
    big_size = len(cdn_big(s3))
    offset = {"first": 10, "middle": 3 * BLOCK + 7, "last": big_size - 1}[where]
    flip(s3, offset)
    if where != "middle":
        # The first block and the one with the blob's end are checked before the first byte: a 502.
        with pytest.raises(IntegrityError, match=f"block {offset // BLOCK} .* does not match its manifest"):
            store.load("models", "m.bin")
    else:
        got, error = streamed(store)
        assert error is not None and "does not match its manifest" in error.detail
        assert len(got) < len(data) and data.startswith(got)
        # Nothing that depends on the bad block left: every byte handed out lies before it.
        assert len(got) <= 3072 - 16 + offset - offset % BLOCK
    ended(cache)
    assert not os.path.exists(cache.path("models", "m.bin.big.meta"))  # never committed
    # The fetcher failed the download at the bad block, before writing it: the part is kept with its record
    # for a resume, and neither holds the block nor claims it.
    (part,) = Path(cache.root).rglob("*.part")
    (path,) = Path(cache.root).rglob("*.record")
    record = BlockRecord.read(str(path))
    record.close()
    bad = offset // BLOCK
    assert bad not in record.claimed
    assert part.read_bytes()[bad * BLOCK : (bad + 1) * BLOCK].count(0) == min(BLOCK, big_size - bad * BLOCK)
    flip(s3, offset)  # restored (another ETag: the leftover of the flipped one is discarded): it loads again
    assert load(store) == data
    ended(cache)
    assert not list(Path(cache.root).rglob("*.part")) and not list(Path(cache.root).rglob("*.record"))
    assert cache.transfers()[-1]["bytesResumed"] == 0


def test_a_changed_small_part_is_refused_before_anything(sealed):
    store, api, cache, data = sealed
    small = bytearray(api.store[("models", "m.bin.small")])
    small[100] ^= 0x80
    api.store[("models", "m.bin.small")] = bytes(small)
    with pytest.raises(IntegrityError, match="small part of models/m.bin does not match its manifest"):
        store.load("models", "m.bin")
    assert cache.downloads == 0


def test_a_cdn_object_of_another_length_is_refused_before_anything(sealed, s3):
    store, api, cache, data = sealed
    s3.put_object(Bucket="models", Key="m.bin.big", Body=cdn_big(s3) + b"x" * 16)
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        store.load("models", "m.bin")
    assert cache.downloads == 0


@pytest.mark.parametrize("block", [0, 3, 5])
def test_a_block_altered_in_the_cache_is_fetched_again_within_the_same_load(sealed, s3, block):
    store, api, cache, data = sealed
    assert load(store) == data and cache.settle(10)
    path = cache.path("models", "m.bin.big")
    raw = bytearray(open(path, "rb").read())
    raw[block * BLOCK + 5] ^= 0x40
    open(path, "wb").write(raw)
    assert load(store) == data  # whole and right: the load went on from the CDN at the bad block
    assert (cache.refetches, cache.downloads) == (1, 2)
    assert cache.settle(10)
    assert open(path, "rb").read() == cdn_big(s3)
    assert load(store) == data and cache.downloads == 2


def test_a_warm_load_checks_blocks_as_it_streams_not_the_whole_file_first(sealed):
    store, api, cache, data = sealed
    assert load(store) == data and cache.settle(10)
    hashed = []
    real = cache.hasher
    cache.hasher = lambda: hashed.append(1) or real()
    plaintext = store.load("models", "m.bin")
    # Before the answer starts: the last block (for the blob's end), the first, and those read ahead
    assert len(hashed) <= 2 + READ_AHEAD < 6
    assert b"".join(bytes(c) for c in plaintext) == data
    assert len(hashed) == 6 + 1


def test_a_warm_sealed_load_needs_no_cdn(sealed):
    store, api, cache, data = sealed
    assert load(store) == data and cache.settle(10)
    go_offline(api)
    assert load(store) == data
    cache.discard("models", "m.bin.big")
    with pytest.raises(UpstreamError):
        store.load("models", "m.bin")


def test_parallel_loads_each_stop_at_a_bad_block(sealed, s3):
    store, api, cache, data = sealed
    flip(s3, 4 * BLOCK + 1)
    results, gate = [], threading.Barrier(4)

    def worker():
        gate.wait()
        try:
            results.append(streamed(store))
        except IntegrityError as exc:  # refused before its first byte
            results.append((b"", exc))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 4
    for got, error in results:
        assert error is not None and len(got) < len(data) and data.startswith(got)
        assert len(got) <= 3072 - 16 + 4 * BLOCK
    assert cache.settle(10) and not os.path.exists(cache.path("models", "m.bin.big.meta"))


@pytest.mark.parametrize("refused", ["m.bin.small", "m.bin.manifest"])
def test_a_half_done_upload_is_refused_never_spliced_and_a_new_upload_mends_it(sealed, s3, refused):
    store, api, cache, data = sealed
    new = os.urandom(SIZE + 99)
    api.refuse.add(refused)
    with pytest.raises(UpstreamError):
        upload(store, new)
    assert cdn_big(s3) != b""  # the new big part did reach the CDN
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        store.load("models", "m.bin")
    api.refuse.clear()
    assert upload(store, new) == len(new)
    assert load(store) == new


def test_the_big_part_alone_under_the_resource_key_reveals_nothing(sealed, s3):
    store, api, cache, data = sealed
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    big = cdn_big(s3)
    dec = Cipher(algorithms.AES(security.resource_key()), modes.CBC(big[:16])).decryptor()
    plain = dec.update(big[16 : len(big) - len(big) % 16]) + dec.finalize()
    assert all(data[i : i + 64] not in plain for i in range(0, len(data) - 64, 4096))
    key = base64.b64decode(json.loads(api.store[("models", "m.bin.manifest")])["key"])
    assert security.decrypt(key, api.store[("models", "m.bin.small")] + big) == data


def test_format_1_still_loads_with_a_count_and_is_refused_when_manifests_are_required(tmp_path, s3):
    from tests.store_fakes import publish

    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(100_000)
    publish(s3, api, data)
    assert load(store) == data and store.format1_loads == 1
    strict, api2, _ = make_store(tmp_path / "strict", s3, require_manifest=True)
    api2.store = api.store
    with pytest.raises(IntegrityError, match="has no manifest"):
        strict.load("models", "m.bin")
    assert strict.format1_loads == 0


@pytest.mark.parametrize("raw", [b"", b"{}", b'{"format": 2}', b"\x00" * 40])
def test_a_broken_manifest_is_a_clear_error(sealed, raw):
    store, api, cache, data = sealed
    api.store[("models", "m.bin.manifest")] = raw
    with pytest.raises(ManifestError, match="the manifest of models/m.bin is not valid"):
        store.load("models", "m.bin")


def test_each_upload_draws_a_fresh_data_key(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    keys = set()
    for _ in range(3):
        upload(store, b"same bytes" * 1000)
        keys.add(json.loads(api.store[("models", "m.bin.manifest")])["key"])
    assert len(keys) == 3
    manifest = json.loads(api.store[("models", "m.bin.manifest")])
    assert manifest["small"] == hashlib.sha256(api.store[("models", "m.bin.small")]).hexdigest()


def test_a_manifest_whose_size_the_padding_contradicts_is_cut_off(sealed):
    store, api, cache, data = sealed
    manifest = json.loads(api.store[("models", "m.bin.manifest")])
    manifest["size"] -= 1 if manifest["size"] % 16 else -1  # the same blobSize, another plaintext size
    api.store[("models", "m.bin.manifest")] = json.dumps(manifest).encode()
    # The checked last block's padding gives the real size: refused before the first byte.
    with pytest.raises(IntegrityError, match="decrypts to another size than its manifest says"):
        store.load("models", "m.bin")


class CountingClient:
    """An S3 client that counts the calls of each kind (``fail`` names one that raises)."""

    def __init__(self, client, fail=None):
        self._c, self.calls, self.fail = client, [], fail

    def __getattr__(self, name):
        call = getattr(self._c, name)

        def counted(*args, **kw):
            self.calls.append(name)
            if name == self.fail:
                raise ConnectionResetError("the CDN went away")
            return call(*args, **kw)

        return counted


def upload_to(store, data, folder, name="m.bin", step=1 << 20):
    up = store.begin_upload(name, folder)
    for i in range(0, len(data), step):
        up.write(data[i : i + step])
    return up.finish("models")


def test_with_the_folder_first_the_big_part_goes_to_the_cdn_in_parts_while_it_is_written(tmp_path, s3):
    client = CountingClient(s3)
    store, api, cache = make_store(tmp_path, s3, upload_client=client)
    data = os.urandom(3 * PART + 12345)
    up = store.begin_upload("m.bin", "models")
    up.write(data[: 2 * PART + 4096])  # two whole parts of big part (the first 3072 bytes are the small)
    until(lambda: client.calls.count("upload_part") == 2)  # sent before the rest came in
    up.write(data[2 * PART + 4096 :])
    assert up.finish("models") == len(data)
    assert client.calls.count("upload_part") == 4 and "complete_multipart_upload" in client.calls
    assert "upload_file" not in client.calls
    assert load(store) == data
    key = base64.b64decode(json.loads(api.store[("models", "m.bin.manifest")])["key"])
    assert security.decrypt(key, api.store[("models", "m.bin.small")] + cdn_big(s3)) == data
    assert cache.hits == 1  # the upload left the big part in the cache


def test_a_small_upload_with_the_folder_first_is_one_put(tmp_path, s3):
    client = CountingClient(s3)
    store, api, cache = make_store(tmp_path, s3, upload_client=client)
    data = os.urandom(100_000)
    assert upload_to(store, data, "models") == len(data)
    assert "put_object" in client.calls and "create_multipart_upload" not in client.calls
    assert load(store) == data


@pytest.mark.parametrize("how", ["too large", "cdn fails"])
def test_an_upload_that_fails_midway_drops_its_parts_and_leaves_the_old_model(tmp_path, s3, how):
    old = os.urandom(SIZE)
    store, api, cache = make_store(tmp_path, s3, max_upload=2 * PART + 10)
    upload(store, old)
    client = CountingClient(s3, fail="upload_part" if how == "cdn fails" else None)
    store, _, _ = make_store(tmp_path / "again", s3, upload_client=client, api=api, max_upload=2 * PART + 10)
    with pytest.raises((PayloadTooLarge, UpstreamError)):
        upload_to(store, os.urandom(3 * PART), "models")
    assert "abort_multipart_upload" in client.calls
    assert not s3.list_multipart_uploads(Bucket="models").get("Uploads")
    assert not list(Path(tmp_path / "again").rglob("*.part"))  # no staging file left
    assert load(store) == old


def test_another_folder_named_at_the_end_is_sent_there_whole(tmp_path, s3):
    s3.create_bucket(Bucket="other")
    client = CountingClient(s3)
    store, api, cache = make_store(tmp_path, s3, upload_client=client)
    data = os.urandom(2 * PART + 7)
    up = store.begin_upload("m.bin", "other")
    up.write(data)
    assert up.finish("models") == len(data)
    assert "abort_multipart_upload" in client.calls and "upload_file" in client.calls
    assert load(store) == data


@pytest.mark.parametrize("folder_first", [False, True])
@pytest.mark.parametrize("size", [1000, 3 * PART])
def test_an_upload_into_a_folder_the_cdn_does_not_have_yet_creates_its_bucket(
    tmp_path, s3, folder_first, size
):
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(size)
    up = store.begin_upload("m.bin", "fresh" if folder_first else None)
    up.write(data)
    assert up.finish("fresh") == size
    blob = blob_size(size)
    assert s3.head_object(Bucket="fresh", Key="m.bin.big")["ContentLength"] == blob - small_size(blob)
    assert load(store, folder="fresh") == data


def failing_hasher(cache, nth):
    """Have the cache's ``nth`` hash (and every one after it) fail with EIO."""
    calls = []
    real = cache.hasher

    def failing():
        calls.append(1)
        if len(calls) >= nth:
            raise OSError(errno.EIO, "Input/output error")
        return real()

    cache.hasher = failing


def test_a_disk_error_under_a_load_is_a_storage_error_never_a_bare_oserror(sealed):
    """A warm load (a cold one hashes nothing itself: its download's fetchers do) whose read-ahead fails
    once it has begun to stream."""
    store, api, cache, data = sealed
    assert load(store) == data and cache.settle(10)
    # the part's end (1), then blocks 0 and 1 read ahead before the answer; block 2's read fails
    failing_hasher(cache, 4)
    got = b""
    plaintext = store.load("models", "m.bin")
    with pytest.raises(StorageError, match="the model cache failed on .* [(]EIO[)]"):
        for chunk in plaintext:
            got += bytes(chunk)
    assert len(got) < len(data) and data.startswith(got)


def test_a_disk_error_under_a_download_is_a_storage_error_for_its_load(sealed):
    """A fetcher's disk error (here its hash of the third block) fails the download: its load gets a
    StorageError, before or after its first byte, never a bare OSError."""
    store, api, cache, data = sealed
    failing_hasher(cache, 3)
    got = b""
    with pytest.raises(StorageError, match="the model cache failed on models/m.bin.big [(]EIO[)]"):
        for chunk in store.load("models", "m.bin"):
            got += bytes(chunk)
    assert len(got) < len(data) and data.startswith(got)
    ended(cache)
    assert cache.transfers()[-1]["state"] == "failed" and "EIO" in cache.transfers()[-1]["error"]
    assert not os.path.exists(cache.path("models", "m.bin.big.meta"))


def test_a_disk_error_before_the_answer_is_a_storage_error(sealed):
    store, api, cache, data = sealed

    def failing():
        raise OSError(errno.EIO, "Input/output error")

    cache.hasher = failing  # the first hash is the load's check of the part's end, before the answer
    with pytest.raises(StorageError, match="[(]EIO[)]"):
        store.load("models", "m.bin")
    assert cache.settle(10)


def test_a_cache_folder_that_cannot_be_made_is_a_storage_error(sealed):
    store, api, cache, data = sealed
    for p in Path(cache.root, "models").iterdir():
        p.unlink()
    Path(cache.root, "models").rmdir()
    Path(cache.root, "models").write_bytes(b"")  # a file where the bucket's folder must go
    with pytest.raises(StorageError):
        store.load("models", "m.bin")


def test_a_staging_folder_that_cannot_be_made_is_a_storage_error(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    Path(cache.root).mkdir(parents=True, exist_ok=True)
    Path(cache.root, ".staging").write_bytes(b"")  # a file where the staging folder must go
    with pytest.raises(StorageError):
        store.begin_upload("m.bin")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("size", [500, 100_000])
def test_a_full_disk_under_a_staged_upload_is_a_storage_error_and_leaves_nothing(tmp_path, s3, size):
    """A big upload fails at a write, a small one (held in memory and in the file's buffer) at its finish."""
    from binary_split import StagedUpload

    store, api, cache = make_store(tmp_path, s3)
    part = tmp_path / "m.bin.big.part"
    part.symlink_to("/dev/full")  # every write that reaches it: ENOSPC
    up = StagedUpload(store, "m.bin", str(part), None)
    with pytest.raises(StorageError, match="no room"):
        up.write(os.urandom(size))
        up.finish("models")
    assert not part.is_symlink()  # the staging file (here the link) is gone
    assert ("models", "m.bin.manifest") not in api.store


class HeldHead(WrappedClient):
    """An S3 client whose first HEAD once ``hold`` is set waits for ``release``, after telling ``held``."""

    def __init__(self, client):
        super().__init__(client)
        self.held, self.release, self.hold = threading.Event(), threading.Event(), False

    def _takes(self):
        return False  # bodies pass as they are

    def head_object(self, **kw):
        if self.hold:
            self.hold = False
            self.held.set()
            assert self.release.wait(10)
        return self._c.head_object(**kw)


def test_a_load_that_found_no_cache_uses_the_part_another_load_committed_meanwhile(tmp_path, s3):
    # Load B finds the cache empty and asks the CDN's HEAD; before the answer, load A downloads the whole
    # part and commits it. B must use that part, not start a second download of it.
    client = HeldHead(s3)
    store, _, cache = make_store(tmp_path, s3, download_client=client)
    data = os.urandom(SIZE)
    upload(store, data)
    cache.discard("models", "m.bin.big")
    client.hold = True
    late = {}
    b = threading.Thread(target=lambda: late.setdefault("data", load(store)))
    b.start()
    assert client.held.wait(10)
    assert load(store) == data and cache.settle(10) and cache.downloads == 1
    client.release.set()
    b.join(10)
    assert late["data"] == data
    assert (cache.downloads, cache.hits) == (1, 1)


def test_a_load_holds_room_in_the_memory_budget_until_its_stream_ends_however_it_ends(sealed, s3):
    """The buffers of all loads come from one budget: a load reserves its blocks before it streams and gives
    them back when its stream ends: read to the end, stopped early, refused at a block, or never started."""
    store, api, cache, data = sealed
    budget = heap.Budget(64 * BLOCK)
    store._memory = budget
    held = LOAD_BUFFERS * BLOCK

    plaintext = store.load("models", "m.bin")
    assert budget.left == budget.total - held
    assert b"".join(plaintext) == data
    assert budget.left == budget.total

    chunks = iter(store.load("models", "m.bin"))
    next(chunks)
    chunks.close()  # a client that went away
    assert budget.left == budget.total

    store.load("models", "m.bin")  # prepared, never streamed (its client left before the first byte)
    until(lambda: gc.collect() is not None and budget.left == budget.total, what="the budget never came back")

    flip(s3, 10)
    cache.discard("models", "m.bin.big")
    with pytest.raises(IntegrityError):
        store.load("models", "m.bin")  # refused at its first block: nothing reserved stays held
    assert budget.left == budget.total


def test_a_load_waits_for_room_in_the_memory_budget_and_never_fails_for_it(sealed):
    store, api, cache, data = sealed
    store._memory = heap.Budget(LOAD_BUFFERS * BLOCK)
    first = store.load("models", "m.bin")
    got = []
    second = threading.Thread(target=lambda: got.append(load(store)), daemon=True)
    second.start()
    second.join(0.3)
    assert second.is_alive() and store._memory.waiting == 1
    assert b"".join(first) == data
    second.join(10)
    assert got == [data]


def test_a_cold_sealed_load_has_each_block_hashed_once(sealed):
    """The fetchers hash each block as it comes and check it against the manifest; the load that follows
    takes the blocks with those digests and hashes none a second time."""
    store, api, cache, data = sealed
    names = []
    real = cache.hasher
    cache.hasher = lambda: names.append(threading.current_thread().name) or real()
    assert load(store) == data
    ended(cache)
    count = len(json.loads(api.store[("models", "m.bin.manifest")])["blocks"])
    fetched = [n for n in names if n.startswith("cdn-models/m.bin.big-")]
    assert len(fetched) == count
    assert names == fetched, names
