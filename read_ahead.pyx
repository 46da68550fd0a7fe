# cython: language_level=3, embedsignature=True
"""Read-ahead: a blocking producer of chunks (reading and decrypting a file) runs on a thread of its own, a
few chunks ahead of its consumer (sending them), so the two overlap. One hand-over serves a consumer on a
thread (``for``: the unlock's upload to the Docker Engine) and one on the event loop (``async for``: a
/load response)."""

import asyncio
import threading
from collections import deque

# What _take gives once the producer has ended (and its exception, if any, was raised).
_END = object()


class ReadAhead:
    """Iterates ``chunks`` on a thread named ``name``: at most ``depth`` chunks wait for the consumer while
    the producer works on the next one. The producer's exception is raised in the consumer, after the
    chunks produced before it.

    A consumer that stops early calls ``close()`` (from a thread: returns once the producer has ended) or
    ``stop()`` (on the event loop: returns at once). Either way the producer stops and closes ``chunks``
    on its own thread, so the files a generator holds are closed by the thread that read them. A consumer
    must end with one of these or read to the end: a producer waiting for room waits for them.

    Nothing polls: both sides wait on one condition; an async consumer is woken through its event loop
    only when it found nothing ready."""

    def __init__(self, chunks, int depth=2, name="read-ahead"):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._chunks = iter(chunks)  # a generator runs only on the producer's thread, from its first chunk
        self._depth = depth
        self._ready = deque()
        self._cond = threading.Condition()
        self._end = None  # once the producer has ended: _END, or the exception it raised
        self._stopped = False
        self._waiter = None  # (event loop, future) of an async consumer waiting for the next chunk
        self._thread = threading.Thread(target=self._produce, daemon=True, name=name)
        self._thread.start()

    # --- the producer's thread ---

    def _produce(self):
        end = _END
        try:
            for chunk in self._chunks:
                if not self._put(chunk):
                    break
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer
            end = exc
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException as exc:  # noqa: BLE001 - raised in the consumer
                    if end is _END:
                        end = exc
        with self._cond:
            self._end = end
            self._wake()

    def _put(self, chunk):
        """Hand ``chunk`` over once there is room; False when the consumer has stopped."""
        with self._cond:
            while len(self._ready) >= self._depth and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return False
            self._ready.append(chunk)
            self._wake()
            return True

    def _wake(self):
        """Tell the consumer something changed (the condition held)."""
        self._cond.notify_all()
        if self._waiter is not None:
            loop, future = self._waiter
            self._waiter = None
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the event loop is closed: nobody is consuming any more
                self._stopped = True
                self._ready.clear()

    # --- the consumer's side ---

    def _take(self):
        """The next chunk, _END, or the producer's exception raised (the condition held; called only when
        a chunk is ready, the producer has ended, or the consumer stopped)."""
        if self._stopped:
            return _END
        if self._ready:
            chunk = self._ready.popleft()
            self._cond.notify_all()  # room for the producer
            return chunk
        end, self._end = self._end, _END
        if end is not _END:
            raise end
        return _END

    def __iter__(self):
        return self

    def __next__(self):
        with self._cond:
            while not self._ready and self._end is None and not self._stopped:
                self._cond.wait()
            chunk = self._take()
        if chunk is _END:
            raise StopIteration
        return chunk

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            with self._cond:
                if self._ready or self._end is not None or self._stopped:
                    chunk = self._take()
                    if chunk is _END:
                        raise StopAsyncIteration
                    return chunk
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                self._waiter = (loop, future)
            await future

    def stop(self):
        """Stop the producer without waiting for it: it ends after the chunk it works on."""
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._cond.notify_all()

    def close(self):
        """Stop the producer and wait until it has ended and closed ``chunks``."""
        self.stop()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _resolve(future):
    if not future.done():  # a consumer cancelled meanwhile has left it
        future.set_result(None)
