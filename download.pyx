# cython: language_level=3, embedsignature=True
"""One CDN download of a big part into a ``.part`` file that loads follow while it grows.

The object is fetched as ranged segments on a few threads (socket reads, file writes and hashes run
outside the GIL, so they overlap), its end first: a load checks the blob's last block before it streams.
A fetcher hands each block it has written to the loads in memory (``_offer``), and keeps near them while
they move on (``_pace``), so a cold load reads nothing back from the disk. A load takes whole blocks so,
or from the file once they are written, hashes them and lets none go that does not match what it must
be; the digests it takes count for the download too. Once every byte is in and no load
streams any more, the download hashes the blocks no load has hashed, and only a download whose every block
is accounted for is committed to the cache.

    FETCHING ──> VERIFYING ──> COMMITTED
        │            │
        └────────────┴──────> FAILED      (the .part file is gone before a reader hears of it)

``abandon`` (the cache discarded the part while it downloaded) lets the download finish for its readers
but never commit.

The first failure (a fetcher's transfer that gave up, UpstreamTimeout for a CDN that trickles; a block
that does not match; a disk error) ends the download at once: it is FAILED, its .part file gone and its
readers told, while a fetcher still inside a transfer is asked to give up (``stop`` of cdn.fill: at its
next read, or within the CDN's speed_time when it is stuck) and only then joined; the buffer it holds (one
block, outside the hand-over budget given back at the failure) goes with it. So every wait of a load
(``wait_tail``, ``block``) and of a fetcher (``_pace``) ends with the failure, and a later load, which never
joins a download that is done, starts a fresh one.

Threads: the download's own (``run``), FETCHERS fetchers, and the loads that follow it. ``cond`` guards the
state, the progress, the hand-over and the count of fetchers still running; the loads' and the
fetchers' waits are on it. Lock order: a cache's lock, then ``cond``, then the handoff budget's lock;
cdn.fill takes no lock of ours (its ``stop`` reads ``_stop`` without one).
"""

import errno
import logging
import os
import threading
import uuid
from time import monotonic

from aligned_io import (DIRECT_ALIGN, READ_AHEAD, aligned_buffer, open_direct, open_reader, read_blocks,
                        read_hashed, start_writeback, without_direct, write_all)
from constants import MANIFEST_BLOCK_SIZE
from errors import IntegrityError, LoaderError, UpstreamError, storage_error

log = logging.getLogger("loader.cdn")

FETCHING = "fetching"
VERIFYING = "verifying"
COMMITTED = "committed"
FAILED = "failed"

# Each GET costs the CDN and botocore a few milliseconds, so the bulk goes in large segments; the last
# FETCHERS segments before the tail are small, so the fetchers finish close together.
SEGMENT = 16 * 1024 * 1024
SMALL_SEGMENT = 8 * 1024 * 1024
FETCHERS = 3
# The loads following a download take its blocks from memory, not through the disk (hand-over): all
# downloads together hold at most HANDOFF_BYTES of blocks for them. A fetcher keeps within a few blocks of
# the furthest block a load asked for while that load moves on (one that asked for nothing new in
# PACE_STALL seconds no longer holds it back), so the blocks it fetches are the ones the load wants next.
HANDOFF_BYTES = 48 * 1024 * 1024
PACE_STALL = 0.1
# A held block this far behind the furthest block a load asked for is no load's any more.
HANDOFF_SLACK = 4


class Budget:
    """Bytes that may still be taken (for block buffers), shared by threads."""

    def __init__(self, total):
        self.total = self.left = total
        self._lock = threading.Lock()

    def take(self, n):
        with self._lock:
            if self.left < n:
                return False
            self.left -= n
            return True

    def give(self, n):
        with self._lock:
            self.left += n


handoff_budget = Budget(HANDOFF_BYTES)
# Bytes at the end of a big part a load checks before streaming: the last cipher block and the block before
# it, which is all CBC needs to decrypt the last block alone (its padding gives the plaintext's size).
TAIL = 32
PART_SUFFIX = ".part"


def tail_start(long long size, long long block_size):
    """Where the object's tail segment starts: at the block that holds its last TAIL bytes."""
    return max(0, size - TAIL) // block_size * block_size


def segments(size, block_size=MANIFEST_BLOCK_SIZE):
    """The ranged segments of an object, in the order they are fetched: its tail (the block that holds its
    last TAIL bytes, and any after it) first, since a load checks it before it streams; then the rest from
    the start."""
    tail = tail_start(size, block_size)
    if not tail:
        return [(0, size)] if size else []
    order = [(tail, size)]
    pos = 0
    while pos < tail:
        step = SEGMENT if tail - pos - SEGMENT >= FETCHERS * SMALL_SEGMENT else SMALL_SEGMENT
        order.append((pos, min(tail, pos + step)))
        pos = order[-1][1]
    return order


def _lowest_priority():
    """Give the calling thread the lowest CPU priority (Linux: nice applies per thread). Lowering one's
    own priority needs no privilege; where it fails the thread just runs at the usual priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class Download:
    """A download of ``bucket/key`` (as ``info``: size and ETag) for ``cache``.

    ``blocks`` are the digests the part's blocks of ``block_size`` bytes must have (a manifest's), or None
    for a format-1 part: then the digests are taken as the blocks come and kept beside the cached part.
    ``version`` names what the blocks belong to (a manifest's identity, or None). ``unlink`` removes the
    .part file of a failed download (os.unlink; a test's acts in the very moment the file is gone).
    """

    def __init__(self, cache, bucket, key, info, blocks, version, block_size, unlink=os.unlink,
                 budget=handoff_budget):
        self.cache, self.bucket, self.key, self.info = cache, bucket, key, info
        self._unlink = unlink
        self.version = version
        self.expected = blocks
        self.block_size = block_size
        self.digests = [None] * (-(-info.size // self.block_size))
        self.cond = threading.Condition()
        self.state = FETCHING
        self.written = 0
        self.error = None  # what readers see: set only once the .part file is gone
        self._stop = None  # the first failure: stops the fetchers, fails the download
        self._fetching = 0  # fetchers still running
        self._readers = 0  # loads streaming this download right now
        self._abandoned = False
        self._direct = -1  # the .part file, O_DIRECT where allowed: the fetchers' writes and the hash
        self.part = cache.path(bucket, key) + f".{uuid.uuid4().hex}{PART_SUFFIX}"
        self._order = segments(info.size, block_size)
        self._segments = sorted(self._order)
        self._index = {start: i for i, (start, _) in enumerate(self._segments)}
        self._progress = [0] * len(self._segments)
        self._next = self._frontier = 0
        self.tail_ready = not self._segments
        # The hand-over (see _offer): blocks held (index -> buffer) until a load takes one; buffers the
        # fetchers may fill; how many buffers of the budget this download has; how far ahead the fetchers
        # go (0: no hand-over, blocks too large for the budget).
        self._held = {}
        self._free = []
        self._owned = 0
        self._budget = budget
        self._lead = budget.total // block_size - READ_AHEAD - 2 if block_size else 0
        if self._lead < 2:
            self._lead = 0
        self._joined = False  # a load has come
        self._asked = -1  # the furthest block a load asked for, and when
        self._asked_at = 0.0

    @property
    def done(self):
        return self.state in (COMMITTED, FAILED)

    def prepare(self):
        """Create the .part file with all its space reserved: a full disk fails here, before streaming."""
        try:
            os.makedirs(os.path.dirname(self.part), exist_ok=True)
            fd = self.cache.opener(self.part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            log.debug("creating %s failed", self.part, exc_info=True)
            raise storage_error(exc, f"{self.bucket}/{self.key}") from exc
        try:
            if self.info.size:
                os.posix_fallocate(fd, 0, self.info.size)
        except OSError as exc:
            log.debug("reserving %d bytes for %s failed", self.info.size, self.part, exc_info=True)
            os.close(fd)
            os.unlink(self.part)
            raise storage_error(exc, f"{self.bucket}/{self.key}") from exc
        try:
            self._direct = open_direct(self.part, os.O_RDWR, self.cache.opener)
        except OSError:
            self._direct = -1  # the plain descriptor does it all
        return fd

    def run(self, fd, cdn):
        """Fetch the segments on a few threads, account for every block, then commit to the cache; a
        failure is recorded for the readers, never raised."""
        direct = self._direct if self._direct >= 0 else fd
        workers = [threading.Thread(target=self._fetcher, args=(fd, cdn), daemon=True,
                                    name=f"cdn-{self.bucket}/{self.key}-{n}")
                   for n in range(min(FETCHERS, len(self._segments)))]
        try:
            for w in workers:
                with self.cond:
                    self._fetching += 1
                w.start()
            with self.cond:
                # The first failure fails the download now (below), not once every fetcher has ended: one
                # may be inside a transfer that has yet to give up.
                self.cond.wait_for(lambda: not self._fetching or self._stop is not None)
                if self._stop is not None:
                    raise self._stop
                self.state = VERIFYING
                self._free = []  # the fetchers are done with them
                self._settle()
            self._hash_the_rest(direct)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            with self.cond:
                if self._stop is not None:
                    raise self._stop
                if self._abandoned:
                    raise IntegrityError(f"{self.bucket}/{self.key} was discarded while it downloaded")
                self.cache.commit(self.bucket, self.key, self.part, self.info, self.version, self.digests,
                                  self.block_size)
                self.state = COMMITTED
                self.cond.notify_all()
        except OSError as exc:
            log.debug("download of %s/%s failed", self.bucket, self.key, exc_info=True)
            self._fail(storage_error(exc, f"{self.bucket}/{self.key}"))
        except LoaderError as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - a reader must never wait on a thread that died silently
            log.exception("download of %s/%s failed", self.bucket, self.key)
            self._fail(UpstreamError(f"the CDN download failed ({type(exc).__name__})"))
        finally:
            # The descriptors close only once no fetcher can write through them any more.
            for w in workers:
                if w.ident is not None:
                    w.join()
            for d in (fd, self._direct):
                if d >= 0:
                    os.close(d)

    def _hash_the_rest(self, int fd):
        """Hash the blocks no load has hashed. The loads streaming this download hash as they go, so this
        waits for them first: beside a load that runs as fast as the machine allows, a second hash slowed it
        by about 15 %. A load still streaming ``hash_grace`` seconds after the fetch ended is paced by its
        client: the rest is then hashed beside it, at the lowest CPU priority, from the end backwards."""
        with self.cond:
            self.cond.wait_for(lambda: not self._readers or self._stop is not None, self.cache.hash_grace)
            beside = self._readers > 0
        if beside:
            _lowest_priority()
        buf = None
        cdef long long size = self.info.size, start
        for i in range(len(self.digests) - 1, -1, -1):
            if self._stop is not None:
                return
            if self.digests[i] is not None:
                continue
            buf = buf or aligned_buffer(self.block_size)
            start = i * self.block_size
            _, digest = read_hashed(fd, buf, start, min(size, start + self.block_size) - start, self.cache.hasher)
            self.hashed(i, digest)

    def hashed(self, int index, digest):
        """A block's digest, taken by a load or by the download itself: for a sealed part it must be the
        manifest's (else the download fails and is never committed)."""
        if self.expected is not None and digest != self.expected[index]:
            exc = IntegrityError(f"block {index} of {self.bucket}/{self.key} does not match its manifest")
            self.reject(exc)
            raise exc
        self.digests[index] = digest

    def reject(self, exc):
        """Stop the download for good: its bytes are not what they must be."""
        self._record(exc)

    def _fetcher(self, fd, cdn):
        """A fetcher's thread: ``_fetch``, then one fetcher less (run waits for none left, or a failure)."""
        try:
            self._fetch(fd, cdn)
        finally:
            with self.cond:
                self._fetching -= 1
                self.cond.notify_all()

    def _stopped(self):
        """For the fetchers' transfers (cdn.fill's ``stop``): the download has failed, give up. Reads
        ``_stop`` without the lock: a transfer asks it from the CDN's watchdog too, under that one's lock."""
        return self._stop is not None

    def _fetch(self, fd, cdn):
        """One fetcher: takes the next segment, reads it into its buffer and writes it into place, until
        none is left or one fails. A buffer of a whole block, once written, may be handed over to the loads
        (``_offer``): the fetcher goes on in another."""
        cdef long long pos, bs = self.block_size
        cdef long long tail = tail_start(self.info.size, bs)
        whole = self._lead > 0
        size = bs if whole else cdn.chunk_size
        buf = aligned_buffer(size)[:size]
        while True:
            with self.cond:
                if self._stop is not None or self._next >= len(self._order):
                    return
                start, end = self._order[self._next]
                self._next += 1
            index = self._index[start]
            pos = start
            if whole and start < tail:  # the tail goes first, whatever the loads ask for
                self._pace(start // bs)
            try:
                fill = cdn.fill(self.bucket, self.key, self.info, buf, start, end, stop=self._stopped)
                n = next(fill, None)
                while n is not None:
                    self._write(fd, buf[:n], pos)
                    other = None
                    if whole and pos % bs == 0 and (n == bs or pos + n == self.info.size):
                        other = self._offer(pos // bs, buf)
                    pos += n
                    with self.cond:
                        if self._stop is not None:
                            return
                        self._progress[index] += n
                        if pos == end == self.info.size:
                            self.tail_ready = True
                            self.cond.notify_all()
                        self._advance()
                    if other is not None:
                        buf = other
                    if whole and pos < min(end, tail):
                        self._pace(pos // bs)
                    try:
                        n = fill.send(other)
                    except StopIteration:
                        n = None
            except OSError as exc:
                log.debug("writing segment %d of %s/%s failed", index, self.bucket, self.key, exc_info=True)
                self._record(storage_error(exc, f"{self.bucket}/{self.key}"))
                return
            except LoaderError as exc:
                self._record(exc)
                return
            except Exception as exc:  # noqa: BLE001 - recorded, and raised by run() for the readers
                log.exception("segment %d of %s/%s failed", index, self.bucket, self.key)
                self._record(UpstreamError(f"the CDN download failed ({type(exc).__name__})"))
                return
            if pos != end:
                self._record(IntegrityError(f"the CDN sent {pos - start} of {end - start} bytes of a segment"))
                return
            start_writeback(fd, start, end)

    def _offer(self, long long index, buf):
        """A fetcher wrote block ``index`` from ``buf``. Hold the buffer for the loads (a load takes the block
        from memory, no disk read) and answer the buffer the fetcher goes on in; or None, and the fetcher
        keeps ``buf``, when no load would take the block soon: none follows (the first has yet to come: the
        blocks are held for it), all have passed it, or the held blocks are all nearer to them and no buffer
        is left."""
        with self.cond:
            if self._stop is not None or (self._joined and not self._readers) or \
                    index < self._asked - HANDOFF_SLACK:
                return None
            if self._free:
                other = self._free.pop()
            elif self._budget.take(self.block_size):
                self._owned += 1
                other = aligned_buffer(self.block_size)[:self.block_size]
            else:
                furthest = max(self._held, default=-1)
                if furthest <= index:
                    return None
                other = self._held.pop(furthest)
            self._held[index] = buf
            self.cond.notify_all()
            return other

    def _pace(self, long long index):
        """Before a fetcher reads block ``index``: wait while that is more than the lead ahead of the loads
        and they move on, so that its blocks reach them in memory."""
        with self.cond:
            while self._readers and self._stop is None and index > self._asked + self._lead:
                left = self._asked_at + PACE_STALL - monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)

    def block(self, long long index, long long end, timeout):
        """For read_blocks: block ``index`` (ending at byte ``end``) as a buffer held in memory, True once it
        is in the file, False when neither came within ``timeout`` seconds (None: no limit); raises the
        download's failure when it never will come."""
        with self.cond:
            if index > self._asked:
                self._asked, self._asked_at = index, monotonic()
                self.cond.notify_all()  # a fetcher may go on
                for stale in [i for i in self._held if i < index - HANDOFF_SLACK]:
                    self._reuse(self._held.pop(stale))
            self.cond.wait_for(lambda: index in self._held or self.written >= end or self.error is not None,
                               timeout)
            held = self._held.pop(index, None)
            if held is not None:
                self.cache.handed += 1
                return held
            if self.written < end and self.error is not None:
                raise self.error
            return self.written >= end

    def give_back(self, buf):
        """A load is done with a buffer that ``block`` handed it."""
        with self.cond:
            self._reuse(buf)

    def _reuse(self, buf):
        """Under the lock: a buffer no load will take goes back to the fetchers (dropped once they ended)."""
        if self.state == FETCHING and self._stop is None:
            self._free.append(buf)

    def _settle(self):
        """Under the lock: once the fetchers have ended (the download is past FETCHING) and no load follows,
        the held blocks go and the budget has this download's bytes back."""
        if self.state != FETCHING and not self._readers:
            self._held = {}
            self._budget.give(self._owned * self.block_size)
            self._owned = 0

    def _write(self, int fd, view, long long pos):
        """Write ``view`` (the start of an aligned buffer) at ``pos``: its whole blocks past the page cache
        when ``pos`` is aligned, the rest (the end of the object, or a segment starting mid-block)
        through the plain descriptor."""
        cdef Py_ssize_t bulk = 0
        direct = self._direct
        if direct >= 0 and pos % DIRECT_ALIGN == 0:
            bulk = len(view) - len(view) % DIRECT_ALIGN
            try:
                write_all(direct, view[:bulk], pos)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                without_direct(direct)
                bulk = 0
        write_all(fd, view[bulk:], pos + bulk)

    def _advance(self):
        """Under the lock: move ``written`` to the end of the contiguous prefix that is on disk."""
        segments, progress = self._segments, self._progress
        while self._frontier < len(segments) and progress[self._frontier] == \
                segments[self._frontier][1] - segments[self._frontier][0]:
            self._frontier += 1
        written = segments[self._frontier - 1][1] if self._frontier else 0
        if self._frontier < len(segments):
            written += progress[self._frontier]
        if written != self.written:
            # Loads wait for whole blocks: wake them when one is complete, not at every MiB.
            if written // self.block_size != self.written // self.block_size or written == self.info.size:
                self.cond.notify_all()
            self.written = written

    def _record(self, exc):
        """The first failure: stop the fetchers; run() cleans up and only then tells the readers."""
        with self.cond:
            if self._stop is None:
                self._stop = exc
            self.cond.notify_all()

    def _fail(self, exc):
        # One step under the lock: a load joining now (open_reader) must never find the .part file gone
        # and the failure not yet told (it met FileNotFoundError, a 500, in the soak).
        with self.cond:
            self._stop = self._stop or exc
            try:
                self._unlink(self.part)
            except OSError:
                pass
            self.error = exc
            self.state = FAILED
            self._free, self._held = [], {}
            self._settle()
            self.cond.notify_all()

    def wait_tail(self):
        """Wait for the object's last segment (fetched first) or the failure."""
        with self.cond:
            while not self.tail_ready and not self.done:
                self.cond.wait()
            if self.error is not None:
                raise self.error

    def open_reader(self):
        """The file for a load to ``follow``: the .part file, or the cache's once committed. The load counts
        as streaming from here on (so the download leaves the hashing to it) until its stream ends, or
        ``leave`` when it never streams.

        A failed download raises its failure, a disk error (EMFILE, EIO) a StorageError. None when it
        committed in the very moment the load came and the cached part is already gone (the cache was
        cleared): the load then fetches it afresh, as one a moment later would."""
        with self.cond:
            if self.error is not None:
                raise self.error
            committed = self.state == COMMITTED
            try:
                f = open_reader(self.cache.path(self.bucket, self.key) if committed else self.part,
                                self.cache.opener)
            except OSError as exc:
                if committed and exc.errno == errno.ENOENT:
                    return None
                log.debug("opening %s/%s for a load failed", self.bucket, self.key, exc_info=True)
                raise storage_error(exc, f"{self.bucket}/{self.key}") from exc
            self._readers += 1
            self._joined = True
            return f

    def leave(self):
        with self.cond:
            self._readers -= 1
            if not self._readers:  # no load would take the held blocks
                for buf in self._held.values():
                    self._reuse(buf)
                self._held = {}
                self._settle()
            self.cond.notify_all()

    def follow(self, f, first=0):
        """Yield the file's blocks from block ``first`` as they are written, each once its digest passed
        ``hashed``; views of reused buffers, as read_blocks gives them. The stream ends with the last
        block: the commit follows on its own. ``f`` comes from open_reader."""
        try:
            with f:
                for i, view, digest in read_blocks(f.fileno(), self.info.size, self.block_size,
                                                   self.cache.hasher, first, self):
                    self.hashed(i, digest)
                    yield view
        finally:
            self.leave()

    def abandon(self):
        """The part was discarded while in flight: it finishes for its readers, but is never committed."""
        with self.cond:
            self._abandoned = True
