# cython: language_level=3, embedsignature=True
"""The local cache of big parts: ``{root}/{bucket}/{key}`` with a sidecar ``{key}.meta``.

The sidecar names what the cached bytes are (size, ETag, the manifest they belong to) and the SHA-256 of
each block. A load never trusts the file as a whole: it reads, hashes and checks one block at a time and
lets a block go only once it matches its manifest (format 2), or the digest the cache took when it
downloaded it (format 1). A cached part that fails is discarded and the load goes on from the CDN at the
very block that failed, so the client still gets a whole, right answer.

Files reach their final name only by rename after fsync, so a crash leaves at worst a ``.part`` file,
never a half file under the final name. A ``.part`` with its record (download.BlockRecord) is kept at start
and resumed by the next download of the same manifest and object; any other leftover is swept. Concurrent
loads of one object share one download, and so do prefetches (contract section 8.4).

The cache keeps to its disk budget (disk_budget.DiskBudget): before a download reserves its space, the
least recently loaded parts no load reads are evicted, or the download is refused with a 507.

The cache directory is the loader's own, and whatever it finds there that it cannot use costs at most a
download, never a failed load: it follows no symbolic link (a bucket's folder that is one is replaced by a
real folder, the link removed and never its target; files are opened with ``O_NOFOLLOW``), opens only
regular files (a FIFO cannot block it), and a sidecar it cannot use (unreadable as JSON, absurd numbers,
another block size than the part needs, larger than MAX_SIDECAR_BYTES, not a regular file) is a damaged
part: discarded with its data and fetched again. A real disk error is a StorageError.
"""

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
import uuid

from collections import deque

import heap
from aligned_io import NotRegularFile, aligned_buffer, open_reader, read_blocks, read_hashed, read_tail
from constants import (BIG_SUFFIX, MANIFEST_BLOCK_SIZE, MAX_MANIFEST_BLOCK_SIZE, MAX_RESOURCE_BYTES,
                       MAX_SIDECAR_BYTES)
from disk_budget import DiskBudget
from download import (CACHED, FAILED, FETCHING, PART_SUFFIX, RECORD_SUFFIX, VERIFYING, BlockRecord, Download,
                      TransferConfig)
from errors import IntegrityError, NotFound, StorageError, UpstreamError, storage_error
from security import TAIL, tail_start

log = logging.getLogger("loader.cdn")

META_SUFFIX = ".meta"
# Ended downloads /downloads still lists (the newest), so a client sees how its prefetch ended.
ENDED_KEPT = 32
# The digests a sidecar holds are SHA-256's.
DIGEST_SIZE = 32


class Expect:
    """What a load asks of a big part. Sealed (format 2): its ``size``, the ``blocks`` of its manifest and
    the manifest's ``version``; ``block_size`` is the manifest's (None: the cache's, for format 1).
    ``check(size, tail)`` sees the part's size and its last TAIL bytes (of a sealed part: checked against
    the manifest first) before a byte streams, and raises an IntegrityError to refuse the part; its
    result is handed back."""

    def __init__(self, what, size=None, blocks=None, version=None, block_size=None, check=None):
        self.what = what
        self.size = size
        self.blocks = blocks
        self.version = version
        self.block_size = block_size
        self.check = check

    @property
    def sealed(self):
        return self.version is not None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fits(meta, expect, info):
    """Whether a sidecar (``_meta``'s dict, or None) describes the part ``expect`` wants: its block size (the
    manifest's, or the cache's for format 1), and of a sealed part its manifest's version and size; of a
    format-1 part no version, and the CDN's ``info`` (size and ETag) when given."""
    if meta is None or meta["block_size"] != expect.block_size:
        return False
    if expect.sealed:
        return (meta["version"], meta["size"]) == (expect.version, expect.size)
    return meta["version"] is None and (info is None
                                        or (meta["size"], meta["etag"]) == (info.size, info.etag))


def _unlink_quietly(path):
    """Remove the file (or the link itself) at ``path``; a folder in the way of a file goes with all it holds
    (shutil.rmtree follows no link). A failure is only logged: the path then reads as not cached."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        log.warning("removing the folder %s, which stood where a cache file goes", os.path.basename(path))
        try:
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("could not remove %s: %s", os.path.basename(path), exc.strerror)
    except OSError as exc:
        log.warning("could not remove %s: %s", os.path.basename(path), exc.strerror)


def _integer(value, low, high):
    """``value`` when it is an int (not a bool) within ``low..high``; else ValueError."""
    if type(value) is not int or not low <= value <= high:
        raise ValueError("holds a number out of range")
    return value


def _parse_sidecar(raw):
    """A sidecar's bytes as ``_meta``'s dict; ValueError when they are not a sidecar this cache wrote."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # also a UnicodeDecodeError, or JSON nested too deep
        raise ValueError("is not JSON") from None
    if not isinstance(meta, dict):
        raise ValueError("is not a JSON object")
    size = _integer(meta.get("size"), 0, MAX_RESOURCE_BYTES)
    block_size = _integer(meta.get("blockSize"), 1, MAX_MANIFEST_BLOCK_SIZE)
    etag, version, digests = meta.get("etag"), meta.get("version"), meta.get("blocks")
    if not isinstance(etag, str) or not (version is None or isinstance(version, str)):
        raise ValueError("has no ETag or version")
    if not isinstance(digests, list) or len(digests) != -(-size // block_size):
        raise ValueError("lists another number of blocks than its size needs")
    try:
        blocks = [bytes.fromhex(d) for d in digests]
    except (TypeError, ValueError):
        blocks = None
    if blocks is None or any(len(d) != DIGEST_SIZE for d in blocks):
        raise ValueError("lists a digest that is not one")
    return {"size": size, "etag": etag, "version": version, "block_size": block_size, "blocks": blocks}


def _read_sidecar(int fd):
    """The bytes of the sidecar open at ``fd``; ValueError when it is no regular file or over the cap."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("is not a regular file")
    if st.st_size > MAX_SIDECAR_BYTES:
        raise ValueError(f"is larger than {MAX_SIDECAR_BYTES} bytes")
    chunks, got = [], 0
    while True:  # to its end, which may have moved since the fstat: still never past the cap
        chunk = os.read(fd, MAX_SIDECAR_BYTES + 1 - got)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        got += len(chunk)
        if got > MAX_SIDECAR_BYTES:
            raise ValueError(f"is larger than {MAX_SIDECAR_BYTES} bytes")


class BigPartCache:
    """Verified local cache of big parts under ``root``; one download per object at a time.

    ``config`` (download.TransferConfig) holds the tunables of its downloads and its disk budget. What it
    works with is injectable, for tests: ``hasher`` (hashlib.sha256) hashes the blocks; ``opener``
    (os.open) opens the cache files, it and its downloads (a filesystem that refuses O_DIRECT, say);
    ``download`` is the class of its downloads (a subclass holds one at a step); ``unlink`` (os.unlink)
    removes the old sidecar as a part is committed (a test's has a discard land in that very moment);
    ``buffers`` (heap.buffers) is the memory budget its downloads' buffers come from; ``disk`` the
    DiskBudget (one from ``config`` by default).

    Locks: ``_lock`` guards the downloads listed, the parts being read, and every eviction; it comes before
    a download's ``cond`` (see download.pyx).
    """

    def __init__(self, root, block_size=MANIFEST_BLOCK_SIZE, hasher=hashlib.sha256, config=None,
                 opener=os.open, download=Download, unlink=os.unlink, buffers=None, disk=None):
        self.root = os.path.abspath(root)
        self.block_size = block_size  # of format-1 parts; a manifest names its own
        self.hasher = hasher
        self.config = config or TransferConfig()
        self.buffers = heap.buffers if buffers is None else buffers
        self.disk = disk or DiskBudget(self.root, self.config.cache_max_bytes, self.config.cache_min_free)
        self.opener = opener
        self._download = download
        self._unlink = unlink
        self._lock = threading.Lock()
        self._downloads = {}  # (bucket, key) -> the download new loads of it join
        self._running = set()  # every download not yet ended, also those no load may join any more
        self._ended = deque(maxlen=ENDED_KEPT)  # the downloads that ended last, for /downloads
        self._reading = {}  # path of a cached part -> loads streaming it now (never evicted)
        self.hits = 0
        self.misses = 0
        self.downloads = 0
        self.refetches = 0
        self.handed = 0  # blocks loads took from their download in memory, not through the disk
        self.bytes_resumed = 0  # bytes resumed downloads held already, and did not fetch again
        self._sweep()

    @property
    def evictions(self):
        return self.disk.evictions

    def _sweep(self):
        """Delete what a killed loader left behind that no download can resume: a ``.part`` file without its
        record (an upload's, a format-1 download's, a sidecar being written), and a record without its part.
        Each part was preallocated to its object's full size, so on a small disk such a leftover holds the
        room the next download needs. Runs once, before this process starts a download (one loader per cache
        directory)."""
        for folder, _, names in os.walk(self.root, followlinks=False):  # the links themselves are names
            present = set(names)
            for name in names:
                if name.endswith(PART_SUFFIX):
                    pair = name[:-len(PART_SUFFIX)] + RECORD_SUFFIX
                elif name.endswith(RECORD_SUFFIX):
                    pair = name[:-len(RECORD_SUFFIX)] + PART_SUFFIX
                else:
                    continue
                if pair not in present:
                    _unlink_quietly(os.path.join(folder, name))
                    log.info("removed the leftover partial file %s", name)

    def name_of(self, key):
        """The resource name of a big part's key (for the download status)."""
        return key[:-len(BIG_SUFFIX)] if key.endswith(BIG_SUFFIX) else key

    def path(self, bucket, key):
        return os.path.join(self.root, bucket, key)

    def new_part(self, bucket, key):
        """Path of a fresh ``.part`` file beside the final name (for uploads)."""
        self._folder(bucket, create=True)
        return self.path(bucket, key) + f".{uuid.uuid4().hex}{PART_SUFFIX}"

    def _folder(self, bucket, create):
        """The folder ``{root}/{bucket}``, made sure to be a real folder directly under the root before the
        cache reads, creates or commits a file in it: a symbolic link there (or a FIFO, a socket...) is
        removed, the link itself and never what it points to, and a real folder made in its place, with a
        warning. A regular file there is left alone: NotADirectoryError. None when there is no folder and
        ``create`` is false; other failures are the OSError of the disk."""
        if not bucket or bucket in (".", "..") or "/" in bucket or "\0" in bucket:
            raise OSError(errno.EINVAL, "not a folder name", bucket)
        path = os.path.join(self.root, bucket)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if stat.S_ISREG(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "a file stands where the cache's folder goes", path)
            log.warning("the cache folder %s was %s: removed it, and made a real folder in its place", bucket,
                        "a symbolic link" if stat.S_ISLNK(st.st_mode) else "no folder")
            try:
                os.unlink(path)  # the link itself: its target is never touched
            except FileNotFoundError:
                pass
            st, create = None, True
        if st is None:
            if not create:
                return None
            os.makedirs(self.root, exist_ok=True)
            try:
                os.mkdir(path)
            except FileExistsError:  # made by another thread meanwhile (or a link put there): look again
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "no folder where the cache's folder goes", path)
        if os.path.realpath(path) != os.path.join(os.path.realpath(self.root), bucket):
            raise NotADirectoryError(errno.ENOTDIR, "the cache's folder is not directly under its root", path)
        return path

    # --- the sidecar ------------------------------------------------------------------------------

    def _meta(self, bucket, key, expect):
        """The sidecar of ``bucket/key`` as a dict (size, etag, version, block_size, blocks), or None: there
        is none (or the disk would not give it now): not cached. One that cannot be used, or that names
        another block size than ``expect`` needs for its version, is a damaged part: discarded, sidecar and
        data, and None."""
        path = self.path(bucket, key) + META_SUFFIX
        try:
            if self._folder(bucket, create=False) is None:
                return None
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                log.debug("reading the sidecar of %s/%s failed", bucket, key, exc_info=True)
                return None  # the disk's failure (EACCES, EMFILE, EIO...): not cached, and left as it is
            why = "is a symbolic link"
        else:
            try:
                meta = _parse_sidecar(_read_sidecar(fd))
                # Of another version it is only stale (``_fits`` says so, and a fetch replaces it); of this
                # one, blocks of another size would check each block against another block's digest.
                if meta["block_size"] == expect.block_size or meta["version"] != expect.version:
                    return meta
                why = f"is for blocks of {meta['block_size']} bytes, not {expect.block_size}"
            except ValueError as exc:
                why = str(exc)
            except OSError:
                log.debug("reading the sidecar of %s/%s failed", bucket, key, exc_info=True)
                return None
            finally:
                os.close(fd)
        self._damaged(bucket, key, f"its sidecar {why}")
        return None

    def _damaged(self, bucket, key, why):
        """Drop a cached part that cannot be used, sidecar first (a download in flight goes on, and commits
        afresh); the next look finds it not cached, and the load fetches it again."""
        log.warning("the cached %s/%s is damaged (%s): discarding it, it is fetched again", bucket, key, why)
        self.refetches += 1
        for p in (self.path(bucket, key) + META_SUFFIX, self.path(bucket, key)):
            _unlink_quietly(p)

    def commit(self, bucket, key, part, info, version, blocks, block_size=None):
        """Move a finished, fsynced ``part`` file to its final name and write its sidecar: ``info`` (size,
        ETag), the manifest ``version`` (None for format 1) and the digests of its ``blocks``."""
        final = self.path(bucket, key)
        meta_tmp = f"{final}{META_SUFFIX}.{uuid.uuid4().hex}{PART_SUFFIX}"
        meta = {"size": info.size, "etag": info.etag, "version": version,
                "blockSize": block_size or self.block_size, "blocks": [d.hex() for d in blocks]}
        try:
            # The old sidecar goes first: a crash between the steps leaves data without a sidecar,
            # which reads as "not cached", never as a sidecar that vouches for other bytes. A discard or
            # another commit of the part may have removed it already: no failure.
            self._folder(bucket, create=True)
            try:
                self._unlink(final + META_SUFFIX)
            except FileNotFoundError:
                pass
            os.replace(part, final)  # a link at the final name is replaced, never followed
            fd = os.open(meta_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(meta_tmp, final + META_SUFFIX)
            _fsync_dir(os.path.dirname(final))
        except OSError as exc:
            log.debug("committing %s/%s to the cache failed", bucket, key, exc_info=True)
            for p in (part, meta_tmp):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise storage_error(exc, f"{bucket}/{key}") from exc

    def fit(self, bucket, key):
        """After an upload committed ``bucket/key`` (its size was not known before it was staged): evict
        the least recently loaded parts until the cache is within its budget again; when no eviction can do
        that, the new part is not kept (a load fetches it when it needs it)."""
        path = self.path(bucket, key)
        with self._lock:
            try:
                size = os.stat(path, follow_symlinks=False).st_size
                if self.disk.max_bytes and size > self.disk.max_bytes:
                    raise StorageError(f"it is {size} bytes, more than MODEL_CACHE_MAX_BYTES "
                                       f"{self.disk.max_bytes}")
                self.disk.make_room(0, self._busy() | {path}, f"{bucket}/{key}")  # others go, not it
                return
            except OSError:
                return  # gone already
            except StorageError as exc:
                log.warning("not keeping %s/%s in the cache: %s", bucket, key, exc.detail)
        self.discard(bucket, key)

    def discard(self, bucket, key):
        """Forget the cached part, and any download of it still in flight (it is never committed)."""
        with self._lock:
            download = self._downloads.pop((bucket, key), None)
        if download is not None:
            download.abandon()
        try:
            if self._folder(bucket, create=False) is None:
                return  # nothing cached (and never a file removed through a link)
        except OSError as exc:
            log.warning("could not look at the cache folder of %s/%s: %s", bucket, key, exc.strerror)
            return
        for p in (self.path(bucket, key) + META_SUFFIX, self.path(bucket, key)):
            _unlink_quietly(p)

    # --- loads ------------------------------------------------------------------------------------

    def open(self, bucket, key, cdn, expect):
        """The big part as ``(check's result, blocks)``: from the cache, or streamed while it downloads.
        The blocks are views of reused buffers, each valid until the next is asked for, and each checked
        before it is handed out.

        A sealed part in the cache that belongs to the manifest is used as it is, without asking the CDN.
        Every other check that can fail early (HEAD, the size, ``expect.check``, disk space) runs before
        this returns, so the caller can still answer with a proper error status; a disk error on the way
        is a StorageError.
        """
        try:
            return self._open(bucket, key, cdn, expect)
        except OSError as exc:
            log.debug("opening %s/%s failed", bucket, key, exc_info=True)
            raise storage_error(exc, f"{bucket}/{key}") from exc

    def _open(self, bucket, key, cdn, expect):
        expect.block_size = expect.block_size or self.block_size
        if expect.sealed:
            cached = self._cached(bucket, key, expect, None, cdn)
            if cached is not None:
                return cached
        try:
            info = cdn.head(bucket, key)
        except NotFound:
            raise
        except UpstreamError:
            # Offline: a format-1 part is used as the cache has it (edge devices go offline), and a
            # download still under way is followed. One that has ended is never joined (see _fetch); if it
            # committed the part since the cache was looked at, the cache has it now.
            cached = None if expect.sealed else self._cached(bucket, key, expect, None, cdn)
            if cached is None:
                with self._lock:
                    download = self._downloads.get((bucket, key))
                    following = (download is not None and not download.done
                                 and download.version == expect.version)
                    reader = download.open_reader() if following else None
                if reader is not None:
                    log.info("CDN unreachable: following the download of %s/%s already under way",
                             bucket, key)
                    self.misses += 1
                    return self._follow(download, reader, expect, 0)
                cached = self._cached(bucket, key, expect, None, cdn)
                if cached is None:
                    raise
            log.info("CDN unreachable: using the cache of %s/%s", bucket, key)
            return cached
        if not expect.sealed:
            cached = self._cached(bucket, key, expect, info, cdn)
            if cached is not None:
                return cached
        return self._fetch(bucket, key, cdn, expect, info, 0)

    def _cached(self, bucket, key, expect, info, cdn):
        """(check's result, blocks) of the cached part when its sidecar fits ``expect`` (and the CDN's
        ``info``, when given); else None."""
        meta = self._meta(bucket, key, expect)
        if not _fits(meta, expect, info):
            return None
        try:
            f = open_reader(self.path(bucket, key), self.opener)
        except OSError as exc:
            if isinstance(exc, NotRegularFile) or exc.errno == errno.ELOOP:
                self._damaged(bucket, key, "its data is a symbolic link" if exc.errno == errno.ELOOP else
                              "its data is no regular file")
            return None  # else none (its sidecar outlived it) or the disk's failure: not cached
        size = meta["size"]
        blocks = expect.blocks if expect.sealed else meta["blocks"]
        try:
            if os.fstat(f.fileno()).st_size != size:
                raise IntegrityError("the cached part has another size than its sidecar")
            checked = self._check_end(f, size, expect, blocks, None)
        except (OSError, IntegrityError):
            f.close()
            log.warning("cached %s/%s failed its check: discarding it", bucket, key)
            self.discard(bucket, key)
            self.refetches += 1
            return None
        self.hits += 1
        path = self.path(bucket, key)
        with self._lock:  # from here on the part is being read: never evicted
            self._reading[path] = self._reading.get(path, 0) + 1
        self.disk.touch(path)  # the most recently loaded
        return checked, self._stream_cached(bucket, key, f, size, meta["block_size"], blocks, expect, cdn)

    def _stream_cached(self, bucket, key, f, size, block_size, blocks, expect, cdn):
        """The cached part's blocks, each checked against ``blocks``. At the first that fails the part is
        discarded, and the rest comes from a fresh download, from that very block on."""
        first = 0
        path = self.path(bucket, key)
        try:
            with f:
                for i, view, digest in read_blocks(f.fileno(), size, block_size, self.hasher):
                    if digest != blocks[i]:
                        raise IntegrityError(f"block {i} of the cached {bucket}/{key} does not match")
                    yield view
                    first = i + 1
            return
        except (OSError, IntegrityError) as exc:
            failure = exc
        finally:
            with self._lock:
                left = self._reading.pop(path) - 1
                if left:
                    self._reading[path] = left
        log.warning("cached %s/%s failed at block %d (%s): discarding it and fetching it again", bucket, key,
                    first, type(failure).__name__)
        self.discard(bucket, key)
        self.refetches += 1
        _, rest = self._fetch(bucket, key, cdn, expect, None, first, wait=False)
        yield from rest

    def _fetch(self, bucket, key, cdn, expect, info, first, wait=True):
        """(check's result, blocks) of a download of the CDN's object (``info``: its HEAD, asked when None),
        joined when one of the same version is under way; from block ``first``. A new download's first
        buffer is reserved before the lock is taken (waited for, unless ``wait`` is false: a load already
        streaming must not wait for room that loads like it hold)."""
        info = self._head(bucket, key, cdn, expect, info)
        looked = first != 0  # the cache is looked at once at most (a load from block ``first`` never does)
        memory = None
        try:
            while True:
                if self._ending(bucket, key):
                    continue
                with self._lock:
                    download = self._joinable(bucket, key, expect, info)
                    # A download commits its part before it leaves _downloads: with none in flight, a part
                    # that fits was committed since this load looked at the cache (its HEAD came in
                    # between), so it is used, not fetched a second time.
                    fits = download is None and not looked and self._fits_now(bucket, key, expect, info)
                    if download is None and not fits and memory is not None:
                        download, memory = self._start(bucket, key, cdn, expect, info, memory), None
                    reader = None if download is None else download.open_reader()
                    if reader is not None:
                        self.misses += 1
                        break
                if download is None and not fits and memory is None:
                    # A new download: its first buffer is reserved without the lock, then the cache is asked
                    # again (another load may have started it meanwhile).
                    memory = self.buffers.reserve(expect.block_size, wait)
                    continue
                # A part that fits, or a download that committed in this very moment and whose part is gone
                # since (the cache was cleared): look at the cache, else fetch afresh.
                looked = True
                cached = self._cached(bucket, key, expect, None if expect.sealed else info, cdn)
                if cached is not None:
                    return cached  # else the part failed its check (and is gone): fetch it
        finally:
            if memory is not None:
                memory.release()
        return self._follow(download, reader, expect, first)

    @staticmethod
    def _head(bucket, key, cdn, expect, info=None):
        """The CDN's ``info`` of the object (its HEAD, asked when None), which must be the manifest's size."""
        if info is None:
            info = cdn.head(bucket, key)
        if expect.sealed and info.size != expect.size:
            raise IntegrityError(f"the big part of {expect.what} on the CDN does not match its manifest "
                                 f"({info.size} bytes, not {expect.size})")
        return info

    def _fits_now(self, bucket, key, expect, info):
        """Whether the cache holds a part that fits (its sidecar says so; its blocks are checked as read)."""
        return _fits(self._meta(bucket, key, expect), expect, info)

    def _ending(self, bucket, key):
        """Wait (without the lock) for a listed download that has failed or committed but not yet ended: a
        failed one leaves its part to resume only once its fetchers are joined. True when it waited."""
        with self._lock:
            download = self._downloads.get((bucket, key))
        if download is None or not download.done or download.ended.is_set():
            return False
        download.ended.wait()
        return True

    def _joinable(self, bucket, key, expect, info):
        """Under the lock: the download under way that a load of this version and object may join, or None.
        One that has ended (still listed for a moment) is never joined: a committed one would be read from
        the final file, which may be gone by now (the soak met a 500 there), a failed one would hand this
        load its old failure."""
        download = self._downloads.get((bucket, key))
        if download is not None and not download.done and download.info.etag == info.etag \
                and download.version == expect.version:
            return download
        return None

    def _start(self, bucket, key, cdn, expect, info, memory, prefetch=False):
        """A new download of the CDN's object, running on its own thread, that resumes a leftover part of
        the same object when there is one; called under the lock. ``memory`` is the reservation of its first
        buffer, which it now owns. Refused with a 507 when the disk budget has no room for it."""
        old = self._downloads.get((bucket, key))
        if old is not None and not old.done:
            old.abandon()  # another version: it must not land over this one
        self._folder(bucket, create=True)  # its .part file goes there
        leftover = self._leftover(bucket, key, expect, info)
        held = 0 if leftover is None else _allocated(leftover[0])
        busy = self._busy()
        if leftover is not None:
            busy.add(leftover[0])  # resumed, not evicted
        try:
            self.disk.make_room(max(0, info.size - held), busy, f"{bucket}/{key}")
            download = self._download(self, bucket, key, info, expect.blocks, expect.version,
                                      expect.block_size, memory, leftover)
            fd = download.prepare()
        except BaseException:
            memory.release()
            if leftover is not None:
                leftover[1].close()
            raise
        if prefetch:
            download.mark_prefetch()
        self.downloads += 1
        self._downloads[(bucket, key)] = download
        self._running.add(download)
        threading.Thread(target=self._run, args=(download, fd, cdn), daemon=True,
                         name=f"cdn-{bucket}/{key}").start()
        log.info("downloading %s/%s (%d bytes) from the CDN", bucket, key, info.size)
        return download

    def _busy(self):
        """Under the lock: the paths of parts being read or downloaded, which no eviction may touch."""
        busy = {path for path in self._reading}
        for download in self._running:
            busy.add(download.part)
            busy.add(self.path(download.bucket, download.key))
        return busy

    def _leftover(self, bucket, key, expect, info):
        """Under the lock: the (part, record) an interrupted download of this very object left (the same
        manifest version, block size and ETag; a sealed part only), to resume; every other leftover of the key
        no download uses is removed, record first."""
        folder = os.path.join(self.root, bucket)
        identity = None
        if expect.sealed:
            identity = BlockRecord.identity_of(bucket, key, info, expect.version, expect.block_size)
        in_use = {d.part for d in self._running}
        found = None
        try:
            names = os.listdir(folder)
        except OSError:
            return None
        for name in names:
            if not (name.startswith(key + ".") and name.endswith(RECORD_SUFFIX)):
                continue
            middle = name[len(key) + 1:-len(RECORD_SUFFIX)]
            if len(middle) != 32 or any(c not in "0123456789abcdef" for c in middle):
                continue
            record_path = os.path.join(folder, name)
            part = record_path[:-len(RECORD_SUFFIX)] + PART_SUFFIX
            if part in in_use:
                continue
            record = BlockRecord.read(record_path, self.opener)
            if found is None and record is not None and identity is not None and record.matches(identity) \
                    and os.path.isfile(part) and not os.path.islink(part):
                found = (part, record)
                continue
            if record is not None:
                record.close()
            log.info("discarding the leftover download %s: it is not of the current manifest and object",
                     name)
            _unlink_quietly(record_path)
            _unlink_quietly(part)
        return found

    def _run(self, download, fd, cdn):
        """A download's thread: the download, then its end in the cache's books."""
        try:
            download.run(fd, cdn)
        finally:
            self._finished(download)

    def _follow(self, download, reader, expect, first):
        """(check's result, blocks) of a download: the part's end is checked before streaming."""
        checked = None
        if first == 0:
            try:
                download.wait_tail()
                checked = self._check_end(reader, download.info.size, expect, expect.blocks, download)
            except BaseException:
                reader.close()
                download.leave()
                raise
        return checked, download.follow(reader, first)

    def _check_end(self, f, long long size, expect, blocks, download):
        """``expect.check`` of the part's last TAIL bytes. Of a cached part (whose block digests the manifest
        or the sidecar holds) the blocks those bytes lie in are checked first, and the tail is taken from the
        very bytes checked; a ``download``'s fetchers checked them already."""
        if blocks is None or download is not None:
            # A download's fetchers checked its tail blocks as they came (against the manifest, for a sealed
            # part); each is checked again as it streams.
            tail = read_tail(f, size, TAIL)
        else:
            tail = b""
            block_size = expect.block_size
            buf = aligned_buffer(block_size)
            for i in range(tail_start(size, block_size) // block_size, -(-size // block_size)):
                pos = i * block_size
                view, digest = read_hashed(f.fileno(), buf, pos, min(size, pos + block_size) - pos,
                                           self.hasher)
                if digest != blocks[i]:
                    raise IntegrityError(f"block {i} of {expect.what} does not match its manifest")
                tail = (tail + bytes(view[-TAIL:]))[-TAIL:]
        return None if expect.check is None else expect.check(size, tail)

    # --- downloads in flight ----------------------------------------------------------------------

    def settle(self, timeout=None):
        """Wait for the downloads in flight to end (committed to the cache, or failed): a load ends with its
        last byte, before its part's last hashes and commit. False when ``timeout`` seconds ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            downloads = list(self._running)
        for download in downloads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not download.ended.wait(left):
                return False
        return True

    def downloading(self, bucket, key):
        """The download of ``bucket/key`` that new loads find listed (one that has just ended may still be
        listed for a moment: it is never joined), or None."""
        with self._lock:
            return self._downloads.get((bucket, key))

    def _finished(self, download):
        with self._lock:
            self._running.discard(download)
            self._ended.append(download)
            self.bytes_resumed += download.bytes_resumed
            if self._downloads.get((download.bucket, download.key)) is download:
                del self._downloads[(download.bucket, download.key)]

    # --- staging (contract section 8.4) -------------------------------------------------------------

    def prefetch(self, bucket, key, cdn, expect):
        """Fetch the big part into the cache in the background, ahead of need: ``(200, status)`` when the
        cache already holds it (as its sidecar says: the blocks are checked by the load that reads them),
        ``(202, status)`` of the download started or joined (never a second one). The download is marked a
        prefetch: a restart that interrupts it resumes it after the next login."""
        expect.block_size = expect.block_size or self.block_size
        try:
            if expect.sealed and self._fits_now(bucket, key, expect, None):
                return 200, self._cached_status(bucket, key, expect.size)
            info = self._head(bucket, key, cdn, expect)
            if not expect.sealed and self._fits_now(bucket, key, expect, info):
                return 200, self._cached_status(bucket, key, info.size)
            memory = None
            try:
                while True:
                    if self._ending(bucket, key):
                        continue
                    with self._lock:
                        download = self._joinable(bucket, key, expect, info)
                        if download is None and memory is not None:
                            download, memory = self._start(bucket, key, cdn, expect, info, memory, True), None
                    if download is not None:
                        download.mark_prefetch()
                        status = download.status()  # it may have ended since: then as it ended
                        if status["state"] == FAILED:
                            raise download.failure  # its error status, as a load's would be
                        return (200 if status["state"] == CACHED else 202), status
                    memory = self.buffers.reserve(expect.block_size)
            finally:
                if memory is not None:
                    memory.release()
        except OSError as exc:
            log.debug("prefetching %s/%s failed", bucket, key, exc_info=True)
            raise storage_error(exc, f"{bucket}/{key}") from exc

    def _cached_status(self, bucket, key, size):
        return {"folder": bucket, "name": self.name_of(key), "state": CACHED, "bytesDone": size,
                "bytesTotal": size, "bytesResumed": 0, "error": None}

    def transfers(self):
        """The download status of every download under way and of the last ones that ended, newest last."""
        with self._lock:
            downloads = list(self._ended) + sorted(self._running, key=id)
        seen, out = set(), []
        for download in downloads:
            if download not in seen:
                seen.add(download)
                out.append(download.status())
        return out

    def usage(self):
        """The cache's bytes in use, its budget and the room left:
        ``{"bytesUsed", "bytesMax", "bytesFree"}``."""
        try:
            return self.disk.room()
        except OSError as exc:
            raise storage_error(exc, "the model cache") from exc

    def stats(self):
        """The cache's figures for /metrics (it reads the disk: never call it on the event loop)::

            {"cache_hits": int, "cache_misses": int, "cdn_downloads": int, "blocks_handed_over": int,
             "cache_refetches": int, "cache_evictions": int, "cdn_bytes_resumed": int,   # counts since start
             "cache_bytes_used": int, "cache_bytes_max": int,  # usage(): bytesUsed, bytesMax (0: no cap)
             "downloads_in_progress": int}                     # downloads fetching or verifying now
        """
        usage = self.usage()
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cdn_downloads": self.downloads,
            "blocks_handed_over": self.handed,
            "cache_refetches": self.refetches,
            "cache_evictions": self.evictions,
            "cdn_bytes_resumed": self.bytes_resumed,
            "cache_bytes_used": usage["bytesUsed"],
            "cache_bytes_max": usage["bytesMax"],
            "downloads_in_progress": sum(t["state"] in (FETCHING, VERIFYING) for t in self.transfers()),
        }

    def interrupted_prefetches(self):
        """``(bucket, key)`` of each prefetch a restart interrupted (a leftover part whose record says a
        prefetch asked for it) that no download of this process has taken up."""
        with self._lock:
            running = {(d.bucket, d.key) for d in self._running}
        found = []
        for folder, _, names in os.walk(self.root, followlinks=False):
            for name in names:
                if not name.endswith(RECORD_SUFFIX):
                    continue
                record = BlockRecord.read(os.path.join(folder, name), self.opener)
                if record is None:
                    continue
                record.close()
                where = (record.identity["bucket"], record.identity["key"])
                if record.prefetch and where not in running and where not in found and \
                        os.path.dirname(os.path.join(folder, name)) == os.path.join(self.root, where[0]):
                    found.append(where)
        return found


def _allocated(path):
    """Bytes of the disk a leftover part holds already (it was preallocated; a power cut may have cut it)."""
    try:
        return os.stat(path, follow_symlinks=False).st_blocks * 512
    except OSError:
        return 0
