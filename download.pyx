# cython: language_level=3, embedsignature=True
"""One CDN download of a big part into a ``.part`` file that loads follow while it grows, and that a restart
resumes (contract section 8).

The object is fetched as ranged segments of whole blocks on a few threads, its tail first (a load checks
the blob's last block before it streams). A fetcher hashes each block as it comes (a sealed part's block
must match its manifest, else the download fails), writes it into place, and hands the buffer to the loads
that follow (``Handover``), so a cold load reads nothing back from the disk and hashes nothing twice. Every
so often the download's own thread makes the blocks written since durable (fdatasync) and only then names
them in the part's ``BlockRecord``; a restart finds the record, hashes the blocks it claims again, and
fetches only the rest.

    FETCHING ──> VERIFYING ──> CACHED
        │            │
        └────────────┴──────> FAILED

VERIFYING is the last fsync and the commit. ``abandon`` (the cache discarded the part while it downloaded)
lets the download finish for its readers but never commit. The first failure (a fetcher's transfer that
gave up, a block that does not match, a disk error) fails the download at once: its readers are told, its
fetchers give up at their next step (cdn.fill's ``stop``), and the download's thread joins them. The part
and its record stay for the next try when they are worth resuming (a sealed part, not abandoned); else
they are removed.

Threads: the download's own (``run``: it verifies what a record claims, starts the fetchers, checkpoints
the record, commits), up to ``config.fetchers`` fetchers, and the loads that follow.

Locks: ``cond`` guards the state, the failure, the blocks held (``_have``, ``digests``, the byte counts),
the segments handed out, the blocks not yet durable, and the hand-over (whose methods run under it). The
record has no lock of its own: only the download's thread writes it. Lock order: the cache's lock, then a
download's ``cond``, then the memory budget's (heap.buffers); cdn.fill takes no lock of ours (its ``stop``
reads the state without one).

Buffers: each fetcher fills one block buffer of its own. The first fetcher's comes from the reservation the
download was started with (waited for, so a download always makes progress); the others' only from room
that is free (``Budget.try_take``). A block written may be handed over: the buffer then belongs to the
hand-over until a load takes it (then to the load, until ``give_back``), and the fetcher goes on in a free
one. Buffers the hand-over took from the budget go back once the fetchers have ended and no load follows.
"""

import errno
import json
import logging
import os
import threading
import uuid
from time import monotonic

from aligned_io import (DIRECT_ALIGN, aligned_buffer, open_direct, open_reader, read_blocks, read_hashed,
                        start_writeback, without_direct, write_all)
from constants import MANIFEST_BLOCK_SIZE, MAX_MANIFEST_BLOCK_SIZE, MAX_RESOURCE_BYTES
from errors import IntegrityError, LoaderError, UpstreamError, storage_error
from security import tail_start

log = logging.getLogger("loader.cdn")

FETCHING = "fetching"
VERIFYING = "verifying"
CACHED = "cached"
FAILED = "failed"

PART_SUFFIX = ".part"
RECORD_SUFFIX = ".record"
MiB = 1024 * 1024


class TransferConfig:
    """Every tunable of the CDN downloads and the cache, in one place (built from main.Settings).

    - ``fetchers`` threads fetch a download's segments; ``segment`` and ``small_segment`` bytes (rounded to
      whole blocks) per ranged GET: each GET costs the CDN and botocore a few milliseconds, so the bulk goes
      in large segments, and the last ``fetchers`` segments are small so the fetchers finish together.
    - ``memory_bytes`` (LOAD_MEMORY_BYTES) is the one budget of buffers (heap.buffers): a load holds
      binary_split.LOAD_BUFFERS blocks (7 of 4 MiB: 28 MiB) while it streams; a download one block per
      fetcher (4 to 12 MiB); the hand-over at most ``handoff_blocks`` blocks (48 MiB) while loads follow.
      Peak memory is about the process's ~90 MB plus this budget, whatever the number of loads.
    - ``pace_stall`` seconds: a load that asked for no new block this long no longer holds the fetchers
      back; ``handoff_slack`` blocks: a held block this far behind the furthest block a load asked for is
      no load's any more.
    - ``checkpoint_seconds`` and ``checkpoint_bytes``: how often the blocks written are made durable and
      named in the record (whichever comes first); a crash costs at most that much, and the blocks in
      flight.
    - ``max_bytes_per_s`` (CDN_MAX_BYTES_PER_S): all downloads together, 0 = no cap (cdn_manager.Throttle).
    - ``cache_max_bytes`` (MODEL_CACHE_MAX_BYTES, 0 = the disk) and ``cache_min_free``
      (MODEL_CACHE_MIN_FREE_BYTES): the disk budget (disk_budget.DiskBudget).
    """

    def __init__(self, *, fetchers=3, segment=16 * MiB, small_segment=8 * MiB, memory_bytes=128 * MiB,
                 handoff_blocks=12, pace_stall=0.1, handoff_slack=4, checkpoint_seconds=1.0,
                 checkpoint_bytes=128 * MiB, max_bytes_per_s=0, cache_max_bytes=0, cache_min_free=1 << 30):
        for name, value in (("fetchers", fetchers), ("segment", segment), ("small_segment", small_segment)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer")
        for name, value in (("memory_bytes", memory_bytes), ("handoff_blocks", handoff_blocks),
                            ("max_bytes_per_s", max_bytes_per_s), ("cache_max_bytes", cache_max_bytes),
                            ("cache_min_free", cache_min_free), ("checkpoint_bytes", checkpoint_bytes)):
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be an integer of 0 or more")
        self.fetchers, self.segment, self.small_segment = fetchers, segment, small_segment
        self.memory_bytes, self.handoff_blocks = memory_bytes, handoff_blocks
        self.pace_stall, self.handoff_slack = pace_stall, handoff_slack
        self.checkpoint_seconds, self.checkpoint_bytes = checkpoint_seconds, checkpoint_bytes
        self.max_bytes_per_s = max_bytes_per_s
        self.cache_max_bytes, self.cache_min_free = cache_max_bytes, cache_min_free

    @classmethod
    def from_settings(cls, s):
        return cls(memory_bytes=s.load_memory_bytes, max_bytes_per_s=s.cdn_max_bytes_per_s,
                   cache_max_bytes=s.model_cache_max_bytes, cache_min_free=s.model_cache_min_free_bytes)


def segments(size, block_size=MANIFEST_BLOCK_SIZE, missing=None, config=None):
    """The ranged segments that fetch the blocks ``missing`` (indices; None: all) of an object, in the order
    they are fetched: the tail's blocks first, since a load checks them before it streams; then the others
    from the start, runs of consecutive blocks cut into segments of whole blocks."""
    config = config or TransferConfig()
    count = -(-size // block_size)
    missing = range(count) if missing is None else sorted(missing)
    first_tail = tail_start(size, block_size) // block_size
    runs, tail = [], []
    for i in missing:
        if i >= first_tail:
            tail.append(i)
        elif runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    big = max(1, config.segment // block_size)
    small = max(1, config.small_segment // block_size)
    left = sum(end - start for start, end in runs)
    order = [(tail[0] * block_size, min(size, (tail[-1] + 1) * block_size))] if tail else []
    for start, end in runs:
        while start < end:
            step = big if left - big >= config.fetchers * small else small
            stop = min(end, start + step)
            order.append((start * block_size, min(size, stop * block_size)))
            left -= stop - start
            start = stop
    return order


class BlockRecord:
    """The durable record of the blocks a download holds, beside its ``.part`` file (contract section 8.1).

    A text file: a JSON header naming what the part is (bucket, key, ETag, size, manifest version, block
    size), then one line per block, its index, appended only once the block's bytes are on disk (fdatasync
    of the part) and its SHA-256 matched the manifest: the record is written after the data it describes,
    never before. A line ``prefetch`` says a prefetch asked for the download (it goes on after a restart
    and a login). A torn or garbled line (a power cut) is skipped: every block a record claims is hashed
    again before it is used, so a record can cost a hash, never a wrong byte."""

    PREFETCH = "prefetch"

    def __init__(self, path, identity, claimed=(), prefetch=False, fd=-1):
        self.path = path
        self.identity = identity
        self.claimed = set(claimed)
        self.prefetch = prefetch
        self._fd = fd

    @staticmethod
    def identity_of(bucket, key, info, version, block_size):
        return {"bucket": bucket, "key": key, "etag": info.etag, "size": info.size, "version": version,
                "blockSize": block_size}

    @classmethod
    def create(cls, path, identity, opener=os.open):
        fd = opener(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_APPEND, 0o600)
        try:
            write_all(fd, (json.dumps(identity, sort_keys=True) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, identity, fd=fd)

    @classmethod
    def read(cls, path, opener=os.open):
        """The record at ``path`` (open for appending), or None when it is not one this loader wrote."""
        try:
            fd = opener(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            raw = os.read(fd, MAX_RECORD_BYTES + 1)
            head, _, rest = raw.partition(b"\n")
            identity = _identity(head)
            if identity is None or len(raw) > MAX_RECORD_BYTES:
                os.close(fd)
                return None
        except (OSError, ValueError):
            os.close(fd)
            return None
        count = -(-identity["size"] // identity["blockSize"])
        claimed, prefetch = set(), False
        for line in rest.split(b"\n")[:-1]:  # the last piece has no newline: torn, or empty
            if line.isdigit() and len(line) <= 20 and int(line) < count:  # never a huge int to parse
                claimed.add(int(line))
            elif line == cls.PREFETCH.encode():
                prefetch = True
        return cls(path, identity, claimed, prefetch, fd)

    def matches(self, identity):
        return self.identity == identity

    def add(self, indices):
        """Name blocks whose bytes are durable (the caller fdatasynced the part after writing them)."""
        if indices and self._fd >= 0:
            os.write(self._fd, "".join(f"{i}\n" for i in indices).encode())
            self.claimed.update(indices)

    def mark_prefetch(self):
        if not self.prefetch and self._fd >= 0:
            os.write(self._fd, f"{self.PREFETCH}\n".encode())
            self.prefetch = True

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# A record is a header and a line per block: a part of MAX_RESOURCE_BYTES in the smallest blocks a manifest
# may have would need far less than this.
MAX_RECORD_BYTES = 8 * MiB


def _identity(head):
    """A record's header line as its identity dict, or None when it is not one."""
    try:
        identity = json.loads(head)
    except (ValueError, RecursionError):
        return None
    if not isinstance(identity, dict) or set(identity) != {"bucket", "key", "etag", "size", "version",
                                                           "blockSize"}:
        return None
    size, block_size = identity["size"], identity["blockSize"]
    if type(size) is not int or not 0 <= size <= MAX_RESOURCE_BYTES or type(block_size) is not int or \
            not 0 < block_size <= MAX_MANIFEST_BLOCK_SIZE:
        return None
    if not all(isinstance(identity[k], str) for k in ("bucket", "key", "etag", "version")):
        return None
    return identity


class Handover:
    """The blocks a download's fetchers hand to the loads that follow it, in memory. Every method runs under
    the download's ``cond``.

    A fetcher that wrote a block ``offer``s its buffer: held for the loads when one would take it soon, and
    the fetcher goes on in a free buffer (or one more from the budget); a fetcher ``pace``s itself to stay
    within ``lead`` blocks of the furthest block a load asked for, while the loads move on, so the blocks it
    fetches are the ones they want next. A load ``take``s a held block, and gives its buffer back."""

    def __init__(self, cond, budget, block_size, config):
        self._cond = cond
        self._budget = budget
        self.block_size = block_size
        self.lead = config.handoff_blocks
        self.slack = config.handoff_slack
        self.stall = config.pace_stall
        self.held = {}  # block index -> buffer
        self.free = []  # buffers the fetchers may fill
        self._taken = []  # reservations of the buffers taken from the budget
        self.readers = 0  # loads following the download right now
        self.joined = False  # a load has come
        self.fetching = True  # until the fetchers have ended
        self.asked = -1  # the furthest block a load asked for, and when
        self.asked_at = 0.0

    def offer(self, long long index, buf):
        """A fetcher wrote block ``index`` from ``buf``: the buffer it goes on in, or None (it keeps ``buf``)
        when no load would take the block soon: none follows (the first has yet to come: the blocks are held
        for it), all have passed it, or the held blocks are all nearer to them and no buffer is left."""
        if not self.lead or (self.joined and not self.readers) or index < self.asked - self.slack:
            return None
        if self.free:
            other = self.free.pop()
        else:
            taken = self._budget.try_take(self.block_size) if len(self._taken) < self.lead else None
            if taken is not None:
                self._taken.append(taken)
                other = aligned_buffer(self.block_size)[:self.block_size]
            else:
                furthest = max(self.held, default=-1)
                if furthest <= index:
                    return None
                other = self.held.pop(furthest)
        self.held[index] = buf
        self._cond.notify_all()
        return other

    def pace(self, long long index, stopped):
        """Before a fetcher reads block ``index``: wait while that is more than the lead ahead of the loads
        and they move on."""
        while self.readers and not stopped() and index > self.asked + self.lead:
            left = self.asked_at + self.stall - monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def ask(self, long long index):
        """A load wants block ``index`` next: blocks it has passed are no load's any more."""
        if index > self.asked:
            self.asked, self.asked_at = index, monotonic()
            self._cond.notify_all()  # a fetcher may go on
            for stale in [i for i in self.held if i < index - self.slack]:
                self.reuse(self.held.pop(stale))

    def reuse(self, buf):
        """A buffer no load will take goes back to the fetchers (dropped once they have ended)."""
        if self.fetching:
            self.free.append(buf)

    def join(self):
        self.readers += 1
        self.joined = True

    def leave(self):
        self.readers -= 1
        if not self.readers:  # no load would take the held blocks
            for buf in self.held.values():
                self.reuse(buf)
            self.held = {}
            self.settle()

    def end(self):
        """The fetchers have ended (or the download failed): nothing more is offered."""
        self.fetching = False
        self.free = []
        self.settle()

    def settle(self):
        """Once the fetchers have ended and no load follows, the budget has this download's buffers back."""
        if not self.fetching and not self.readers:
            self.held = {}
            for taken in self._taken:
                taken.release()
            self._taken = []


class Download:
    """A download of ``bucket/key`` (as ``info``: size and ETag) for ``cache``.

    ``blocks`` are the digests the part's blocks of ``block_size`` bytes must have (a manifest's), or None
    for a format-1 part: then the digests are taken as the blocks come and kept beside the cached part.
    ``version`` names what the blocks belong to (a manifest's identity, or None). ``memory`` is the
    reservation of the first fetcher's buffer (released when the download ends); ``leftover`` the
    (part path, BlockRecord) of an interrupted download of this very object to resume.
    """

    def __init__(self, cache, bucket, key, info, blocks, version, block_size, memory=None, leftover=None,
                 config=None, budget=None):
        self.cache, self.bucket, self.key, self.info = cache, bucket, key, info
        self.version = version
        self.expected = blocks
        self.block_size = block_size
        self.config = config or cache.config
        self._memory = memory
        self._budget = budget or cache.buffers
        self.count = -(-info.size // block_size)
        self.digests = [None] * self.count
        self.cond = threading.Condition()
        self.state = FETCHING
        self.failure = None  # the first failure; the state is FAILED from that moment
        # Set once the fetchers are joined and the part kept or removed: a download that failed only then
        # leaves its part to the next one (which resumes it).
        self.ended = threading.Event()
        self._abandoned = False
        self._have = bytearray(self.count)  # 1: the block is in the file, and its digest is right
        self.bytes_done = 0
        self.bytes_resumed = 0
        self._unsynced = []  # blocks written since the last checkpoint
        self._unsynced_bytes = 0
        self._fetching = 0  # fetchers still running
        self._order = []
        self._next = 0
        self._tail = range(tail_start(info.size, block_size) // block_size, self.count)
        self.handover = Handover(self.cond, self._budget, block_size, self.config)
        self._direct = -1  # the .part file, O_DIRECT where allowed: the fetchers' writes
        self.record = None
        if leftover is not None:
            self.part, self.record = leftover
        else:
            self.part = cache.path(bucket, key) + f".{uuid.uuid4().hex}{PART_SUFFIX}"

    @property
    def done(self):
        return self.state in (CACHED, FAILED)

    @property
    def prefetch(self):
        return self.record is not None and self.record.prefetch

    def status(self):
        """The download status of contract section 4."""
        with self.cond:
            return {"folder": self.bucket, "name": self.cache.name_of(self.key), "state": self.state,
                    "bytesDone": self.bytes_done, "bytesTotal": self.info.size,
                    "bytesResumed": self.bytes_resumed,
                    "error": None if self.failure is None else self.failure.detail}

    def mark_prefetch(self):
        """A prefetch asked for this download: a restart that interrupts it resumes it after a login. A
        prefetch is no load: no block is held in memory for one until a load comes."""
        with self.cond:
            self.handover.joined = True
            if self.record is not None and not self.done:
                try:
                    self.record.mark_prefetch()
                except OSError:
                    log.debug("marking %s as a prefetch failed", self.part, exc_info=True)

    def prepare(self):
        """Create (or reopen, to resume) the .part file with all its space reserved, and the record of a
        sealed part: a full disk fails here, before streaming."""
        record_path = self.part[:-len(PART_SUFFIX)] + RECORD_SUFFIX
        resume = self.record is not None
        try:
            os.makedirs(os.path.dirname(self.part), exist_ok=True)
            flags = os.O_RDWR | os.O_NOFOLLOW | (0 if resume else os.O_CREAT | os.O_EXCL)
            fd = self.cache.opener(self.part, flags, 0o600)
        except OSError as exc:
            log.debug("opening %s failed", self.part, exc_info=True)
            raise storage_error(exc, f"{self.bucket}/{self.key}") from exc
        try:
            if resume and os.fstat(fd).st_size > self.info.size:
                os.ftruncate(fd, self.info.size)
            if self.info.size:
                os.posix_fallocate(fd, 0, self.info.size)  # also what a power cut cut off of a leftover
            if not resume and self.expected is not None:
                identity = BlockRecord.identity_of(self.bucket, self.key, self.info, self.version,
                                                   self.block_size)
                self.record = BlockRecord.create(record_path, identity, self.cache.opener)
        except OSError as exc:
            log.debug("reserving %d bytes for %s failed", self.info.size, self.part, exc_info=True)
            os.close(fd)
            self._remove()
            raise storage_error(exc, f"{self.bucket}/{self.key}") from exc
        try:
            self._direct = open_direct(self.part, os.O_RDWR, self.cache.opener)
        except OSError:
            self._direct = -1  # the plain descriptor does it all
        return fd

    def run(self, fd, cdn):
        """Verify what a record claims, fetch the rest on a few threads, then commit to the cache; a failure
        is recorded for the readers, never raised."""
        workers = []
        buf = aligned_buffer(self.block_size)[:self.block_size]
        try:
            self._verify_claimed(fd, buf)
            missing = [i for i in range(self.count) if not self._have[i]]
            self._order = segments(self.info.size, self.block_size, missing, self.config)
            with self.cond:
                self._tail_check()
            buffers = [buf]
            extra = []
            while len(buffers) < min(self.config.fetchers, len(self._order)):
                taken = self._budget.try_take(self.block_size)
                if taken is None:
                    break
                extra.append(taken)
                buffers.append(aligned_buffer(self.block_size)[:self.block_size])
            workers = [threading.Thread(target=self._fetcher, args=(fd, cdn, b), daemon=True,
                                        name=f"cdn-{self.bucket}/{self.key}-{n}")
                       for n, b in enumerate(buffers)]
            del buf, buffers
            try:
                with self.cond:
                    self._fetching = len(workers)
                for w in workers:
                    w.start()
                self._until_fetched(fd)
            finally:
                for w in workers:
                    if w.ident is not None:
                        w.join()
                for taken in extra:
                    taken.release()
                with self.cond:
                    self.handover.end()
            with self.cond:
                if self.failure is not None:
                    raise self.failure
                self.state = VERIFYING
            os.fsync(fd)
            os.close(fd)
            fd = -1
            with self.cond:
                if self.failure is not None:
                    raise self.failure
                if self._abandoned:
                    raise IntegrityError(f"{self.bucket}/{self.key} was discarded while it downloaded")
                self.cache.commit(self.bucket, self.key, self.part, self.info, self.version, self.digests,
                                  self.block_size)
                self.state = CACHED
                self.cond.notify_all()
            self._remove_record()
        except OSError as exc:
            log.debug("download of %s/%s failed", self.bucket, self.key, exc_info=True)
            self._fail(storage_error(exc, f"{self.bucket}/{self.key}"))
        except LoaderError as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - a reader must never wait on a thread that died silently
            log.exception("download of %s/%s failed", self.bucket, self.key)
            self._fail(UpstreamError(f"the CDN download failed ({type(exc).__name__})"))
        finally:
            self._end(fd)

    def _end(self, fd):
        """After the fetchers: keep the part and its record for the next try when they are worth resuming,
        else remove them; close the files; the first fetcher's buffer goes back to the budget."""
        if self.state == FAILED:
            keep = self.record is not None and not self._abandoned
            if keep:
                try:
                    self._checkpoint(fd)
                except OSError:
                    keep = False
            if not keep:
                self._remove()
        for d in (fd, self._direct):
            if d >= 0:
                os.close(d)
        if self.record is not None:
            self.record.close()
        if self._memory is not None:
            self._memory.release()
        self.ended.set()

    def _verify_claimed(self, int fd, buf):
        """Hash every block the leftover's record claims again: those that match are held (and not fetched
        again), the others are fetched. The tail's blocks first, which loads wait for."""
        if self.record is None or not self.record.claimed:
            return
        cdef long long size = self.info.size, start
        claimed = sorted(self.record.claimed, key=lambda i: (i not in self._tail, i))
        bad = 0
        for i in claimed:
            if self.failure is not None:
                return
            start = i * self.block_size
            try:
                _, digest = read_hashed(fd, buf, start, min(size, start + self.block_size) - start,
                                        self.cache.hasher)
            except IntegrityError:  # the file ends before it (a power cut truncated it)
                digest = None
            if digest is None or digest != self.expected[i]:
                bad += 1
                continue
            with self.cond:
                self.digests[i] = digest
                self._have[i] = 1
                n = min(size, start + self.block_size) - start
                self.bytes_done += n
                self.bytes_resumed += n
                self.cond.notify_all()
        log.info("resuming the download of %s/%s: %d of %d bytes held, %d claimed blocks fetched again",
                 self.bucket, self.key, self.bytes_resumed, size, bad)

    def _until_fetched(self, fd):
        """The download's thread while the fetchers run: make the blocks written durable and name them in the
        record, at least every checkpoint_seconds, until the fetchers have all ended or one failed."""
        while True:
            with self.cond:
                self.cond.wait_for(lambda: not self._fetching or self.failure is not None or
                                   self._unsynced_bytes >= self.config.checkpoint_bytes,
                                   self.config.checkpoint_seconds)
                over = not self._fetching or self.failure is not None
            if self.failure is None:
                self._checkpoint(fd)
            if over:
                return

    def _checkpoint(self, int fd):
        """fdatasync the part, then name in the record the blocks written before it: never before their
        bytes are on disk."""
        if self.record is None or fd < 0:
            return
        with self.cond:
            blocks, self._unsynced, self._unsynced_bytes = self._unsynced, [], 0
        if blocks:
            os.fdatasync(fd)
            self.record.add(blocks)

    def _tail_check(self):
        """Under the lock: wake the loads waiting for the tail once all its blocks are in."""
        if all(self._have[i] for i in self._tail):
            self.cond.notify_all()

    @property
    def tail_ready(self):
        return all(self._have[i] for i in self._tail)

    def hashed(self, int index, digest):
        """A block's digest, as a load read it from the file: it must be the manifest's (or, for format 1,
        the one the fetcher took), else the download fails and is never committed."""
        want = self.expected[index] if self.expected is not None else self.digests[index]
        if digest != want:
            exc = IntegrityError(f"block {index} of {self.bucket}/{self.key} does not match its manifest")
            self.reject(exc)
            raise exc

    def reject(self, exc):
        """Fail the download for good: its bytes are not what they must be."""
        with self.cond:
            self._failed(exc)

    def _failed(self, exc):
        """Under the lock: the first failure fails the download, now."""
        if self.failure is None:
            self.failure = exc
            self.state = FAILED
        self.cond.notify_all()

    def _fail(self, exc):
        with self.cond:
            self._failed(exc)
            self.handover.end()

    def _stopped(self):
        """For the fetchers' transfers (cdn.fill's ``stop``): the download has failed, give up. Reads the
        failure without the lock: a transfer asks it from the CDN's watchdog too, under that one's lock."""
        return self.failure is not None

    def _fetcher(self, fd, cdn, buf):
        """A fetcher's thread: ``_fetch``, then one fetcher less (run waits for none left, or a failure)."""
        try:
            self._fetch(fd, cdn, buf)
        except OSError as exc:
            log.debug("writing %s/%s failed", self.bucket, self.key, exc_info=True)
            self.reject(storage_error(exc, f"{self.bucket}/{self.key}"))
        except LoaderError as exc:
            self.reject(exc)
        except Exception as exc:  # noqa: BLE001 - recorded, and raised by run() for the readers
            log.exception("a fetcher of %s/%s failed", self.bucket, self.key)
            self.reject(UpstreamError(f"the CDN download failed ({type(exc).__name__})"))
        finally:
            with self.cond:
                self._fetching -= 1
                self.cond.notify_all()

    def _fetch(self, fd, cdn, buf):
        """One fetcher: takes the next segment, reads it block by block into its buffer, hashes, writes and
        offers each block, until none is left or the download failed."""
        cdef long long pos, bs = self.block_size
        hasher = self.cache.hasher
        while True:
            with self.cond:
                if self.failure is not None or self._next >= len(self._order):
                    return
                start, end = self._order[self._next]
                self._next += 1
                if start // bs not in self._tail:  # the tail goes first, whatever the loads ask for
                    self.handover.pace(start // bs, self._stopped)
            pos = start
            fill = cdn.fill(self.bucket, self.key, self.info, buf, start, end, stop=self._stopped)
            n = next(fill, None)
            while n is not None:
                index = pos // bs
                h = hasher()
                h.update(buf[:n])
                digest = h.digest()
                if self.expected is not None and digest != self.expected[index]:
                    raise IntegrityError(f"block {index} of {self.bucket}/{self.key} from the CDN does not "
                                         f"match its manifest")
                self._write(fd, buf[:n], pos)
                with self.cond:
                    if self.failure is not None:
                        return
                    self.digests[index] = digest
                    self._have[index] = 1
                    self.bytes_done += n
                    self._unsynced.append(index)
                    self._unsynced_bytes += n
                    self.cond.notify_all()
                    other = self.handover.offer(index, buf)
                    pos += n
                    if pos < end:
                        self.handover.pace(pos // bs, self._stopped)
                if other is not None:
                    buf = other
                try:
                    n = fill.send(other)
                except StopIteration:
                    n = None
            if pos != end:
                raise IntegrityError(f"the CDN sent {pos - start} of {end - start} bytes of a segment")
            start_writeback(fd, start, end)

    def block(self, long long index, long long end, timeout):
        """For read_blocks: block ``index`` as ``(buffer, digest)`` when held in memory for the loads, True
        once it is in the file, False when neither came within ``timeout`` seconds (None: no limit); raises
        the download's failure when it never will come."""
        with self.cond:
            self.handover.ask(index)
            self.cond.wait_for(lambda: index in self.handover.held or self._have[index] or
                               self.failure is not None, timeout)
            held = self.handover.held.pop(index, None)
            if held is not None:
                self.cache.handed += 1
                return held, self.digests[index]
            if self._have[index]:
                return True
            if self.failure is not None:
                raise self.failure
            return False

    def give_back(self, buf):
        """A load is done with a buffer that ``block`` handed it."""
        with self.cond:
            self.handover.reuse(buf)

    def _write(self, int fd, view, long long pos):
        """Write ``view`` (the start of an aligned buffer) at ``pos``: its whole pages past the page cache
        when ``pos`` is aligned, the rest (the end of the object) through the plain descriptor."""
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

    def _remove(self):
        """Remove the part and its record (the record first: a record without its part is swept)."""
        self._remove_record()
        try:
            os.unlink(self.part)
        except OSError:
            pass

    def _remove_record(self):
        try:
            os.unlink(self.part[:-len(PART_SUFFIX)] + RECORD_SUFFIX)
        except OSError:
            pass

    def wait_tail(self):
        """Wait for the object's tail blocks (fetched first) or the failure."""
        with self.cond:
            self.cond.wait_for(lambda: self.tail_ready or self.failure is not None)
            if self.failure is not None:
                raise self.failure

    def open_reader(self):
        """The file for a load to ``follow``: the .part file, or the cache's once committed. The load counts
        as following from here on (the fetchers keep near it) until its stream ends, or ``leave`` when it
        never streams.

        A failed download raises its failure, a disk error (EMFILE, EIO) a StorageError. None when it
        committed in the very moment the load came and the cached part is already gone (the cache was
        cleared): the load then fetches it afresh, as one a moment later would."""
        with self.cond:
            if self.failure is not None:
                raise self.failure
            committed = self.state == CACHED
            try:
                f = open_reader(self.cache.path(self.bucket, self.key) if committed else self.part,
                                self.cache.opener)
            except OSError as exc:
                if committed and exc.errno == errno.ENOENT:
                    return None
                log.debug("opening %s/%s for a load failed", self.bucket, self.key, exc_info=True)
                raise storage_error(exc, f"{self.bucket}/{self.key}") from exc
            self.handover.join()
            return f

    def leave(self):
        with self.cond:
            self.handover.leave()
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
        """The part was discarded while in flight: it finishes for its readers, but is never committed, and
        its part is not kept for a later try."""
        with self.cond:
            self._abandoned = True
