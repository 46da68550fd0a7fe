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
import hashlib
import json
import logging
import os
import threading
import time
import uuid

import boto3
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as Urllib3Error

from constants import CHUNK_SIZE
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
STREAM_ERRORS = (BotoCoreError, Urllib3Error, OSError)
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
META_SUFFIX = ".meta"
PART_SUFFIX = ".part"


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
        self._chunk = chunk_size

    def head(self, bucket, key):
        try:
            r = self._download.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise _map_client_error(exc, f"{bucket}/{key}") from None
        except BotoCoreError as exc:
            raise UpstreamError(f"the CDN is unreachable ({type(exc).__name__})") from None
        return ObjectInfo(r["ContentLength"], r["ETag"])

    def iter_object(self, bucket, key, info, start=0, end=None):
        """Yield bytes ``start``..``end`` (default: to the end) of the object; resume interrupted
        transfers from where they broke off, pinned to ``info.etag``."""
        end = info.size if end is None else end
        offset, failures = start, 0
        while offset < end:
            try:
                body = self._download.get_object(Bucket=bucket, Key=key, IfMatch=info.etag,
                                                 Range=f"bytes={offset}-{end - 1}")["Body"]
            except ClientError as exc:
                raise _map_client_error(exc, f"{bucket}/{key}") from None
            except BotoCoreError as exc:
                failures += 1
                if failures > RESUME_ATTEMPTS:
                    raise UpstreamError(f"the CDN is unreachable ({type(exc).__name__})") from None
                log.warning("GET %s/%s at %d failed (%s): retrying", bucket, key, offset, type(exc).__name__)
                continue
            try:
                for chunk in body.iter_chunks(self._chunk):
                    offset += len(chunk)
                    if offset > end:
                        raise IntegrityError(f"the CDN sent more bytes than asked of {bucket}/{key}")
                    yield chunk
            except STREAM_ERRORS as exc:
                log.warning("GET %s/%s broke off at %d (%s): resuming", bucket, key, offset,
                            type(exc).__name__)
            else:
                if offset < end:
                    log.warning("GET %s/%s ended early at %d of %d: resuming", bucket, key, offset, end)
            finally:
                body.close()
            if offset < end:
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


def file_digest(f, size, chunk_size=CHUNK_SIZE):
    """SHA-256 of the first ``size`` bytes of an open file, read with pread (its position is left alone)."""
    h = hashlib.sha256()
    _hash_file(h, f.fileno(), 0, size, memoryview(bytearray(chunk_size)))
    return h.hexdigest()


def _hash_file(h, int fd, long long pos, long long end, buf, until=None):
    """Feed ``h`` the file's bytes from ``pos`` to ``end`` through ``buf``; returns the position reached:
    ``end``, or less at the end of the file or once ``until()`` is true."""
    cdef Py_ssize_t n
    while pos < end and not (until is not None and until()):
        n = os.preadv(fd, [buf[:min(len(buf), end - pos)]], pos)
        if n <= 0:
            break
        h.update(buf[:n])
        pos += n
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
    data = os.pread(f.fileno(), size - start, start)
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
        self._stop = None  # the first fetcher failure: stops the other fetchers and the hasher
        self._fetched = False  # every segment is on disk: the background hasher hands over to run()
        self._hashed = 0  # how far the background hasher got
        self._abandoned = False  # discarded while in flight: never committed
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
        return fd

    def run(self, fd, cdn):
        """Fetch the object as ranged segments on a few threads, writing each at its offset, then commit
        the file to the cache.

        The sidecar's SHA-256 is taken in order as the written prefix grows: while the fetchers run, by a
        thread at the lowest CPU priority, so it only takes CPU the load leaves idle; then the rest by
        this thread. Readers follow the written bytes and never wait for the hash: a load ends with its
        last byte, and the commit follows on its own.
        """
        size = self.info.size
        h = hashlib.sha256()
        buf = memoryview(bytearray(CHUNK_SIZE))  # the background hasher's, then this thread's
        workers = [threading.Thread(target=self._fetch, args=(fd, cdn), daemon=True,
                                    name=f"cdn-{self.bucket}/{self.key}-{n}")
                   for n in range(min(FETCHERS, len(self._segments)))]
        hasher = threading.Thread(target=self._hash_while_fetching, args=(fd, h, buf), daemon=True,
                                  name=f"cdn-{self.bucket}/{self.key}-hash")
        try:
            for w in workers:
                w.start()
            hasher.start()
            for w in workers:
                w.join()
            if self._stop is not None:
                raise self._stop
            self._handover(hasher)
            if _hash_file(h, fd, self._hashed, size, buf) != size:
                raise IntegrityError("the cache file ended early")
            os.fsync(fd)
            os.close(fd)
            fd = -1
            with self.cond:
                if self._abandoned:
                    raise IntegrityError(f"{self.bucket}/{self.key} was discarded while it downloaded")
                self.cache.commit(self.bucket, self.key, self.part, size, self.info.etag, h.hexdigest())
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
            self._handover(hasher)
            if fd >= 0:
                os.close(fd)
            self.cache._finished(self)

    def _handover(self, hasher):
        """Stop the background hasher (at its next chunk) and wait for it."""
        with self.cond:
            self._fetched = True
            self.cond.notify_all()
        if hasher.ident is not None:
            hasher.join()

    def _hash_while_fetching(self, fd, h, buf):
        """Hash the contiguous written prefix, at the lowest CPU priority, until run() takes over."""
        _lowest_priority()
        until = lambda: self._fetched
        pos = 0
        try:
            while True:
                with self.cond:
                    while self.written <= pos and self._stop is None and not self._fetched:
                        self.cond.wait()
                    if self._stop is not None or self._fetched:
                        return
                    end = self.written
                reached = _hash_file(h, fd, pos, end, buf, until)
                if reached < end and not self._fetched:
                    return  # the file ended early: run() hashes from here and reports it
                pos = reached
        except OSError:
            return  # run() hashes from here and meets the error itself
        finally:
            self._hashed = pos

    def _fetch(self, fd, cdn):
        """One fetcher: takes the next segment, streams it into place, until none is left or one fails."""
        while True:
            with self.cond:
                if self._stop is not None or self._next >= len(self._order):
                    return
                start, end = self._order[self._next]
                self._next += 1
            index = self._index[start]
            pos = start
            try:
                for chunk in cdn.iter_object(self.bucket, self.key, self.info, start, end):
                    written = os.pwrite(fd, chunk, pos)
                    while written < len(chunk):  # a short write is legal: finish it
                        written += os.pwrite(fd, memoryview(chunk)[written:], pos + written)
                    pos += len(chunk)
                    with self.cond:
                        if self._stop is not None:
                            return
                        self._progress[index] += len(chunk)
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
            path = self.cache.path(self.bucket, self.key) if self.done else self.part
            # Unbuffered: the file is preallocated, so a buffered reader would read ahead into bytes
            # that are not written yet and keep them.
            return open(path, "rb", buffering=0)

    def follow(self, f, chunk_size):
        """Yield the file's bytes as the fetchers write them. The stream ends with the last byte: the hash
        and the commit to the cache finish on their own, and a failure of theirs no longer concerns a
        reader that has every byte."""
        pos, size = 0, self.info.size
        with f:
            while pos < size:
                with self.cond:
                    while pos >= self.written and self.error is None:
                        self.cond.wait()
                    available = self.written - pos
                    if available <= 0:
                        raise self.error
                while available > 0:
                    data = f.read(min(chunk_size, available))
                    if not data:
                        raise IntegrityError("the cache file ended early")
                    pos += len(data)
                    available -= len(data)
                    yield data

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

    def __init__(self, root, chunk_size=CHUNK_SIZE):
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
            f = open(self.path(bucket, key), "rb")
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
            return _checked(check, size, read_tail(f, size)), self._read_all(f)
        except IntegrityError:
            f.close()
            log.warning("cached %s/%s failed its check: discarding it", bucket, key)
            self.discard(bucket, key)
        except OSError:
            f.close()
        return None

    def open(self, bucket, key, cdn, check=None):
        """The big part: ``(result, chunks)``, from the verified cache or streamed while it downloads.

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

    def _read_all(self, f):
        with f:
            while True:
                data = f.read(self._chunk)
                if not data:
                    return
                yield data
