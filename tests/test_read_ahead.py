"""read_ahead: ReadAhead, a producer on its own thread, a bounded number of chunks ahead, for `for` and
`async for`."""

import asyncio
import threading
import time

import pytest

from read_ahead import ReadAhead


class Producer:
    """A generator of ``count`` chunks that records what it produced, on which thread it closed, and
    waits for ``gate`` before the chunk at index ``wait_at``."""

    def __init__(self, count=10, fail_at=None, wait_at=None):
        self.count, self.fail_at, self.wait_at = count, fail_at, wait_at
        self.produced = []
        self.closed_on = None
        self.gate = threading.Event()

    def __call__(self):
        try:
            for i in range(self.count):
                if i == self.wait_at:
                    self.gate.wait()
                if i == self.fail_at:
                    raise OSError(f"broke at {i}")
                self.produced.append(i)
                yield i
        finally:
            self.closed_on = threading.current_thread().name


def no_thread_named(name, timeout=10):
    """Whether every thread called ``name`` has ended (each is given ``timeout`` seconds)."""
    for t in [t for t in threading.enumerate() if t.name == name]:
        t.join(timeout)
    return not [t for t in threading.enumerate() if t.name == name]


def until(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


def test_all_chunks_arrive_in_order_and_the_thread_ends():
    p = Producer(100)
    assert list(ReadAhead(p(), 3, "ra-all")) == list(range(100))
    assert no_thread_named("ra-all")
    assert p.closed_on == "ra-all"


def test_a_producer_exception_is_raised_after_the_chunks_before_it():
    p = Producer(10, fail_at=4)
    chunks = ReadAhead(p(), 2, "ra-fail")
    got = []
    with pytest.raises(OSError, match="broke at 4"):
        for chunk in chunks:
            got.append(chunk)
    assert got == [0, 1, 2, 3]
    assert list(chunks) == []  # raised once; then the stream is over
    assert no_thread_named("ra-fail")


def test_closing_early_closes_the_producer_on_its_own_thread():
    p = Producer(1000)
    with ReadAhead(p(), 2, "ra-close") as chunks:
        assert next(chunks) == 0
    # close() waited for the producer: its generator was closed, on the producer's thread
    assert p.closed_on == "ra-close"
    assert len(p.produced) <= 4  # the one taken, two waiting, one in the producer's hands
    assert not [t for t in threading.enumerate() if t.name == "ra-close"]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_the_producer_stays_at_most_depth_chunks_ahead(depth):
    # ``depth`` chunks wait for the consumer and the producer holds one more, never beyond.
    p = Producer(50)
    with ReadAhead(p(), depth, "ra-depth") as chunks:
        assert until(lambda: len(p.produced) >= depth + 1)
        for i, chunk in enumerate(chunks):
            assert chunk == i
            assert len(p.produced) <= i + depth + 2
    assert no_thread_named("ra-depth")


def test_a_consumer_waiting_for_a_slow_producer_gets_each_chunk():
    p = Producer(5, wait_at=3)
    chunks = ReadAhead(p(), 2, "ra-slow")
    assert [next(chunks) for _ in range(3)] == [0, 1, 2]
    threading.Timer(0.05, p.gate.set).start()
    assert list(chunks) == [3, 4]
    assert no_thread_named("ra-slow")


def test_async_consumer_gets_all_chunks_then_the_producer_exception():
    p = Producer(10, fail_at=7, wait_at=5)

    async def consume():
        got = []
        threading.Timer(0.05, p.gate.set).start()  # the consumer waits on the loop meanwhile
        with pytest.raises(OSError, match="broke at 7"):
            async for chunk in ReadAhead(p(), 2, "ra-async"):
                got.append(chunk)
        return got

    assert asyncio.run(consume()) == list(range(7))
    assert no_thread_named("ra-async")
    assert p.closed_on == "ra-async"


def test_a_cancelled_async_consumer_stops_the_producer_which_closes_on_its_thread():
    p = Producer(100, wait_at=3)

    async def consume(got):
        chunks = ReadAhead(p(), 2, "ra-cancel")
        try:
            async for chunk in chunks:
                got.append(chunk)
        finally:
            chunks.stop()  # returns at once: the producer is still waiting for its gate

    async def main():
        got = []
        task = asyncio.ensure_future(consume(got))
        while len(got) < 3:  # then the consumer waits for chunk 3, which waits for the gate
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    assert asyncio.run(main()) == [0, 1, 2]
    assert p.closed_on is None  # the producer is still held at its gate
    p.gate.set()
    assert no_thread_named("ra-cancel")
    assert p.closed_on == "ra-cancel"
    assert p.produced == [0, 1, 2, 3]  # it made the chunk it worked on, and no more


def test_an_iterator_without_close_is_read_ahead_too():
    assert list(ReadAhead(iter(range(20)), 3, "ra-iter")) == list(range(20))
    assert no_thread_named("ra-iter")


def test_depth_must_be_positive():
    with pytest.raises(ValueError):
        ReadAhead(iter(()), 0)
