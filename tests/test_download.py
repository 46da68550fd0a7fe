"""download: a download whose fetcher gives up (a CDN that trickles) fails at once, every wait of its readers
ended, and a later load starts a fresh one; the block record, the resume of a download a restart cut off,
and prefetches (contract section 8); the fetchers hash each block once and hand it to the load in memory,
within the one memory budget; the segments a download fetches, and TransferConfig."""

import errno
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

import download
from binary_split import LOAD_BUFFERS
from cdn_manager import CdnManager, ObjectInfo
from devstack import wait
from devstack.wait import until
from download import FAILED, BlockRecord, Download, Handover, TransferConfig, segments
from errors import (
    BadRequest,
    IntegrityError,
    NotFound,
    NotLoggedIn,
    StorageError,
    UpstreamError,
    UpstreamTimeout,
)
from heap import Budget
from model_cache import BigPartCache, Expect
from security import TAIL, tail_start
from tests.store_fakes import (
    BLOCK,
    MIB,
    CutAfter,
    EndAfter,
    FlakyClient,
    RecordingClient,
    WrappedClient,
    _streaming,
    block_digests,
    ended,
    fetchers_of,
    load,
    make_store,
    publish,
    recording_store,
)

ETAG = '"e"'
SIZE = 10_000  # two segments of 4096-byte blocks: the tail (the block at 8192) and the rest
BLOCK_SIZE = 4096
TIMEOUT = "the CDN transfer of models/m.bin.big made less than 16384 bytes/s for 30 s"


class StuckCdn:
    """A CDN whose transfers hang until the test lets them go. ``failing`` are the segment starts whose
    transfer then gives up with an UpstreamTimeout; the others wait for the download to stop them (fill's
    ``stop``) and stay inside until ``leave`` is set."""

    chunk_size = BLOCK_SIZE

    def __init__(self, failing):
        self.failing = failing
        self.give_up = threading.Event()
        self.leave = threading.Event()
        self.inside = []  # the starts of the transfers under way
        self.stopped = []  # the starts of the transfers told to stop
        self._lock = threading.Lock()

    def fill(self, bucket, key, info, buf, start=0, end=None, stop=None):
        with self._lock:
            self.inside.append(start)
        try:
            if start in self.failing:
                assert self.give_up.wait(10)
                raise UpstreamTimeout(TIMEOUT)
            until(stop, 10)  # the download's failure reaches a transfer stuck elsewhere
            self.stopped.append(start)
            assert self.leave.wait(10)
            raise UpstreamError(f"the CDN transfer of {bucket}/{key} was stopped")
        finally:
            with self._lock:
                self.inside.remove(start)
        yield 0  # a generator, as CdnManager.fill  # pragma: no cover


def waiting(call):
    """``call`` on a thread of its own; the list it leaves its result (or exception) in."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except Exception as exc:  # noqa: BLE001 - what the reader met
            outcome.append(exc)

    threading.Thread(target=run, daemon=True).start()
    return outcome


def start(tmp_path, cdn):
    cache = BigPartCache(str(tmp_path))
    download = Download(cache, "models", "m.bin.big", ObjectInfo(SIZE, ETAG), None, None, BLOCK_SIZE)
    runner = threading.Thread(target=download.run, args=(download.prepare(), cdn), daemon=True)
    runner.start()
    return download, runner


def test_a_download_whose_fetcher_times_out_fails_its_part_is_gone_and_its_readers_waits_end(tmp_path):
    cdn = StuckCdn(failing={0, tail_start(SIZE, BLOCK_SIZE)})
    download, runner = start(tmp_path, cdn)
    until(lambda: len(cdn.inside) == 2)  # both segments' transfers hang
    download.open_reader().close()  # a load follows it: it waits for the tail, and for the first block
    tail = waiting(download.wait_tail)
    first_block = waiting(lambda: download.block(0, BLOCK_SIZE, None))  # no time limit of its own
    assert not tail and not first_block and os.path.exists(download.part)
    cdn.give_up.set()
    until(lambda: tail and first_block, 10)
    assert isinstance(tail[0], UpstreamTimeout) and tail[0].detail == TIMEOUT
    assert first_block[0] is tail[0]
    assert download.state == FAILED and download.done
    runner.join(10)
    assert not runner.is_alive()
    assert not os.path.exists(download.part)  # a format-1 part is never resumed: gone once the download ended


def test_the_first_failure_ends_the_download_while_another_transfer_is_still_stuck(tmp_path):
    """The tail's transfer gives up; the other is stuck in a read that has yet to end. The download fails
    now (its readers are told), tells the stuck transfer to stop, and only ends (closing the file the
    fetchers write, and removing it: a format-1 part is not kept for a resume) once that one has."""
    cdn = StuckCdn(failing={tail_start(SIZE, BLOCK_SIZE)})
    download, runner = start(tmp_path, cdn)
    until(lambda: len(cdn.inside) == 2)
    download.open_reader().close()
    tail = waiting(download.wait_tail)
    cdn.give_up.set()
    until(lambda: tail, 10)
    assert isinstance(tail[0], UpstreamTimeout)
    assert download.state == FAILED
    until(lambda: cdn.stopped == [0], 10)
    assert cdn.inside == [0] and runner.is_alive()  # the stuck one is still inside its transfer
    assert os.path.exists(download.part)  # which may still write its file
    with pytest.raises(UpstreamTimeout):
        download.block(0, BLOCK_SIZE, None)
    cdn.leave.set()
    runner.join(10)
    assert not runner.is_alive() and not cdn.inside
    assert not os.path.exists(download.part)


class SlowUntilHealed(WrappedClient):
    """moto's S3 whose bodies give 64 bytes every 10 ms (6.4 KB/s) until ``healed`` is set."""

    def __init__(self, client):
        super().__init__(client)
        self.healed = threading.Event()

    def _takes(self):
        return not self.healed.is_set()

    def wrap(self, body):
        return _Trickle(body)


class _Trickle:
    def __init__(self, body):
        self._body = body

    def read(self, amt=None):
        time.sleep(0.01)
        return self._body.read(min(amt, 64))

    def close(self):
        self._body.close()


def test_a_load_after_a_download_that_timed_out_starts_a_fresh_one(tmp_path, s3):
    data = os.urandom(5 * BLOCK + 123)
    s3.put_object(Bucket="models", Key="m.bin.big", Body=data)
    client = SlowUntilHealed(s3)
    cdn = CdnManager(
        download_client=client,
        upload_client=s3,
        chunk_size=BLOCK,
        resumes=1,
        resume_backoff=0,
        speed_limit=64 * 1024,
        speed_time=0.2,
    )
    cache = BigPartCache(tmp_path / "cache", block_size=BLOCK)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="made less than 65536 bytes/s for 0.2 s"):
        _, blocks = cache.open(
            "models", "m.bin.big", cdn, Expect("models/m.bin")
        )  # the tail (123 bytes) is in
        for _ in blocks:  # the load waits for blocks that never come: cut off
            pass
    assert time.monotonic() - started < 2 * 2 * 0.2 + 2  # two transfers, each dropped within two windows
    ended(cache)
    assert not list((tmp_path / "cache").rglob("*.part"))
    client.healed.set()  # the CDN is well again: the next load fetches afresh, never joins the failed one
    _, blocks = cache.open("models", "m.bin.big", cdn, Expect("models/m.bin"))
    assert b"".join(bytes(b) for b in blocks) == data
    assert cache.settle(10) and cache.downloads == 2
    assert open(cache.path("models", "m.bin.big"), "rb").read() == data


# --- the block record (contract section 8.1) --------------------------------------------------------


def identity(**changed):
    """A record's identity: of an object of 11 blocks of BLOCK_SIZE, the last one short."""
    info = ObjectInfo(10 * BLOCK_SIZE + 5, ETAG)
    ident = BlockRecord.identity_of("models", "m.bin.big", info, "sha256:" + "ab" * 32, BLOCK_SIZE)
    ident.update(changed)
    return ident


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def written(tmp_path, text):
    """A record file holding ``text`` (bytes), as a power cut or another program may have left it."""
    path = tmp_path / "m.bin.big.0123456789abcdef0123456789abcdef.record"
    path.write_bytes(text)
    return str(path)


def head(**changed):
    return json.dumps(identity(**changed)).encode() + b"\n"


def test_a_record_reads_back_what_was_written(tmp_path):
    path = str(tmp_path / "m.bin.big.0123456789abcdef0123456789abcdef.record")
    record = BlockRecord.create(path, identity())
    record.add([0, 7])
    record.add([])
    record.mark_prefetch()
    record.mark_prefetch()  # once is enough
    record.add([10])
    record.close()
    record.close()  # closing twice is no error
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path, "rb").read().count(b"prefetch") == 1
    again = BlockRecord.read(path)
    try:
        assert again.identity == identity() and again.matches(identity())
        assert again.claimed == {0, 7, 10} and again.prefetch
        assert not again.matches(identity(etag='"other"')) and not again.matches(identity(version="sha256:x"))
        again.add([3])  # it is open for appending
    finally:
        again.close()
    assert BlockRecord.read(path).claimed == {0, 3, 7, 10}
    with pytest.raises(FileExistsError):  # never over another download's record
        BlockRecord.create(path, identity())


def test_a_record_without_a_prefetch_line_is_no_prefetch(tmp_path):
    record = BlockRecord.read(written(tmp_path, head() + b"1\n2\n"))
    record.close()
    assert record.claimed == {1, 2} and not record.prefetch


def test_a_torn_last_line_is_ignored(tmp_path):
    """A power cut in the middle of an append: the last line has no newline, and counts for nothing."""
    for torn in (b"1", b"12", b"prefet"):
        record = BlockRecord.read(written(tmp_path, head() + b"3\n4\n" + torn))
        record.close()
        assert record.claimed == {3, 4} and not record.prefetch


def test_garbage_and_out_of_range_lines_are_ignored(tmp_path):
    count = -(-identity()["size"] // BLOCK_SIZE)  # 11 blocks: 0..10
    lines = [b"abc", b"-1", b"1.5", b" 4", b"4 ", b"0x5", b"\x00\xff", b"", b"prefetchx", b"11", b"99999"]
    lines += [b"2", b"10", b"\xd9\xa3"]  # an Arabic-Indic digit is no digit of a record
    record = BlockRecord.read(written(tmp_path, head() + b"\n".join(lines) + b"\n"))
    record.close()
    assert record.claimed == {2, count - 1} and not record.prefetch


def test_a_line_of_thousands_of_digits_is_ignored_not_an_error(tmp_path):
    """int() refuses more than 4300 digits (ValueError): such a line is garbage like any other, never an
    exception out of read() (which a load or a prefetch would meet as a 500)."""
    before = open_fds()
    record = BlockRecord.read(written(tmp_path, head() + b"1" * 5000 + b"\n2\n"))
    assert record is not None
    record.close()
    assert record.claimed == {2}
    assert open_fds() == before


HEADS = {
    "empty": b"",
    "not JSON": b"{not json\n1\n",
    "not UTF-8": b"\xff\xfe\n1\n",
    "a list": b"[1, 2]\n",
    "nested deep": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "a key missing": json.dumps({k: v for k, v in identity().items() if k != "etag"}).encode() + b"\n",
    "a key more": head(extra=1),
    "size negative": head(size=-1),
    "size a bool": head(size=True),
    "size a float": json.dumps({**identity(), "size": 5.0}).encode() + b"\n",
    "size huge": head(size=2**70),
    "blockSize zero": head(blockSize=0),
    "blockSize huge": head(blockSize=2**40),
    "blockSize a string": head(blockSize="4096"),
    "etag not a string": head(etag=7),
    "version null": head(version=None),
    "bucket a list": head(bucket=["models"]),
}


@pytest.mark.parametrize("how", HEADS)
def test_a_record_with_a_wrong_header_is_none(tmp_path, how):
    before = open_fds()
    assert BlockRecord.read(written(tmp_path, HEADS[how] + b"0\n")) is None
    assert open_fds() == before


def test_a_record_over_the_size_cap_is_none(tmp_path):
    before = open_fds()
    padding = b"0\n" * (download.MAX_RECORD_BYTES // 2)
    assert BlockRecord.read(written(tmp_path, head() + padding)) is None
    assert open_fds() == before


def test_a_record_that_is_no_regular_file_or_a_link_is_none_and_never_blocks(tmp_path):
    fifo = tmp_path / "fifo.record"
    os.mkfifo(fifo)
    assert wait.bounded(lambda: BlockRecord.read(str(fifo)), 10, "reading a FIFO blocked") is None
    target = written(tmp_path, head() + b"1\n")
    (tmp_path / "link.record").symlink_to(target)
    assert BlockRecord.read(str(tmp_path / "link.record")) is None
    assert BlockRecord.read(str(tmp_path / "missing.record")) is None


# --- resuming a download after a restart (contract section 8.1) ----------------------------------


# Small segments, so a download runs on all its fetchers and a cut leaves blocks here and there.
CONFIG = TransferConfig(segment=4 * BLOCK, small_segment=2 * BLOCK)
MODEL = 24 * BLOCK + 777  # a sealed big part of 25 blocks, the last one short


def uploaded(tmp_path, s3, **options):
    """(store, api, cache, data, big) with a sealed model uploaded and the cache emptied (the next load or
    prefetch downloads it)."""
    store, api, cache = make_store(tmp_path, s3, cache_options={"config": CONFIG}, **options)
    data = os.urandom(MODEL)
    up = store.begin_upload("m.bin")
    up.write(data)
    assert up.finish("models") == len(data)
    cache.discard("models", "m.bin.big")
    return store, api, cache, data, s3.get_object(Bucket="models", Key="m.bin.big")["Body"].read()


def restarted(tmp_path, s3, api, client=None, config=CONFIG):
    """A store and its cache made afresh on the same cache folder, as the loader after a restart; its CDN
    client records the GETs."""
    return make_store(
        tmp_path, s3, api=api, download_client=client or RecordingClient(s3), cache_options={"config": config}
    )


def files(cache, pattern):
    return sorted(Path(cache.root).rglob(pattern))


def interrupted(tmp_path, s3, prefetch=False, allowed=10 * BLOCK):
    """A sealed model whose download failed after the CDN's link sent ``allowed`` bytes and went down for
    good (started by a load, or by a prefetch): (api, data, big, part, record, claimed blocks)."""
    store, api, cache, data, big = uploaded(tmp_path, s3, download_client=CutAfter(s3, allowed))
    if prefetch:
        code, status = store.prefetch("models", "m.bin")
        assert code == 202 and status["state"] == "fetching"
    else:
        with pytest.raises(UpstreamError):
            load(store)
    ended(cache)
    (status,) = cache.transfers()
    assert status["state"] == "failed" and "kept breaking off" in status["error"]
    (part,) = files(cache, "*.part")
    (record,) = files(cache, "*.record")
    assert part.name[: -len(".part")] == record.name[: -len(".record")]
    kept = BlockRecord.read(str(record))
    kept.close()
    assert kept.prefetch == prefetch
    assert kept.claimed and len(kept.claimed) < blocks_of(big)
    held = part.read_bytes()
    for i in kept.claimed:  # the record names only blocks whose bytes are there
        assert held[i * BLOCK : (i + 1) * BLOCK] == big[i * BLOCK : (i + 1) * BLOCK]
    return api, data, big, part, record, kept.claimed


def blocks_of(big):
    return -(-len(big) // BLOCK)


def size_of(big, blocks):
    return sum(min(len(big), (i + 1) * BLOCK) - i * BLOCK for i in blocks)


def ranges(big, missing):
    """The GETs of a download that fetches the blocks ``missing``."""
    return sorted(f"bytes={s}-{e - 1}" for s, e in segments(len(big), BLOCK, missing, CONFIG))


def assert_resumed(s3, cache, client, big, resumed, fetched):
    """The download committed ``big`` having held the blocks ``resumed`` already and fetched the blocks
    ``fetched`` alone, each GET pinned to the object's ETag."""
    ended(cache)
    assert sorted(client.gets) == ranges(big, fetched)
    assert set(client.pins) == {s3.head_object(Bucket="models", Key="m.bin.big")["ETag"]}
    (status,) = cache.transfers()
    assert status == {
        "folder": "models",
        "name": "m.bin",
        "state": "cached",
        "bytesDone": len(big),
        "bytesTotal": len(big),
        "bytesResumed": size_of(big, resumed),
        "error": None,
    }
    assert cache.bytes_resumed == size_of(big, resumed) and cache.downloads == 1
    assert open(cache.path("models", "m.bin.big"), "rb").read() == big
    assert not files(cache, "*.part") and not files(cache, "*.record")


def test_a_download_cut_off_resumes_after_a_restart_fetching_only_the_blocks_it_lacks(tmp_path, s3):
    api, data, big, part, record, claimed = interrupted(tmp_path, s3)
    client = RecordingClient(s3)
    store, _, cache = restarted(tmp_path, s3, api, client)
    assert part.exists() and record.exists()  # the sweep keeps a part with its record
    assert load(store) == data
    missing = set(range(blocks_of(big))) - claimed
    assert_resumed(s3, cache, client, big, claimed, missing)
    assert load(store) == data and cache.hits == 1


def test_a_claimed_block_whose_bytes_are_wrong_is_fetched_again(tmp_path, s3):
    api, data, big, part, record, claimed = interrupted(tmp_path, s3)
    bad = min(claimed)
    with open(part, "r+b") as f:  # the record claims it, the disk lost it (zeroed)
        f.seek(bad * BLOCK)
        f.write(bytes(size_of(big, [bad])))
    client = RecordingClient(s3)
    store, _, cache = restarted(tmp_path, s3, api, client)
    assert load(store) == data
    missing = set(range(blocks_of(big))) - claimed
    assert_resumed(s3, cache, client, big, claimed - {bad}, missing | {bad})


def test_a_part_a_power_cut_truncated_is_resumed_right(tmp_path, s3):
    api, data, big, part, record, claimed = interrupted(tmp_path, s3)
    cut = sorted(claimed)[len(claimed) // 2] * BLOCK + 100  # in the middle of a claimed block
    os.truncate(part, cut)
    client = RecordingClient(s3)
    store, _, cache = restarted(tmp_path, s3, api, client)
    assert load(store) == data
    kept = {i for i in claimed if i * BLOCK + size_of(big, [i]) <= cut}
    assert kept and kept != claimed
    assert_resumed(s3, cache, client, big, kept, set(range(blocks_of(big))) - kept)


@pytest.mark.parametrize(
    "field,value",
    [("etag", '"replaced"'), ("version", "sha256:" + "00" * 32), ("size", MODEL), ("blockSize", 2 * BLOCK)],
)
def test_a_leftover_of_another_object_or_manifest_is_discarded_and_fetched_afresh(tmp_path, s3, field, value):
    """The record names another ETag (the object was replaced on the CDN while the loader was down), another
    manifest, size or block size: its part is no use to this download."""
    api, data, big, part, record, claimed = interrupted(tmp_path, s3)
    lines = record.read_bytes().split(b"\n")
    header = json.loads(lines[0])
    header[field] = value
    record.write_bytes(b"\n".join([json.dumps(header).encode(), *lines[1:]]))
    client = RecordingClient(s3)
    store, _, cache = restarted(tmp_path, s3, api, client)
    assert load(store) == data
    assert not part.exists() and not record.exists()  # discarded
    assert_resumed(s3, cache, client, big, set(), set(range(blocks_of(big))))


def test_a_format1_download_cut_off_keeps_nothing_and_starts_over(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3, download_client=CutAfter(s3, 10 * BLOCK))
    data = os.urandom(MODEL)
    big = publish(s3, api, data)
    with pytest.raises(UpstreamError):
        load(store)
    ended(cache)
    assert not files(cache, "*.part") and not files(cache, "*.record")
    # A record and part beside it, for this very object as a sealed download would have left them: a
    # format-1 download never takes them up.
    info = ObjectInfo(len(big), s3.head_object(Bucket="models", Key="m.bin.big")["ETag"])
    stem = cache.path("models", "m.bin.big") + ".0123456789abcdef0123456789abcdef"
    ident = BlockRecord.identity_of("models", "m.bin.big", info, "v", BLOCK)
    forged = BlockRecord.create(stem + ".record", ident)
    forged.add([0, 1])
    forged.close()
    Path(stem + ".part").write_bytes(big)
    client = RecordingClient(s3)
    store, _, cache = restarted(tmp_path, s3, api, client)
    assert load(store) == data
    assert not os.path.exists(stem + ".record") and not os.path.exists(stem + ".part")
    assert_resumed(s3, cache, client, big, set(), set(range(blocks_of(big))))


# --- prefetch (contract section 8.4) ------------------------------------------------------------


STATUS_KEYS = {"folder", "name", "state", "bytesDone", "bytesTotal", "bytesResumed", "error"}


def test_a_prefetch_stages_the_part_and_a_second_one_finds_it_cached(tmp_path, s3):
    release = threading.Event()
    memory = Budget(64 * BLOCK)
    hold = EndAfter(s3, release, "bytes=0-")
    store, api, cache, data, big = uploaded(tmp_path, s3, download_client=hold, memory=memory)
    code, status = store.prefetch("models", "m.bin")
    assert memory.left <= memory.total - BLOCK  # its first buffer, held while it runs
    assert code == 202 and set(status) == STATUS_KEYS
    assert (status["folder"], status["name"], status["state"]) == ("models", "m.bin", "fetching")
    assert (status["bytesTotal"], status["bytesResumed"], status["error"]) == (len(big), 0, None)
    (record,) = files(cache, "*.record")
    marked = BlockRecord.read(str(record))
    marked.close()
    assert marked.prefetch  # a restart that cuts it off resumes it after the next login
    release.set()
    ended(cache)
    assert memory.left == memory.total
    (status,) = cache.transfers()
    assert status["state"] == "cached" and status["bytesDone"] == len(big)
    assert store.prefetch("models", "m.bin") == (
        200,
        {
            "folder": "models",
            "name": "m.bin",
            "state": "cached",
            "bytesDone": len(big),
            "bytesTotal": len(big),
            "bytesResumed": 0,
            "error": None,
        },
    )
    assert load(store) == data
    assert (cache.downloads, cache.hits) == (1, 1)
    assert not files(cache, "*.record")


def test_a_prefetch_joins_the_download_a_load_started(tmp_path, s3):
    release = threading.Event()
    store, api, cache, data, big = uploaded(tmp_path, s3, download_client=EndAfter(s3, release, "bytes=0-"))
    plaintext = store.load("models", "m.bin")
    chunks = iter(plaintext)
    first = bytes(next(chunks))
    for _ in range(2):
        code, status = store.prefetch("models", "m.bin")
        assert code == 202 and status["state"] == "fetching"
    assert cache.downloads == 1
    (record,) = files(cache, "*.record")
    marked = BlockRecord.read(str(record))
    marked.close()
    assert marked.prefetch  # now a prefetch's, too
    release.set()
    assert first + b"".join(bytes(c) for c in chunks) == data
    ended(cache)
    assert cache.downloads == 1 and [s["state"] for s in cache.transfers()] == ["cached"]


def test_a_load_follows_the_download_a_prefetch_started(tmp_path, s3):
    release = threading.Event()
    store, api, cache, data, big = uploaded(tmp_path, s3, download_client=EndAfter(s3, release, "bytes=0-"))
    assert store.prefetch("models", "m.bin")[0] == 202
    got = waiting(lambda: load(store))
    until(lambda: cache.misses == 1)  # it follows the prefetch's download
    assert not got
    release.set()
    until(lambda: got)
    assert got == [data] and cache.downloads == 1
    ended(cache)


def test_a_format1_prefetch_stages_the_part(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3)
    data = os.urandom(MODEL)
    big = publish(s3, api, data)
    assert store.prefetch("models", "m.bin")[0] == 202
    ended(cache)
    code, status = store.prefetch("models", "m.bin")
    assert code == 200 and status["state"] == "cached" and status["bytesTotal"] == len(big)
    assert load(store) == data and (cache.downloads, cache.hits) == (1, 1)


def test_a_prefetch_is_refused_as_a_load_would_be(tmp_path, s3):
    store, api, cache = make_store(tmp_path, s3, require_manifest=True)
    publish(s3, api, os.urandom(1000))  # format 1
    with pytest.raises(IntegrityError, match="has no manifest"):
        store.prefetch("models", "m.bin")
    with pytest.raises(NotFound):
        store.prefetch("models", "nope.bin")
    with pytest.raises(BadRequest):
        store.prefetch("models", "../m.bin")
    api.user = None
    with pytest.raises(NotLoggedIn):
        store.prefetch("models", "m.bin")
    assert cache.downloads == 0


def test_a_prefetch_a_restart_cut_off_goes_on_after_the_next_login(tmp_path, s3):
    api, data, big, part, record, claimed = interrupted(tmp_path, s3, prefetch=True)
    client = RecordingClient(s3)
    store, _, cache = restarted(tmp_path, s3, api, client)
    assert cache.interrupted_prefetches() == [("models", "m.bin.big")]
    store.resume_prefetches()
    assert_resumed(s3, cache, client, big, claimed, set(range(blocks_of(big))) - claimed)
    assert cache.interrupted_prefetches() == []
    assert load(store) == data and cache.hits == 1


def test_only_a_prefetch_s_leftover_is_resumed_by_itself(tmp_path, s3):
    """A load's leftover waits for the next load; resume_prefetches starts nothing for it."""
    api, data, big, part, record, claimed = interrupted(tmp_path, s3, prefetch=False)
    store, _, cache = restarted(tmp_path, s3, api)
    assert cache.interrupted_prefetches() == []
    store.resume_prefetches()
    assert cache.downloads == 0 and part.exists() and record.exists()


def test_a_prefetch_that_cannot_go_on_after_a_restart_is_only_logged(tmp_path, s3, caplog):
    api, data, big, part, record, claimed = interrupted(tmp_path, s3, prefetch=True)
    del api.store[("models", "m.bin.small")]  # the resource is gone from the API meanwhile
    store, _, cache = restarted(tmp_path, s3, api)
    store.resume_prefetches()  # never raises: it runs on a thread of its own after a login
    assert "could not resume the prefetch of models/m.bin" in caplog.text
    assert cache.downloads == 0


def test_an_interrupted_prefetch_is_listed_only_from_its_own_bucket_folder(tmp_path, s3):
    """A record copied into another bucket's folder names an object of "models": it is not listed (the
    prefetch would fetch the wrong folder's object into the right one, or the other way round)."""
    api, data, big, part, record, claimed = interrupted(tmp_path, s3, prefetch=True)
    other = Path(part.parent.parent, "other")
    other.mkdir()
    for f in (part, record):
        f.rename(other / f.name)
    store, _, cache = restarted(tmp_path, s3, api)
    assert cache.interrupted_prefetches() == []


def test_a_record_with_a_garbled_line_costs_a_hash_never_a_failed_load(tmp_path, s3):
    """A line of 5000 digits in a leftover's record (garbage, as a torn write or another program leaves it):
    the load resumes the rest as ever; the record read never raises (a ValueError here was a 500)."""
    api, data, big, part, record, claimed = interrupted(tmp_path, s3)
    with open(record, "ab") as f:
        f.write(b"7" * 5000 + b"\n")
    client = RecordingClient(s3)
    store, _, cache = restarted(tmp_path, s3, api, client)
    assert load(store) == data
    assert_resumed(s3, cache, client, big, claimed, set(range(blocks_of(big))) - claimed)


class Trapped(WrappedClient):
    """The link goes quiet as the first GET from byte 4 * BLOCK begins: that GET's read hangs (until
    ``quiet`` is set, then breaks off), and the first GET from byte 0 breaks off after two blocks, once the
    other hangs. The GETs after them pass."""

    def __init__(self, client):
        super().__init__(client)
        self.quiet, self.hanging = threading.Event(), threading.Event()
        self._rules = {0: "break", 4 * BLOCK: "hang"}

    def get_object(self, **kw):
        start = int(kw["Range"].split("=")[1].split("-")[0])
        with self._lock:
            rule = self._rules.pop(start, None)
        r = super().get_object(**kw)
        if rule is not None:
            r["Body"] = _Trap(r["Body"].read(), rule, self)
        return r

    def _takes(self):
        return False


class _Trap:
    def __init__(self, data, rule, link):
        self._data, self._rule, self._link = data[: 2 * BLOCK], rule, link

    def read(self, amt=None):
        if self._rule == "hang":
            self._link.hanging.set()
            assert self._link.quiet.wait(30)
            raise ConnectionResetError("the link went quiet")
        if not self._data:
            assert self._link.hanging.wait(30)
            raise ConnectionResetError("cut")
        data, self._data = self._data[:amt], self._data[amt:]
        return data

    def close(self):
        pass


def test_a_load_right_after_a_download_failed_resumes_what_it_held(tmp_path, s3):
    """A download fails (one transfer broke off) while another of its transfers still hangs in a read (a
    link gone quiet, until the watchdog drops it). A client that tries again at once must resume what the
    failed download held (contract section 8.1), not fetch it all again and throw the held blocks away."""
    client = Trapped(s3)
    store, api, cache, data, big = uploaded(tmp_path, s3, download_client=client, cdn_options={"resumes": 0})
    with pytest.raises(UpstreamError):
        load(store)
    (failed,) = cache.transfers()
    assert failed["state"] == "failed" and failed["bytesDone"] > 0
    retry = waiting(lambda: load(store))
    try:
        until(lambda: retry or cache.downloads == 2, 1)
    except TimeoutError:
        pass  # the retry waits for the failed download to end
    client.quiet.set()
    until(lambda: retry, 10)
    assert retry == [data]
    ended(cache)
    states = {s["state"]: s for s in cache.transfers()}
    assert set(states) == {"failed", "cached"}
    assert states["cached"]["bytesResumed"] == states["failed"]["bytesDone"] > 0


def test_a_leftover_being_resumed_is_never_evicted_to_make_room_for_it(tmp_path, s3):
    """The cache is over its budget (an upload's part came in: uploads are not budgeted) and the leftover
    of an interrupted download is its least recently written part. The download that resumes it needs no
    more room, but the cache must come back under its budget: the other part goes, never the leftover the
    download is about to take up (evicting it made the download fail on its missing .part, a 507)."""
    api, data, big, part, record, claimed = interrupted(tmp_path, s3)
    config = TransferConfig(segment=4 * BLOCK, small_segment=2 * BLOCK, cache_min_free=0)
    client = RecordingClient(s3)
    store, _, cache = restarted(tmp_path, s3, api, client, config)
    up = store.begin_upload("x.bin")
    up.write(os.urandom(MODEL))
    assert up.finish("models") == MODEL
    now = time.time()
    for path, age in ((part, 100), (record, 100), (Path(cache.path("models", "x.bin.big")), 50)):
        os.utime(path, (now - age, now - age))
    cache.disk.max_bytes = cache.usage()["bytesUsed"] - 1
    assert load(store) == data
    assert not os.path.exists(cache.path("models", "x.bin.big")) and cache.evictions == 1
    assert_resumed(s3, cache, client, big, claimed, set(range(blocks_of(big))) - claimed)


# --- the hand-over of blocks from the fetchers to the loads ------------------------------------------


def handover(lead=3, slack=1, budget=None):
    cond = threading.Condition()
    budget = budget or Budget(100 * BLOCK_SIZE)
    config = TransferConfig(handoff_blocks=lead, handoff_slack=slack)
    return cond, budget, Handover(cond, budget, BLOCK_SIZE, config)


def buffer():
    return memoryview(bytearray(BLOCK_SIZE))


def test_blocks_are_held_for_the_first_load_within_the_lead_then_the_nearest_ones_kept():
    cond, budget, h = handover(lead=3)
    with cond:
        mine = [buffer() for _ in range(6)]
        others = [h.offer(i, mine[n]) for n, i in enumerate((5, 6, 7))]  # no load yet: held for the first
        assert all(o is not None for o in others) and budget.left == budget.total - 3 * BLOCK_SIZE
        assert h.offer(8, mine[3]) is None  # no buffer left, and the held ones are all nearer: not held
        swapped = h.offer(2, mine[4])  # nearer than the furthest held: that one gives its buffer back
        assert swapped is mine[2] and sorted(h.held) == [2, 5, 6]
        assert h.held[2] is mine[4]


def test_no_block_is_held_without_a_lead_or_once_every_load_has_left():
    cond, budget, h = handover(lead=0)
    with cond:
        assert h.offer(0, buffer()) is None and not h.held
    cond, budget, h = handover(lead=3)
    with cond:
        h.join()
        h.leave()
        assert h.offer(0, buffer()) is None and not h.held and budget.left == budget.total


def test_blocks_a_load_has_passed_go_back_to_the_fetchers():
    cond, budget, h = handover(lead=4, slack=1)
    with cond:
        h.join()
        for i in range(4):
            h.offer(i, buffer())
        h.ask(3)  # blocks before 3 - slack are no load's any more
        assert sorted(h.held) == [2, 3] and len(h.free) == 2
        assert h.offer(1, buffer()) is None  # passed already
        taken = len(h._taken)
        assert h.offer(4, buffer()) is not None and len(h._taken) == taken  # a free buffer, none more taken


def test_the_budget_gets_the_hand_over_s_buffers_back_once_the_fetchers_ended_and_no_load_follows():
    cond, budget, h = handover(lead=3)
    with cond:
        h.join()
        for i in range(3):
            h.offer(i, buffer())
        assert budget.left == budget.total - 3 * BLOCK_SIZE
        h.end()  # the fetchers have ended: a load still follows, and may take the held blocks
        assert sorted(h.held) == [0, 1, 2] and budget.left == budget.total - 3 * BLOCK_SIZE
        h.leave()
        assert not h.held and not h.free and budget.left == budget.total


def test_the_hand_over_takes_no_room_a_load_waits_for():
    cond, budget, h = handover(lead=3, budget=Budget(3 * BLOCK_SIZE))
    held = budget.reserve(2 * BLOCK_SIZE)
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.reserve(2 * BLOCK_SIZE)), daemon=True)
    waiter.start()
    until(lambda: budget.waiting == 1)
    with cond:
        assert h.offer(0, buffer()) is None and not h.held  # a block's room is free, but a load waits
    assert budget.left == BLOCK_SIZE
    held.release()
    waiter.join(5)
    assert got and budget.left == BLOCK_SIZE


class FailsBeforeItsAnswer(Download):
    """A download that has failed and ended before the prefetch that started it answers."""

    def mark_prefetch(self):
        self.ended.wait(10)
        super().mark_prefetch()


def test_a_prefetch_whose_download_failed_before_its_answer_is_that_error(tmp_path, s3):
    """Not a 202 that says "failed" (the soak met one under a CDN 503 burst): the download's failure, with
    the status a load would get."""
    options = {"config": CONFIG, "download": FailsBeforeItsAnswer}
    store, api, cache = make_store(
        tmp_path, s3, download_client=CutAfter(s3, 0), cdn_options={"resumes": 0}, cache_options=options
    )
    up = store.begin_upload("m.bin")
    up.write(os.urandom(MODEL))
    up.finish("models")
    cache.discard("models", "m.bin.big")
    with pytest.raises(UpstreamError):
        store.prefetch("models", "m.bin")
    assert [d["state"] for d in cache.transfers()] == ["failed"]


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
