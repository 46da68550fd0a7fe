"""download: a download whose fetcher gives up (a CDN that trickles) fails at once, its .part file gone,
every wait of its readers ended, and a later load starts a fresh one."""

import os
import threading
import time

import pytest

from cdn_manager import CdnManager, ObjectInfo
from devstack.wait import until
from download import FAILED, Download, tail_start
from errors import UpstreamError, UpstreamTimeout
from model_cache import BigPartCache, Expect
from tests.store_fakes import BLOCK, WrappedClient

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
    assert download.state == FAILED and download.done and not os.path.exists(download.part)
    runner.join(10)
    assert not runner.is_alive()


def test_the_first_failure_ends_the_download_while_another_transfer_is_still_stuck(tmp_path):
    """The tail's transfer gives up; the other is stuck in a read that has yet to end. The download fails
    now (its readers are told, its .part file is gone), tells the stuck transfer to stop, and only ends
    (closing the file the fetchers write) once that one has."""
    cdn = StuckCdn(failing={tail_start(SIZE, BLOCK_SIZE)})
    download, runner = start(tmp_path, cdn)
    until(lambda: len(cdn.inside) == 2)
    download.open_reader().close()
    tail = waiting(download.wait_tail)
    cdn.give_up.set()
    until(lambda: tail, 10)
    assert isinstance(tail[0], UpstreamTimeout)
    assert download.state == FAILED and not os.path.exists(download.part)
    until(lambda: cdn.stopped == [0], 10)
    assert cdn.inside == [0] and runner.is_alive()  # the stuck one is still inside its transfer
    with pytest.raises(UpstreamTimeout):
        download.block(0, BLOCK_SIZE, None)
    cdn.leave.set()
    runner.join(10)
    assert not runner.is_alive() and not cdn.inside


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
    assert cache.settle(10) and not list((tmp_path / "cache").rglob("*.part"))
    client.healed.set()  # the CDN is well again: the next load fetches afresh, never joins the failed one
    _, blocks = cache.open("models", "m.bin.big", cdn, Expect("models/m.bin"))
    assert b"".join(bytes(b) for b in blocks) == data
    assert cache.settle(10) and cache.downloads == 2
    assert open(cache.path("models", "m.bin.big"), "rb").read() == data
