# cython: language_level=3, embedsignature=True
"""The S3-compatible CDN and the local cache of big parts (contract section 2).

``CdnManager`` wraps two injected boto3 clients: the downloader identity for HEAD/GET, the uploader
identity for PUT. Downloads are streams of chunks; an interrupted transfer is resumed with a ranged GET
pinned to the ETag (``IfMatch``), so a resumed download can never splice two versions of an object.

``BigPartCache`` keeps ``{root}/{bucket}/{key}`` with a sidecar ``{key}.meta`` (size, ETag, SHA-256).
Files reach their final name only by rename after fsync, so a crash leaves at worst a ``.part`` file,
never a half file under the final name. Concurrent loads of one object share one CDN download: the
first load starts it, every load streams from the growing file.
"""

import errno
import fcntl
import hashlib
import http.client
import json
import logging
import mmap
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import boto3
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.response import StreamingBody
from urllib3.exceptions import HTTPError as Urllib3Error

from constants import CHUNK_SIZE, LOAD_CHUNK_SIZE
from errors import IntegrityError, LoaderError, NotFound, StorageError, UpstreamError

cdef extern from "fcntl.h" nogil:
    # Linux: start writeback of a file range now, without waiting for it (_GNU_SOURCE comes from
    # pyconfig.h). Each finished segment goes to disk while the rest downloads, so the final fsync has
    # little left to do; otherwise the whole object is dirty in memory and the fsync writes it all at the
    # end while the load waits.
    int sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags)
    unsigned int SYNC_FILE_RANGE_WRITE

log = logging.getLogger("loader.cdn")

# Errors while a body streams in that a ranged GET from the current offset can cure.
STREAM_ERRORS = (BotoCoreError, Urllib3Error, http.client.HTTPException, OSError)
RESUME_ATTEMPTS = 5
# Large objects are fetched as ranged segments by a few threads: socket reads, file writes and the
# hash run outside the GIL, so they overlap.
# Each GET costs the CDN and botocore a few milliseconds, so the bulk goes in large segments; the last
# FETCHERS segments before the tail are small, so the fetchers finish close together.
SEGMENT = 64 * 1024 * 1024
SMALL_SEGMENT = 16 * 1024 * 1024
# The end of the object is fetched first, in a segment this large: a load checks it before streaming.
TAIL_SEGMENT = 1024 * 1024
FETCHERS = 3
# Bytes at the end of a big part handed to a load's check before streaming: the last cipher block and
# the block before it, which is all CBC needs to decrypt the last block alone.
TAIL = 32
# Cache files are written and read with O_DIRECT where the filesystem allows it: the bytes go between the
# disk and a reused buffer, not through the page cache. Filling fresh page-cache pages costs more CPU than
# anything else in a cold load, and a model streamed once would only push other pages out. O_DIRECT wants
# offsets, lengths and buffer addresses aligned to the logical block size; a page covers every device.
DIRECT_ALIGN = 4096
META_SUFFIX = ".meta"
PART_SUFFIX = ".part"
# A download's hash waits for the loads that still stream it: hashing beside a load that runs as fast as
# the machine allows slowed a cold 1 GiB load by about 15 %, even at the lowest CPU priority. A load still
# streaming this long after the fetch ended is paced by its client instead: the hash then starts beside it
# at the lowest priority, so the commit does not wait for a slow client.
HASH_GRACE = 5.0


class CdnConfig:
    """The keys of cdn.yaml. Secrets stay in memory; ``repr`` never shows them."""

    REQUIRED = ("host", "downloader_access_key", "downloader_access_secret", "uploader_access_key",
                "uploader_access_secret")

    def __init__(self, host, downloader, uploader, region="us-east-1"):
        self.host = host
        self.downloader = downloader
        self.uploader = uploader
        self.region = region

    @classmethod
    def from_yaml(cls, text):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UpstreamError("cdn.yaml is not valid YAML") from None
        if not isinstance(data, dict):
            raise UpstreamError("cdn.yaml is not a mapping")
        missing = [k for k in cls.REQUIRED if not data.get(k)]
        if missing:
            raise UpstreamError(f"cdn.yaml lacks {', '.join(missing)}")
        return cls(str(data["host"]),
                   (str(data["downloader_access_key"]), str(data["downloader_access_secret"])),
                   (str(data["uploader_access_key"]), str(data["uploader_access_secret"])),
                   str(data.get("region") or "us-east-1"))

    def client(self, identity, *, connect_timeout=5, read_timeout=30, pool=16):
        key, secret = self.downloader if identity == "downloader" else self.uploader
        config = Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 4, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=pool,
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_supported",
        )
        return boto3.session.Session().client("s3", endpoint_url=self.host, aws_access_key_id=key,
                                              aws_secret_access_key=secret, region_name=self.region,
                                              config=config)

    def __repr__(self):
        return f"CdnConfig(host={self.host!r}, region={self.region!r})"


def _map_client_error(exc, what):
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
        return NotFound(f"no such object on the CDN: {what}")
    if code in ("PreconditionFailed", "412") or status == 412:
        return UpstreamError(f"the CDN object changed during the transfer: {what}")
    return UpstreamError(f"the CDN answered {status or code} for {what}")


class ObjectInfo:
    def __init__(self, size, etag):
        self.size = int(size)
        self.etag = etag


class CdnManager:
    """S3 operations with the downloader and uploader clients (injected, or built from a CdnConfig)."""

    def __init__(self, config=None, *, download_client=None, upload_client=None, chunk_size=CHUNK_SIZE):
        if download_client is None or upload_client is None:
            if config is None:
                raise ValueError("a CdnConfig or both clients are required")
        self._download = download_client or config.client("downloader")
        self._upload = upload_client or config.client("uploader")
        self.chunk_size = chunk_size

    def head(self, bucket, key):
        try:
            r = self._download.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise _map_client_error(exc, f"{bucket}/{key}") from None
        except BotoCoreError as exc:
            raise UpstreamError(f"the CDN is unreachable ({type(exc).__name__})") from None
        return ObjectInfo(r["ContentLength"], r["ETag"])

    def iter_object(self, bucket, key, info, start=0, end=None):
        """Yield bytes ``start``..``end`` (default: to the end) of the object as chunks of bytes; resume
        interrupted transfers from where they broke off, pinned to ``info.etag``."""
        buf = memoryview(bytearray(self.chunk_size))
        for n in self.fill(bucket, key, info, buf, start, end):
            yield bytes(buf[:n])

    def fill(self, bucket, key, info, buf, start=0, end=None):
        """Read bytes ``start``..``end`` of the object into ``buf``, one buffer at a time: each step yields
        how many bytes ``buf`` holds (all of it, but at the end), to be used before the next step.

        Where botocore has nothing to check in the body (no checksum came with it), the bytes go from the
        socket straight into ``buf``: no chunk objects, no copies. A transfer that breaks off is resumed
        from the first byte missing, pinned to ``info.etag``, so a resumed download can never splice two
        versions of an object.
        """
        end = info.size if end is None else end
        cdef long long pos = start  # the object offset of buf[0]
        cdef Py_ssize_t n = 0  # bytes in buf, not yet handed out
        cdef Py_ssize_t want, got
        failures = 0
        while pos + n < end:
            try:
                r = self._download.get_object(Bucket=bucket, Key=key, IfMatch=info.etag,
                                              Range=f"bytes={pos + n}-{end - 1}")
            except ClientError as exc:
                raise _map_client_error(exc, f"{bucket}/{key}") from None
            except BotoCoreError as exc:
                failures += 1
                if failures > RESUME_ATTEMPTS:
                    raise UpstreamError(f"the CDN is unreachable ({type(exc).__name__})") from None
                log.warning("GET %s/%s at %d failed (%s): retrying", bucket, key, pos + n, type(exc).__name__)
                continue
            body = r["Body"]
            asked = end - pos - n
            try:
                if r.get("ContentLength", asked) != asked:
                    raise IntegrityError(f"the CDN answered a ranged GET of {bucket}/{key} with "
                                         f"{r.get('ContentLength')} bytes instead of {asked}")
                sock = _socket_reader(body)
                while pos + n < end:
                    want = min(len(buf), end - pos)
                    if sock is not None:
                        got = sock.readinto(buf[n:want])
                    else:
                        data = body.read(want - n)
                        got = len(data)
                        buf[n:n + got] = data
                    if not got:
                        break
                    n += got
                    if n == want:
                        yield n
                        pos += n
                        n = 0
                if pos + n < end:
                    log.warning("GET %s/%s ended early at %d of %d: resuming", bucket, key, pos + n, end)
                elif (body if sock is None else body._raw_stream).read(1):  # also frees the connection
                    raise IntegrityError(f"the CDN sent more bytes than asked of {bucket}/{key}")
            except STREAM_ERRORS as exc:
                log.warning("GET %s/%s broke off at %d (%s): resuming", bucket, key, pos + n,
                            type(exc).__name__)
            finally:
                body.close()
            if pos + n < end:
                failures += 1
                if failures > RESUME_ATTEMPTS:
                    raise UpstreamError(f"the CDN transfer of {bucket}/{key} kept breaking off")

    def upload_file(self, bucket, key, path):
        """Upload a local file (multipart when large) with the uploader identity; returns the new ETag."""
        config = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024,
                                max_concurrency=4)
        try:
            try:
                self._upload.upload_file(path, bucket, key, Config=config)
            except ClientError as exc:
                if "NoSuchBucket" not in str(exc):
                    raise
                self._upload.create_bucket(Bucket=bucket)
                self._upload.upload_file(path, bucket, key, Config=config)
            return self.head(bucket, key).etag
        except ClientError as exc:
            raise _map_client_error(exc, f"{bucket}/{key}") from None
        except (BotoCoreError, boto3.exceptions.S3UploadFailedError) as exc:
            raise UpstreamError(f"the CDN upload of {bucket}/{key} failed ({type(exc).__name__})") from None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc, what):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageError(f"the model cache has no room for {what}")
    return StorageError(f"the model cache could not write {what} ({errno.errorcode.get(exc.errno, 'error')})")


def _socket_reader(body):
    """The HTTP response under a botocore body, to read it straight into a buffer; None when botocore must
    read the body itself (a checksum to validate as it goes) or the body is not urllib3's (test doubles)."""
    if type(body) is not StreamingBody:
        return None
    fp = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    return fp if isinstance(fp, http.client.HTTPResponse) else None


def aligned_buffer(Py_ssize_t size):
    """A page-aligned buffer for O_DIRECT reads of up to ``size`` bytes from any offset: one block more,
    for a read that starts at the block before the offset."""
    size += (-size) % DIRECT_ALIGN
    return memoryview(mmap.mmap(-1, size + DIRECT_ALIGN))


def open_direct(path, int flags):
    """A descriptor of ``path`` that bypasses the page cache, or a plain one where the filesystem does not
    allow that (tmpfs, some network and FUSE filesystems)."""
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(path, flags)


def open_reader(path):
    """The file at ``path``, open for read_at (unbuffered; O_DIRECT where allowed)."""
    return os.fdopen(open_direct(path, os.O_RDONLY), "rb", buffering=0)


def read_at(int fd, buf, long long pos, long long n):
    """Up to ``n`` bytes of the file at ``pos`` (fewer at its end), as a view of ``buf``, an
    aligned_buffer. Reads whole aligned blocks, as O_DIRECT wants; the file's position is left alone."""
    cdef long long start = pos - pos % DIRECT_ALIGN
    cdef long long length = pos + n - start
    length = min(length + (-length) % DIRECT_ALIGN, len(buf) - len(buf) % DIRECT_ALIGN)
    try:
        got = os.preadv(fd, [buf[:length]], start)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _without_direct(fd)
        got = os.preadv(fd, [buf[:length]], start)
    return buf[pos - start:max(pos - start, min(got, pos - start + n))]


def _without_direct(int fd):
    """O_DIRECT was accepted at open but refused for a transfer: go through the page cache from now on."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def _write_all(int fd, view, long long pos):
    cdef Py_ssize_t done = 0
    while done < len(view):  # a short write is legal: finish it
        done += os.pwrite(fd, view[done:], pos + done)


def _released(view):
    """Invalidate a view handed out of a reused buffer: a caller that kept it fails loudly instead of
    reading bytes that were overwritten since."""
    try:
        view.release()
    except BufferError:
        pass


def _blocks(int fd, long long size, Py_ssize_t chunk_size, ready=None, long long start=0):
    """Yield bytes ``start..size`` of the file (fewer when it ends early) as views of two reused buffers,
    each valid until the next is asked for. A helper thread reads the next block while the caller uses this
    one, so the disk and the caller's work overlap.

    ``ready(pos, wait)``, when given, tells where the written bytes end: with ``wait``, once bytes past
    ``pos`` are written (or it raises the writer's failure); without, at once (read-ahead never waits).
    """
    bufs = (aligned_buffer(chunk_size), aligned_buffer(chunk_size))
    cdef long long pos = start
    cdef long long limit = size if ready is None else 0
    cdef int i = 0
    pending = None
    with ThreadPoolExecutor(1, thread_name_prefix="cache-read") as pool:
        while pos < size:
            if pending is None:
                if pos >= limit:
                    limit = ready(pos, True)
                pending = pool.submit(read_at, fd, bufs[i], pos, min(chunk_size, limit - pos))
            view = pending.result()
            pending = None
            if not len(view):
                return
            pos += len(view)
            i = 1 - i
            if pos < size:
                if pos >= limit and ready is not None:
                    limit = ready(pos, False)
                if pos < limit:
                    pending = pool.submit(read_at, fd, bufs[i], pos, min(chunk_size, limit - pos))
            yield view
            _released(view)


def stream_file(f, size, chunk_size=CHUNK_SIZE, ready=None):
    """Yield bytes ``0..size`` of the open file ``f`` (closed at the end) as _blocks does; raises when the
    file ends early."""
    cdef long long pos = 0
    # The helper thread is stopped (closing) before the file closes: it never reads a closed descriptor.
    with f, closing(_blocks(f.fileno(), size, chunk_size, ready)) as blocks:
        for view in blocks:
            pos += len(view)
            yield view
    if pos < size:
        raise IntegrityError("the cache file ended early")


def file_digest(f, size, chunk_size=CHUNK_SIZE):
    """SHA-256 of the first ``size`` bytes of a file open for read_at; the disk and the hash overlap."""
    h = hashlib.sha256()
    _hash_file(h, f.fileno(), 0, size, chunk_size)
    return h.hexdigest()


def _hash_file(h, int fd, long long pos, long long end, Py_ssize_t chunk_size=CHUNK_SIZE, until=None):
    """Feed ``h`` the file's bytes from ``pos`` to ``end`` (read one block ahead, as _blocks does); returns
    the position reached: ``end``, or less at the end of the file or once ``until()`` is true."""
    with closing(_blocks(fd, end, chunk_size, None, pos)) as blocks:
        for view in blocks:
            if until is not None and until():
                break
            h.update(view)
            pos += len(view)
    return pos


def _lowest_priority():
    """Give the calling thread the lowest CPU priority (Linux: nice applies per thread). Lowering one's
    own priority needs no privilege; where it fails the thread just runs at the usual priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def read_tail(f, size):
    """The last TAIL bytes (or all, when shorter) of an open file that holds ``size`` bytes."""
    start = max(0, size - TAIL)
    data = bytes(read_at(f.fileno(), aligned_buffer(TAIL), start, size - start))
    if len(data) != size - start:
        raise IntegrityError("the cache file ended early")
    return data


def segments(size):
    """The ranged segments of an object, in the order they are fetched: its last TAIL_SEGMENT bytes first
    (a load checks the object's end before it streams), then the rest from the start."""
    if size <= TAIL_SEGMENT + TAIL:
        return [(0, size)] if size else []
    tail = size - TAIL_SEGMENT
    order = [(tail, size)]
    pos = 0
    while pos < tail:
        step = SEGMENT if tail - pos - SEGMENT >= FETCHERS * SMALL_SEGMENT else SMALL_SEGMENT
        order.append((pos, min(tail, pos + step)))
        pos = order[-1][1]
    return order


class _Download:
    """One CDN download into a ``.part`` file that readers may follow while it grows."""

    def __init__(self, cache, bucket, key, info):
        self.cache, self.bucket, self.key, self.info = cache, bucket, key, info
        self.cond = threading.Condition()
        self.written = 0
        self.done = False
        self.error = None  # what readers see: set only once the .part file is gone
        self._stop = None  # the first fetcher failure: stops the other fetchers
        self._taken_over = False  # the loads are gone: run() takes the hash over from the slow hasher
        self._hashed = 0  # how far the slow hasher got; -1: it failed
        self._hasher_done = False
        self._readers = 0  # loads streaming this download right now
        self._abandoned = False  # discarded while in flight: never committed
        self._direct = -1  # the .part file, O_DIRECT where allowed: the fetchers' writes and the hash
        self.part = cache.path(bucket, key) + f".{uuid.uuid4().hex}{PART_SUFFIX}"
        self._order = segments(info.size)
        self._segments = sorted(self._order)
        self._index = {start: i for i, (start, _) in enumerate(self._segments)}
        self._progress = [0] * len(self._segments)
        self._next = self._frontier = 0
        self.tail_ready = not self._segments

    def prepare(self):
        """Create the .part file with all its space reserved: a full disk fails here, before streaming."""
        os.makedirs(os.path.dirname(self.part), exist_ok=True)
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if self.info.size:
                os.posix_fallocate(fd, 0, self.info.size)
        except OSError as exc:
            os.close(fd)
            os.unlink(self.part)
            raise storage_error(exc, f"{self.bucket}/{self.key}") from None
        try:
            self._direct = open_direct(self.part, os.O_RDWR)
        except OSError:
            self._direct = -1  # the plain descriptor does it all
        return fd

    def run(self, fd, cdn):
        """Fetch the object as ranged segments on a few threads, writing each at its offset, then hash the
        file and commit it to the cache.

        Readers follow the written bytes and never wait for the hash: a load ends with its last byte, and
        the hash and the commit follow on their own, once no load streams the download any more (see
        ``_digest``).
        """
        size = self.info.size
        direct = self._direct if self._direct >= 0 else fd
        workers = [threading.Thread(target=self._fetch, args=(fd, cdn), daemon=True,
                                    name=f"cdn-{self.bucket}/{self.key}-{n}")
                   for n in range(min(FETCHERS, len(self._segments)))]
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if self._stop is not None:
                raise self._stop
            digest = self._digest(direct)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            with self.cond:
                if self._abandoned:
                    raise IntegrityError(f"{self.bucket}/{self.key} was discarded while it downloaded")
                self.cache.commit(self.bucket, self.key, self.part, size, self.info.etag, digest)
                self.done = True
                self.cond.notify_all()
        except OSError as exc:
            self._fail(storage_error(exc, f"{self.bucket}/{self.key}"))
        except LoaderError as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - a reader must never wait on a thread that died silently
            log.exception("download of %s/%s failed", self.bucket, self.key)
            self._fail(UpstreamError(f"the CDN download failed ({type(exc).__name__})"))
        finally:
            for w in workers:
                w.join()
            for d in (fd, self._direct):
                if d >= 0:
                    os.close(d)
            self.cache._finished(self)

    def _digest(self, int fd):
        """The SHA-256 of the complete file, taken once no load streams the download any more: the loads
        get the CPU and the disk first, and the hash costs a device nothing while it waits.

        A load still streaming HASH_GRACE seconds after the fetch ended is paced by its client. The hash
        then starts beside it on a thread at the lowest CPU priority, and this thread takes over at normal
        priority, from where that one got, once the load is gone.
        """
        cdef long long size = self.info.size
        h = hashlib.sha256()
        with self.cond:
            self.cond.wait_for(lambda: not self._readers, HASH_GRACE)
            beside = self._readers > 0
        if beside:
            hasher = threading.Thread(target=self._hash_beside_loads, args=(fd, h), daemon=True,
                                      name=f"cdn-{self.bucket}/{self.key}-hash")
            hasher.start()
            try:
                with self.cond:
                    self.cond.wait_for(lambda: not self._readers or self._hasher_done)
            finally:
                with self.cond:
                    self._taken_over = True
                hasher.join()
        if self._hashed < 0:  # the slow hasher failed somewhere: start afresh (and meet its error)
            h, self._hashed = hashlib.sha256(), 0
        if _hash_file(h, fd, self._hashed, size) != size:
            raise IntegrityError("the cache file ended early")
        return h.hexdigest()

    def _hash_beside_loads(self, fd, h):
        """Hash the file at the lowest CPU priority until run() takes over."""
        _lowest_priority()
        try:
            self._hashed = _hash_file(h, fd, 0, self.info.size, until=lambda: self._taken_over)
        except OSError:
            self._hashed = -1
        finally:
            with self.cond:
                self._hasher_done = True
                self.cond.notify_all()

    def _fetch(self, fd, cdn):
        """One fetcher: takes the next segment, reads it into its buffer and writes it into place, until
        none is left or one fails."""
        buf = aligned_buffer(cdn.chunk_size)[:cdn.chunk_size]
        while True:
            with self.cond:
                if self._stop is not None or self._next >= len(self._order):
                    return
                start, end = self._order[self._next]
                self._next += 1
            index = self._index[start]
            pos = start
            try:
                for n in cdn.fill(self.bucket, self.key, self.info, buf, start, end):
                    self._write(fd, buf[:n], pos)
                    pos += n
                    with self.cond:
                        if self._stop is not None:
                            return
                        self._progress[index] += n
                        if pos == end == self.info.size:
                            self.tail_ready = True
                            self.cond.notify_all()
                        self._advance()
            except OSError as exc:
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
            _start_writeback(fd, start, end)

    def _write(self, int fd, view, long long pos):
        """Write ``view`` (the start of an aligned buffer) at ``pos``: its whole blocks past the page cache
        when ``pos`` is aligned, the rest (the end of the object, or a segment starting mid-block)
        through the plain descriptor."""
        cdef Py_ssize_t bulk = 0
        direct = self._direct
        if direct >= 0 and pos % DIRECT_ALIGN == 0:
            bulk = len(view) - len(view) % DIRECT_ALIGN
            try:
                _write_all(direct, view[:bulk], pos)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _without_direct(direct)
                bulk = 0
        _write_all(fd, view[bulk:], pos + bulk)

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
            self.written = written
            self.cond.notify_all()

    def _record(self, exc):
        """A fetcher failed: stop the others; run() cleans up and only then tells the readers."""
        with self.cond:
            if self._stop is None:
                self._stop = exc
            self.cond.notify_all()

    def _fail(self, exc):
        with self.cond:
            self._stop = self._stop or exc
        try:
            os.unlink(self.part)
        except OSError:
            pass
        with self.cond:
            self.error = exc
            self.done = True
            self.cond.notify_all()

    def wait_tail(self):
        """Wait for the object's last segment (fetched first) or the failure: a GET the CDN refuses
        outright (403, 404, 5xx after the retries) then still becomes an error status, not a 200 whose body
        is cut off at once, and the caller can check the end of the object before streaming."""
        with self.cond:
            while not self.tail_ready and not self.done and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error

    def open_reader(self):
        with self.cond:
            if self.error is not None:
                raise self.error
            return open_reader(self.cache.path(self.bucket, self.key) if self.done else self.part)

    def follow(self, f, chunk_size):
        """Yield the file's bytes as the fetchers write them (views, as stream_file). The stream ends with
        the last byte: the hash and the commit to the cache finish on their own, and a failure of theirs
        no longer concerns a reader that has every byte."""
        with self.cond:
            self._readers += 1
        try:
            yield from stream_file(f, self.info.size, chunk_size, self._written_past)
        finally:
            with self.cond:
                self._readers -= 1
                self.cond.notify_all()

    def _written_past(self, pos, wait):
        """Where the written bytes end; with ``wait``, once bytes past ``pos`` are written (else it raises
        the download's failure)."""
        with self.cond:
            while wait and pos >= self.written and self.error is None:
                self.cond.wait()
            if wait and pos >= self.written:
                raise self.error
            return self.written

    def abandon(self):
        """The part was discarded while in flight: the download finishes for its readers, but is never
        committed to the cache."""
        with self.cond:
            self._abandoned = True


cdef _start_writeback(int fd, long long start, long long end):
    with nogil:
        sync_file_range(fd, start, end - start, SYNC_FILE_RANGE_WRITE)  # advisory: a failure is harmless


def _checked(check, size, tail):
    return None if check is None else check(size, tail)


class BigPartCache:
    """Verified local cache of big parts under ``root``; one download per object at a time."""

    def __init__(self, root, chunk_size=LOAD_CHUNK_SIZE):
        self.root = os.path.abspath(root)
        self._chunk = chunk_size
        self._lock = threading.Lock()
        self._downloads = {}  # (bucket, key) -> the download new loads of it join
        self._running = set()  # every download not yet ended, also those no load may join any more
        self.hits = 0
        self.misses = 0
        self.downloads = 0
        self._sweep()

    def _sweep(self):
        """Delete the ``.part`` files a killed loader left behind. Each was preallocated to its object's
        full size, so on a small disk one leftover holds the room the next download needs; none is ever
        resumed. Runs once, before this process starts a download (one loader per cache directory)."""
        for folder, _, names in os.walk(self.root):
            for name in names:
                if name.endswith(PART_SUFFIX):
                    try:
                        os.unlink(os.path.join(folder, name))
                        log.info("removed the leftover partial file %s", name)
                    except OSError as exc:
                        log.warning("could not remove the leftover %s: %s", name, exc.strerror)

    def path(self, bucket, key):
        return os.path.join(self.root, bucket, key)

    def _meta(self, bucket, key):
        try:
            with open(self.path(bucket, key) + META_SUFFIX) as f:
                meta = json.load(f)
            return int(meta["size"]), str(meta["etag"]), str(meta["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def open_verified(self, bucket, key, info=None):
        """The cached file, open, when its bytes match the sidecar's size and digest (and the sidecar the
        CDN's size and ETag, when ``info`` is given); else None. The caller streams from this very file,
        so a file replaced after the check is never the one read."""
        meta = self._meta(bucket, key)
        if meta is None:
            return None
        size, etag, digest = meta
        if info is not None and (size != info.size or etag != info.etag):
            return None
        try:
            f = open_reader(self.path(bucket, key))
        except OSError:
            return None
        try:
            if os.fstat(f.fileno()).st_size == size and file_digest(f, size) == digest:
                return f
        except OSError:
            pass
        f.close()
        return None

    def discard(self, bucket, key):
        """Forget the cached part, and any download of it still in flight (it is never committed)."""
        with self._lock:
            download = self._downloads.pop((bucket, key), None)
        if download is not None:
            download.abandon()
        for p in (self.path(bucket, key) + META_SUFFIX, self.path(bucket, key)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not discard %s: %s", p, exc.strerror)

    def commit(self, bucket, key, part, size, etag, digest):
        """Move a finished, fsynced ``part`` file to its final name and write its sidecar."""
        final = self.path(bucket, key)
        meta_tmp = f"{final}{META_SUFFIX}.{uuid.uuid4().hex}{PART_SUFFIX}"
        try:
            # The old sidecar goes first: a crash between the steps leaves data without a sidecar,
            # which reads as "not cached", never as a sidecar that vouches for other bytes.
            os.makedirs(os.path.dirname(final), exist_ok=True)
            if os.path.exists(final + META_SUFFIX):
                os.unlink(final + META_SUFFIX)
            os.replace(part, final)
            with open(meta_tmp, "w") as f:
                json.dump({"size": size, "etag": etag, "sha256": digest}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(meta_tmp, final + META_SUFFIX)
            _fsync_dir(os.path.dirname(final))
        except OSError as exc:
            for p in (part, meta_tmp):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise storage_error(exc, f"{bucket}/{key}") from None

    def new_part(self, bucket, key):
        """Path of a fresh ``.part`` file beside the final name (for uploads)."""
        os.makedirs(os.path.join(self.root, bucket), exist_ok=True)
        return self.path(bucket, key) + f".{uuid.uuid4().hex}{PART_SUFFIX}"

    def _cached(self, bucket, key, info, check):
        """(check's result, chunks) of the verified cached file, or None when there is none that passes."""
        f = self.open_verified(bucket, key, info)
        if f is None:
            return None
        try:
            size = os.fstat(f.fileno()).st_size
            return _checked(check, size, read_tail(f, size)), stream_file(f, size, self._chunk)
        except IntegrityError:
            f.close()
            log.warning("cached %s/%s failed its check: discarding it", bucket, key)
            self.discard(bucket, key)
        except OSError:
            f.close()
        return None

    def open(self, bucket, key, cdn, check=None):
        """The big part: ``(result, chunks)``, from the verified cache or streamed while it downloads. The
        chunks are views of one reused buffer: each is valid until the next is asked for.

        ``check(size, tail)`` sees the part's size and its last TAIL bytes before any byte streams; it
        raises an IntegrityError to refuse the part (a cached one is then discarded and fetched again) and
        its result is handed back. Every check that can fail (HEAD, cache digest, ``check``, disk space)
        runs before this returns, so the caller can still answer with a proper error status.
        """
        try:
            info = cdn.head(bucket, key)
        except NotFound:
            raise
        except UpstreamError:
            cached = self._cached(bucket, key, None, check)
            if cached is not None:
                log.info("CDN unreachable: using the verified cache of %s/%s", bucket, key)
                self.hits += 1
                return cached
            with self._lock:
                download = self._downloads.get((bucket, key))
                if download is None:
                    raise
                reader = download.open_reader()
            log.info("CDN unreachable: following the download of %s/%s already under way", bucket, key)
            self.misses += 1
            return self._follow(download, reader, check)
        cached = self._cached(bucket, key, info, check)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        with self._lock:
            download = self._downloads.get((bucket, key))
            if download is None or download.info.etag != info.etag:
                if download is not None:
                    download.abandon()  # an older version: it must not land over this one
                download = _Download(self, bucket, key, info)
                fd = download.prepare()
                self.downloads += 1
                self._downloads[(bucket, key)] = download
                self._running.add(download)
                threading.Thread(target=download.run, args=(fd, cdn), daemon=True,
                                 name=f"cdn-{bucket}/{key}").start()
                log.info("downloading %s/%s (%d bytes) from the CDN", bucket, key, info.size)
            reader = download.open_reader()
        return self._follow(download, reader, check)

    def _follow(self, download, reader, check):
        """(check's result, chunks) of a download: once the object's end is in, checked before streaming."""
        try:
            download.wait_tail()
            checked = _checked(check, download.info.size, read_tail(reader, download.info.size))
        except BaseException:
            reader.close()
            raise
        return checked, download.follow(reader, self._chunk)

    def settle(self, timeout=None):
        """Wait for the downloads in flight to end (committed to the cache, or failed): a load ends with its
        last byte, before its part's hash and commit. False when ``timeout`` seconds ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            downloads = list(self._running)
        for download in downloads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            with download.cond:
                if not download.cond.wait_for(lambda: download.done, left):
                    return False
        return True

    def _finished(self, download):
        with self._lock:
            self._running.discard(download)
            if self._downloads.get((download.bucket, download.key)) is download:
                del self._downloads[(download.bucket, download.key)]
