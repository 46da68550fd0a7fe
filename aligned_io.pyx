# cython: language_level=3, embedsignature=True
"""File I/O past the page cache, and the verified block reader every load streams through.

Cache files are written and read with ``O_DIRECT`` where the filesystem allows it: the bytes go between
the disk and a reused buffer, not through the page cache. Filling fresh page-cache pages costs more CPU
than anything else in a cold load, and a model streamed once would only push other pages out. Where the
filesystem refuses ``O_DIRECT`` (tmpfs, some network and FUSE filesystems) the same calls go through the
page cache.

``read_blocks`` yields a file as blocks, each read and hashed ahead on helper threads, so the disk, the
hash and the caller's work (decrypting, sending) overlap. The caller decides what a digest must
be before it lets a block go.

Every cache file is opened as the loader's own: never through a symbolic link (``O_NOFOLLOW``), and only
when it is a regular file. A FIFO where a file should be cannot block the open (``O_NONBLOCK``, cleared
again once the descriptor is known to be a regular file's), and a FIFO, socket, device or folder is
refused with NotRegularFile.
"""

import errno
import fcntl
import mmap
import os
import stat
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from constants import READ_AHEAD
from errors import IntegrityError

cdef extern from "fcntl.h" nogil:
    # Linux: start writeback of a file range now, without waiting for it (_GNU_SOURCE comes from
    # pyconfig.h). Each finished segment goes to disk while the rest downloads, so the final fsync has
    # little left to do; otherwise the whole object is dirty in memory and the fsync writes it all at the
    # end while the load waits.
    int sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags)
    unsigned int SYNC_FILE_RANGE_WRITE

# O_DIRECT wants offsets, lengths and buffer addresses aligned to the logical block size; a page covers
# every device.
DIRECT_ALIGN = 4096
# How often a read-ahead waiting for a download's bytes looks whether its load has gone.
WAIT_STEP = 0.1


def aligned_buffer(Py_ssize_t size):
    """A page-aligned buffer for O_DIRECT reads of up to ``size`` bytes from any offset: one block more,
    for a read that starts at the block before the offset."""
    size += (-size) % DIRECT_ALIGN
    return memoryview(mmap.mmap(-1, size + DIRECT_ALIGN))


class NotRegularFile(OSError):
    """A cache file that is something else than a regular file (a FIFO, a socket, a device, a folder)."""


# Every cache file is opened so: never through a symbolic link, and never blocking (a FIFO).
SAFE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK


def open_direct(path, int flags, opener=os.open):
    """A descriptor of ``path`` that bypasses the page cache, or a plain one where the filesystem does not
    allow that. ``opener`` is os.open, or a test's filesystem.

    The file must be a regular file reached without a symbolic link: a link at ``path`` fails with ELOOP,
    anything but a regular file with NotRegularFile, and a FIFO never blocks the open."""
    flags |= SAFE_FLAGS
    try:
        fd = opener(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = opener(path, flags)
    try:
        regular_file(fd, path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def regular_file(int fd, path):
    """The ``os.fstat`` of ``fd``, opened from ``path``; NotRegularFile when it is no regular file."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.ENXIO
        raise NotRegularFile(code, "not a regular file", os.fspath(path))
    return st


def open_reader(path, opener=os.open):
    """The regular file at ``path``, open for read_at (unbuffered; O_DIRECT where allowed); see
    open_direct."""
    return os.fdopen(open_direct(path, os.O_RDONLY, opener), "rb", buffering=0)


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
        without_direct(fd)
        got = os.preadv(fd, [buf[:length]], start)
    return buf[pos - start:max(pos - start, min(got, pos - start + n))]


def without_direct(int fd):
    """O_DIRECT was accepted at open but refused for a transfer: go through the page cache from now on."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def write_all(int fd, view, long long pos):
    cdef Py_ssize_t done = 0
    while done < len(view):  # a short write is legal: finish it
        done += os.pwrite(fd, view[done:], pos + done)


def start_writeback(int fd, long long start, long long end):
    """Hand a finished range to the disk now (advisory: a failure is harmless)."""
    with nogil:
        sync_file_range(fd, start, end - start, SYNC_FILE_RANGE_WRITE)


def read_tail(f, size, n):
    """The last ``n`` bytes (or all, when shorter) of an open file that holds ``size`` bytes."""
    start = max(0, size - n)
    data = bytes(read_at(f.fileno(), aligned_buffer(n), start, size - start))
    if len(data) != size - start:
        raise IntegrityError("the cache file ended early")
    return data


def _released(view):
    """Invalidate a view handed out of a reused buffer: a caller that kept it fails loudly instead of
    reading bytes that were overwritten since."""
    try:
        view.release()
    except BufferError:
        pass


def read_hashed(int fd, buf, long long pos, long long n, hasher):
    """``n`` bytes of the file at ``pos`` as a view of ``buf``, and ``hasher()``'s digest of them."""
    view = read_at(fd, buf, pos, n)
    if len(view) != n:
        raise IntegrityError("the cache file ended early")
    return view, _digest(hasher, view)


def _digest(hasher, view):
    h = hasher()
    h.update(view)
    return h.digest()


def _read_block(job, long long index, buf):
    """One job of read_blocks: block ``index`` and its digest, and the source's buffer it lies in when the
    source handed it over in memory (None when it was read from the file into ``buf``)."""
    fd, size, block_size, hasher, source, cancelled = job
    cdef long long start = index * block_size
    cdef long long end = min(size, start + block_size)
    if source is not None:
        while True:
            got = source.block(index, end, WAIT_STEP)
            if got is True:
                break
            if got is not False:  # (buffer, digest): the writer hashed the block as it came
                held, digest = got
                return held[:end - start], digest, held
            if cancelled.is_set():
                return None, None, None
    view, digest = read_hashed(fd, buf, start, end - start, hasher)
    return view, digest, None


def read_blocks(int fd, long long size, Py_ssize_t block_size, hasher, long long first=0, source=None,
                int depth=READ_AHEAD):
    """Yield ``(index, view, digest)`` for blocks ``first..`` of the file's ``size`` bytes: block ``i``
    holds bytes ``i*block_size`` up to the next block or ``size``; ``digest`` is ``hasher()``'s digest of
    the view. Views come from reused buffers, each valid until the next block is asked for.

    ``depth`` helper threads read and hash the next blocks while the caller uses this one, so the disk, the
    hash and the caller's work (decrypting, sending) overlap: reading and hashing one block in turn on one
    thread took a warm 1 GiB load 1.25 s, as long as the disk and the hash added up.

    ``source``, when given, is the writer of a file still being written (a download). ``source.block(index,
    end, timeout)`` waits up to ``timeout`` seconds for block ``index`` (ending at ``end``): it answers
    ``(buffer, digest)`` for a block handed over in memory (no disk read, and no second hash: the writer
    hashed it as it came), True once the block is in the file,
    False when neither came yet, and raises the writer's failure when the block never will come. A buffer
    handed over goes back with ``source.give_back(buffer)`` once the caller is done with the block.

    This is not read_ahead.ReadAhead (one producer, running a generator a few chunks ahead): the blocks sit
    at known offsets and are independent, so ``depth`` jobs read and hash them in parallel, each into a
    buffer of a ring that the caller's view returns to; one producer thread would read and hash them one
    after the other.
    """
    bufs = [aligned_buffer(block_size) for _ in range(depth + 1)]
    cdef long long count = -(-size // block_size) if block_size > 0 else 0
    cdef long long i
    cancelled = threading.Event()
    # The jobs get everything as arguments: an inner function here would live in the generator's closure
    # scope and point back at it, a cycle that kept the buffers until the cyclic GC ran (the soak saw the
    # loader's RSS grow by hundreds of MB).
    job = (fd, size, block_size, hasher, source, cancelled)
    pending = deque()
    lent = None
    try:
        with ThreadPoolExecutor(depth, thread_name_prefix="cache-read") as pool:
            try:
                for i in range(first, min(count, first + depth)):
                    pending.append(pool.submit(_read_block, job, i, bufs[(i - first) % (depth + 1)]))
                for i in range(first, count):
                    view, digest, lent = pending.popleft().result()
                    if i + depth < count:  # into the one buffer that neither the caller nor a job holds
                        buf = bufs[(i + depth - first) % (depth + 1)]
                        pending.append(pool.submit(_read_block, job, i + depth, buf))
                    yield i, view, digest
                    _released(view)
                    if lent is not None:
                        source.give_back(lent)
                        lent = None
            finally:
                cancelled.set()  # a job still waiting for its block gives up; the pool then shuts down
    finally:
        if lent is not None:
            source.give_back(lent)
        _give_back_pending(source, pending)


def _give_back_pending(source, pending):
    """Hand back the buffers of blocks read ahead that the caller never took (the pool has shut down)."""
    for done in pending:
        if done.cancelled() or done.exception() is not None:
            continue
        held = done.result()[2]
        if held is not None:
            source.give_back(held)
