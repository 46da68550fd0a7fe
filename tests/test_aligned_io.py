"""aligned_io opens cache files as the loader's own: regular files only, never through a symbolic link, and
a FIFO never blocks the open."""

import errno
import fcntl
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
