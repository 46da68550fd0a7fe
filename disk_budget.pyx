# cython: language_level=3, embedsignature=True
"""The model cache's disk budget: before a download reserves its space, evict cached parts, least recently
loaded first, until the cache fits MODEL_CACHE_MAX_BYTES and the filesystem keeps MODEL_CACHE_MIN_FREE_BYTES
free (contract section 8, item 3).

What it may evict, in ``{root}/{bucket}/``: a committed part (its data file ``{key}`` and sidecar
``{key}.meta``), and a download's leftover (``{key}.<32 hex>.part`` and its ``.record``). Never a part in
the caller's ``busy`` set, never a file in ``.staging`` (the uploads') or another folder whose name begins
with a dot, never a sidecar a commit is writing, never anything reached through a symbolic link. Either
enough can be evicted and it is, or nothing is and the download gets a StorageError (507) that says why.

Recency is the data file's mtime, which ``touch`` sets on every load: the order survives a restart, with no
book of its own to keep.
"""

import logging
import os
import re
import stat
import time

from errors import StorageError, storage_error

log = logging.getLogger("loader.cdn")

# The cache's names (model_cache.META_SUFFIX, download.PART_SUFFIX): model_cache imports this module, so they
# are spelled out here, and a test holds them equal.
META_SUFFIX = ".meta"
PART_SUFFIX = ".part"
RECORD_SUFFIX = ".record"
# A download's files: ``{key}.<32 hex>.part`` and its record ``{key}.<32 hex>.record``.
_DOWNLOAD_FILE = re.compile(r"(.+)\.([0-9a-f]{32})(\.part|\.record)", re.DOTALL)


def _setting(name, value):
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be a whole number of bytes, 0 or more (not {value!r})")
    return value


class _Unit:
    """What is evicted as one: a committed part or a download's leftover, in one bucket's folder. ``name``
    is its data file's (or its ``.part``'s) name, whether or not that file is still there."""

    def __init__(self, bucket, name, key, leftover):
        self.bucket = bucket
        self.name = name
        self.key = key
        self.leftover = leftover
        self.files = []  # (name, st_size, bytes on disk)
        self._mtimes = {}

    def add(self, name, st):
        self.files.append((name, st.st_size, st.st_blocks * 512))
        self._mtimes[name] = st.st_mtime

    @property
    def mtime(self):
        """When it was last loaded: its data file's mtime (a .part's: when it was last written); with that
        file gone, its newest file's."""
        return self._mtimes.get(self.name, max(self._mtimes.values()))

    @property
    def size(self):
        return sum(f[1] for f in self.files)

    @property
    def disk(self):
        return sum(f[2] for f in self.files)


class DiskBudget:
    """The disk budget of the cache under ``root``: at most ``max_bytes`` in the cache (0: no cap), and at
    least ``min_free`` bytes left free on its filesystem. ``statvfs`` (os.statvfs) and ``clock`` (time.time)
    are injectable, for tests.

    Sizes: the cache's bytes (``usage``, the cap) are the files' ``st_size``, the bytes a field engineer sees
    with ``ls -l`` and the sizes ``needed`` speaks in; a download's ``.part`` is preallocated to its full
    size, so it counts in full from the start. What an eviction gives back to the filesystem (the free-space
    side) is the files' ``st_blocks * 512``, which is what unlinking them frees.

    It holds no lock: the cache calls ``make_room`` under its own, the lock under which it starts downloads,
    so no two downloads reserve the same free bytes and no part becomes busy while it is being evicted.
    """

    def __init__(self, root, max_bytes=0, min_free=1 << 30, statvfs=os.statvfs, clock=time.time):
        self.root = os.path.abspath(root)
        self.max_bytes = _setting("MODEL_CACHE_MAX_BYTES", max_bytes)
        self.min_free = _setting("MODEL_CACHE_MIN_FREE_BYTES", min_free)
        self._statvfs = statvfs
        self._clock = clock
        self.evictions = 0  # parts evicted so far, for /metrics
        self.evicted_bytes = 0

    def usage(self):
        """Bytes the cache holds now: every regular file under the root, not following symbolic links."""
        return self._scan()[0]

    def free(self):
        """Bytes the filesystem of the cache has free for the loader now (not root's reserve). Before the
        cache has made its root, the nearest folder above it that exists answers."""
        path = self.root
        while True:
            try:
                st = self._statvfs(path)
                return st.f_bavail * st.f_frsize
            except FileNotFoundError:
                if os.path.dirname(path) == path:
                    raise
                path = os.path.dirname(path)

    def room(self):
        """``{"bytesUsed", "bytesMax" (0: no cap), "bytesFree"}``: bytesFree is what a new download could
        still take without evicting anything."""
        used = self.usage()
        return {"bytesUsed": used, "bytesMax": self.max_bytes,
                "bytesFree": self._available(used, self.free())}

    def touch(self, data_path):
        """A committed part was loaded: it is now the most recently loaded. A failure is no load's concern
        (at worst the part is evicted sooner), so it is ignored."""
        now = self._clock()
        try:
            os.utime(data_path, (now, now), follow_symlinks=False)
        except (OSError, ValueError):
            pass

    def make_room(self, needed, busy, what):
        """Evict parts, least recently loaded first, until ``needed`` more bytes fit both the cap and the
        free space to keep; never one whose data path (or ``.part`` path) is in ``busy``. When evicting every
        part that may go would still not make room, nothing is evicted: a StorageError naming ``what``, the
        bytes needed and the bytes available."""
        needed = _setting("needed", needed)
        busy = {os.path.abspath(p) for p in busy}
        try:
            used, units = self._scan()
            free = self.free()
        except OSError as exc:
            raise storage_error(exc, what) from exc
        candidates = sorted((u for u in units if os.path.join(self.root, u.bucket, u.name) not in busy),
                            key=lambda u: (u.mtime, u.bucket, u.name))
        # All or nothing: parts are evicted only when their going makes the room, never in vain.
        best_used = used - sum(u.size for u in candidates)
        best_free = free + sum(u.disk for u in candidates)
        if not self._fits(needed, best_used, best_free):
            raise self._no_room(what, needed, best_used, best_free)
        for unit in candidates:
            if self._fits(needed, used, free):
                break
            size, disk = self._evict(unit)
            used -= size
            free += disk
        if not self._fits(needed, used, free):  # a part that could not be removed (logged)
            raise self._no_room(what, needed, used, free)

    # --- the books ---------------------------------------------------------------------------------

    def _fits(self, needed, used, free):
        return (self.max_bytes == 0 or used + needed <= self.max_bytes) and free - needed >= self.min_free

    def _available(self, used, free):
        available = free - self.min_free
        if self.max_bytes:
            available = min(available, self.max_bytes - used)
        return max(0, available)

    def _no_room(self, what, needed, used, free):
        cap = self.max_bytes or "0 (no cap)"
        return StorageError(f"no room in the model cache for {what}: it needs {needed} bytes, "
                            f"{self._available(used, free)} are available (MODEL_CACHE_MAX_BYTES {cap}, "
                            f"MODEL_CACHE_MIN_FREE_BYTES {self.min_free})")

    def _scan(self):
        """(bytes the cache holds, its parts as _Units) as the disk has them now. A file or folder that
        vanishes or cannot be read meanwhile is left out: the next scan sees it again."""
        used, units = 0, {}
        folders = [(self.root, None, True)]  # (path, its bucket when it is one, whether it is the root)
        while folders:
            path, bucket, top = folders.pop()
            try:
                with os.scandir(path) as it:
                    entries = list(it)
            except OSError:
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)  # a link is neither a folder nor a file here
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    # A bucket is a folder right under the root; the loader's own (.staging) begin with a dot,
                    # which no bucket's name does.
                    is_bucket = top and not entry.name.startswith(".")
                    folders.append((entry.path, entry.name if is_bucket else None, False))
                elif stat.S_ISREG(st.st_mode):
                    used += st.st_size
                    if bucket is not None:
                        self._file(units, bucket, entry.name, st)
        return used, list(units.values())

    def _file(self, units, bucket, name, st):
        """Add the file ``name`` of ``bucket``'s folder to the unit it belongs to."""
        match = _DOWNLOAD_FILE.fullmatch(name)
        if match is not None:
            key = match.group(1)
            if key.endswith(META_SUFFIX):
                return  # a sidecar a commit is writing (not under the cache's lock): a few KB, swept at start
            unit_name, leftover = f"{key}.{match.group(2)}{PART_SUFFIX}", True
        else:
            key = name[:-len(META_SUFFIX)] if name.endswith(META_SUFFIX) else name
            unit_name, leftover = key, False
        unit = units.get((bucket, unit_name))
        if unit is None:
            unit = units[(bucket, unit_name)] = _Unit(bucket, unit_name, key, leftover)
        unit.add(name, st)

    def _evict(self, unit):
        """Remove ``unit``'s files, the sidecar (or record) before the data (or .part): a crash in between
        leaves data without a sidecar, which reads as not cached. (bytes, bytes on disk) removed; at a failure
        (logged) the unit's other files stay."""
        try:  # the bucket's folder itself, never a link put in its place since the scan
            folder = os.open(os.path.join(self.root, unit.bucket),
                             os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            log.warning("could not evict %s/%s from the model cache: %s", unit.bucket, unit.key, exc.strerror)
            return 0, 0
        size = disk = 0
        try:
            for name, file_size, file_disk in sorted(unit.files, key=lambda f: f[0] == unit.name):
                try:
                    os.unlink(name, dir_fd=folder)
                except FileNotFoundError:
                    pass  # gone already (a discard meanwhile): its room is free all the same
                except OSError as exc:
                    log.warning("could not evict %s/%s from the model cache: %s", unit.bucket, name,
                                exc.strerror)
                    return size, disk
                size += file_size
                disk += file_disk
        finally:
            os.close(folder)
        self.evictions += 1
        self.evicted_bytes += size
        log.info("evicted %s/%s from the model cache to make room: %d bytes, %s", unit.bucket, unit.key, size,
                 "an unfinished download" if unit.leftover else "the least recently loaded part")
        return size, disk
