"""aligned_io opens cache files as the loader's own: regular files only, never through a symbolic link, and
a FIFO never blocks the open; read_at reads any range past the page cache (or through it when O_DIRECT is
refused), and read_blocks hashes only what it reads from the file and frees its buffers without the GC."""

import errno
import fcntl
import gc
import hashlib
import mmap
import os

import pytest

import aligned_io
from aligned_io import NotRegularFile, open_direct, open_reader
from devstack import wait

BOUND = 10  # seconds an open may take here before it counts as hung


def bounded(call):
    """``call()``'s result; an open that blocks (on a FIFO) fails the test instead of hanging it."""
    return wait.bounded(call, BOUND, "the open did not end")


def open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "m.bin.big"
    os.mkfifo(path)
    yield path
    try:  # let an open() still blocked on it (the old code's) go on
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_open_reader_refuses_a_fifo_without_blocking(fifo):
    before = open_fds()
    with pytest.raises(NotRegularFile) as refused:
        bounded(lambda: open_reader(str(fifo)))
    assert refused.value.errno == errno.ENXIO and isinstance(refused.value, OSError)
    assert open_fds() == before  # the descriptor it opened to look is closed


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR], ids=["read", "read-write"])
def test_open_direct_refuses_a_fifo_without_blocking(fifo, flags):
    with pytest.raises(NotRegularFile):
        bounded(lambda: open_direct(str(fifo), flags))


def test_open_reader_refuses_a_symbolic_link_even_to_a_regular_file(tmp_path):
    target = tmp_path / "outside"
    target.write_bytes(b"not the cache's")
    (tmp_path / "m.bin.big").symlink_to(target)
    with pytest.raises(OSError) as refused:
        bounded(lambda: open_reader(str(tmp_path / "m.bin.big")))
    assert refused.value.errno == errno.ELOOP
    assert target.read_bytes() == b"not the cache's"


def test_open_reader_refuses_a_folder(tmp_path):
    (tmp_path / "m.bin.big").mkdir()
    before = open_fds()
    with pytest.raises(NotRegularFile) as refused:
        bounded(lambda: open_reader(str(tmp_path / "m.bin.big")))
    assert refused.value.errno == errno.EISDIR
    assert open_fds() == before


def test_a_regular_file_opens_blocking_past_the_page_cache(tmp_path):
    data = os.urandom(3 * 4096 + 5)
    (tmp_path / "f").write_bytes(data)
    with open_reader(str(tmp_path / "f")) as f:
        flags = fcntl.fcntl(f.fileno(), fcntl.F_GETFL)
        assert not flags & os.O_NONBLOCK  # cleared once it is known to be a regular file
        assert flags & os.O_DIRECT  # this filesystem allows it
        buf = aligned_io.aligned_buffer(len(data))
        assert bytes(aligned_io.read_at(f.fileno(), buf, 0, len(data))) == data


def test_an_injected_opener_gets_the_same_rules_and_falls_back_without_o_direct(tmp_path, fifo):
    """The opener stays injectable (a filesystem that refuses O_DIRECT): it is asked for O_NOFOLLOW and
    O_NONBLOCK too, and what it opens is checked the same."""
    asked = []

    def no_direct(path, flags, *args):
        asked.append(flags)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused")
        return os.open(path, flags, *args)

    (tmp_path / "f").write_bytes(b"abc")
    with open_reader(str(tmp_path / "f"), no_direct) as f:
        assert not fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & (os.O_NONBLOCK | os.O_DIRECT)
    assert [bool(a & os.O_DIRECT) for a in asked] == [True, False]
    assert all(a & os.O_NOFOLLOW and a & os.O_NONBLOCK for a in asked)
    with pytest.raises(NotRegularFile):
        bounded(lambda: open_reader(str(fifo), no_direct))


def test_read_at_reads_any_range(tmp_path):
    data = os.urandom(3 * 4096 + 123)
    (tmp_path / "f").write_bytes(data)
    buf = aligned_io.aligned_buffer(8192)
    with aligned_io.open_reader(str(tmp_path / "f")) as f:
        assert fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT  # this filesystem allows it
        end = len(data)
        ranges = [(0, 4096), (1, 100), (4095, 4098), (5000, 8192), (end - 5, 5), (end - 5, 50), (end, 10)]
        for pos, n in ranges:
            assert bytes(aligned_io.read_at(f.fileno(), buf, pos, n)) == data[pos : pos + n]


def test_read_at_reads_through_the_page_cache_when_o_direct_refuses_a_read(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_DIRECT)
    try:
        misaligned = memoryview(bytearray(3 * 4096 + 1))[1:]  # an odd address: O_DIRECT refuses it
        assert bytes(aligned_io.read_at(fd, misaligned, 10, 100)) == data[10:110]
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)


@pytest.mark.parametrize("stop", ["at the end", "half-way"])
def test_read_blocks_frees_its_buffers_without_the_cyclic_gc(tmp_path, stop):
    """The soak found the loader's RSS growing by hundreds of MB over a run: every load's read-ahead
    buffers sat in a reference cycle (the generator's closure scope and the inner function it ran on the
    pool) until the cyclic GC came by. Reference counting alone must free them."""
    block = 64 * 1024
    data = os.urandom(6 * block + 5)
    (tmp_path / "f").write_bytes(data)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the cyclic GC finds is kept in gc.garbage, for a look
    try:
        with aligned_io.open_reader(str(tmp_path / "f")) as f:
            blocks = aligned_io.read_blocks(f.fileno(), len(data), block, hashlib.sha256)
            for i, view, digest in blocks:
                assert bytes(view) == data[i * block : (i + 1) * block]
                assert digest == hashlib.sha256(view).digest()
                if stop == "half-way" and i == 2:
                    break
            del view
            blocks.close()
            del blocks
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, mmap.mmap | memoryview)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []


class HandingWriter:
    """The writer of a file for read_blocks (``source``): hands the even blocks over in memory, filled with
    their index (not what the file holds), with the digest it took of them as they came; has the odd ones
    read from the file. Records the buffers it handed and the ones given back."""

    def __init__(self, block):
        self.size, self.handed, self.back = block, [], []

    def block(self, index, end, timeout):
        if index % 2:
            return True
        buf = memoryview(bytearray([index]) * self.size)
        self.handed.append(buf)
        return buf, hashlib.sha256(bytes([index]) * (end - index * self.size)).digest()

    def give_back(self, buf):
        self.back.append(buf)


@pytest.mark.parametrize("stop", [None, 1, 2])
def test_read_blocks_takes_the_digest_of_a_block_handed_over_and_gives_every_buffer_back(tmp_path, stop):
    """A block a download hands over in memory is the block the load checks and sends, with the digest the
    download took of those very bytes as they came: read_blocks hashes it no second time (it hashes only
    what it reads from the file). Each buffer goes back once, also when the load stops early."""
    block = 64 * 1024
    data = os.urandom(6 * block + 5)
    (tmp_path / "f").write_bytes(data)
    writer = HandingWriter(block)
    seen, hashed = [], []

    def hasher():
        hashed.append(1)
        return hashlib.sha256()

    with aligned_io.open_reader(str(tmp_path / "f")) as f:
        blocks = aligned_io.read_blocks(f.fileno(), len(data), block, hasher, source=writer)
        for i, view, digest in blocks:
            expected = data[i * block : (i + 1) * block] if i % 2 else bytes([i]) * len(view)
            assert bytes(view) == expected and digest == hashlib.sha256(expected).digest()
            seen.append(i)
            if i == stop:
                break
        blocks.close()
    assert seen == list(range(7 if stop is None else stop + 1))
    assert writer.handed and sorted(map(id, writer.back)) == sorted(map(id, writer.handed))
    # the file was read (and hashed) for the odd blocks only, those read ahead included
    assert 0 < len(hashed) <= len([i for i in range(7) if i % 2])
    assert len(hashed) >= len([i for i in seen if i % 2])
