# cython: language_level=3, embedsignature=True
"""The process heap: glibc malloc's parameters for the loader, handing the memory loads and uploads freed
back to the OS once the loader is idle, and the one budget the buffers of all loads and downloads come from.

Both answer what the soak found: the loader's RSS at rest climbing over a run while nothing leaked, because
glibc keeps freed chunks in its arenas. Elsewhere than glibc both are no-ops.
"""

import asyncio
import ctypes
import os
import threading

# glibc's mallopt parameters (malloc.h), and the loader's values.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MALLOC_ARENAS = 2
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
# How long the loader must stay idle after a load or upload before it trims the heap.
TRIM_AFTER_IDLE = 0.5


def _libc(name):
    """glibc's function ``name``, or None where the C library has none."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def tune_malloc():
    """Tune glibc's malloc for a process that streams multi-MiB chunks. Call it first, while the process
    has one thread. A variable MALLOC_<NAME>_ in the environment has the last word on its parameter.

    - At most two arenas. By default a thread that allocates while the others' arenas are busy gets one of
      its own, up to eight per core, and each keeps the multi-MiB chunks that loads and uploads freed in
      it: the soak saw the loader's RSS at rest climb from 160 to 390 MB over 800 operations; with two
      arenas, 135 to 170 MB, and loads no slower.
    - Chunks up to 32 MiB from the arenas, and their free memory kept up to 64 MiB. With glibc's defaults a
      load's 4 MiB blocks of plaintext were mapped afresh from the OS again and again: about 60,000 page
      faults a cold GiB, 0.1 s of CPU. What the arenas keep goes back to the OS once the loader is idle
      (MemoryTrim)."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return
    for name, param, value in (("MALLOC_ARENA_MAX", M_ARENA_MAX, MALLOC_ARENAS),
                               ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                               ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if name not in os.environ:
            mallopt(param, value)


class MemoryTrim:
    """Hands the memory loads and uploads freed back to the OS once the loader is idle. glibc keeps freed
    chunks in its arenas, and a fragmented arena never shrinks by itself: the soak saw the RSS at rest
    climb to ~200 MB over a run and stay there; malloc_trim(0) gives every free page back (~120 MB).

    ``begin`` and ``end`` bracket every request, on the event loop; ``trim(0)`` (glibc's malloc_trim, None
    where there is none) runs on a worker thread ``delay`` seconds after the last request ended, if a load
    or upload ended since the last trim and no request came meanwhile."""

    def __init__(self, trim=_libc("malloc_trim"), delay=TRIM_AFTER_IDLE):
        self.trim = trim
        self.delay = delay
        self.busy = 0
        self.generation = 0  # counts requests: any new one puts the trim off
        self.dirty = False  # a load or upload ended since the last trim

    def begin(self):
        self.busy += 1
        self.generation += 1

    def end(self, heavy):
        self.busy -= 1
        self.dirty = self.dirty or heavy
        if self.busy == 0 and self.dirty and self.trim is not None:
            asyncio.get_running_loop().call_later(self.delay, self._if_idle, self.generation)

    def _if_idle(self, generation):
        if self.busy == 0 and self.generation == generation and self.dirty:
            self.dirty = False
            asyncio.get_running_loop().run_in_executor(None, self.trim, 0)


# The process's one heap, trimmed by the HTTP edge (edge.Edge).
memory = MemoryTrim()


class Budget:
    """Bytes of buffers that loads and downloads may hold at once, shared by threads (the one budget of
    contract section 8: loads' read-ahead and decrypt buffers, downloads' fetch buffers, and the blocks
    handed over from one to the other).

    ``reserve(n)`` waits until ``n`` bytes are free (a request larger than the whole budget takes the whole
    budget): however many loads run, their buffers stay within ``total``; a load waits for room, it never
    fails for it. ``try_take(n)`` takes room only when it is free and nobody waits for it: what helps but is
    not needed (a second fetcher, a block held for a load) never keeps room from a load that needs it. Each
    holder keeps its reservation until its stream or download ends, which a client that stops reading
    cannot put off for longer than the client stall time."""

    def __init__(self, total):
        self._cond = threading.Condition()
        self.total = self.left = int(total)
        self.waiting = 0

    def stats(self):
        """The budget's figure for /metrics: ``{"buffer_memory_free_bytes": int}`` (the room left now)."""
        with self._cond:
            return {"buffer_memory_free_bytes": self.left}

    def resize(self, total):
        with self._cond:
            self.left += int(total) - self.total
            self.total = int(total)
            self._cond.notify_all()

    def reserve(self, n, wait=True):
        """A Reservation of ``n`` bytes (at most the whole budget), once they are free; ``wait=False`` takes
        them at once, even beyond the budget (for the rare holder that must not wait: a load mid-stream whose
        cached part failed and that must start a download)."""
        n = max(0, min(int(n), self.total))
        with self._cond:
            if wait:
                self.waiting += 1
                try:
                    self._cond.wait_for(lambda: self.left >= n)
                finally:
                    self.waiting -= 1
            self.left -= n
        return Reservation(self, n)

    def try_take(self, n):
        """A Reservation of ``n`` bytes when they are free and no holder waits for room; else None."""
        with self._cond:
            if self.waiting or self.left < n:
                return None
            self.left -= n
        return Reservation(self, n)

    def _give(self, n):
        with self._cond:
            self.left += n
            self._cond.notify_all()


class Reservation:
    """Bytes held from a Budget until ``release`` (idempotent: a stream's end and its owner's collection
    may both release it)."""

    def __init__(self, budget, n):
        self._budget = budget
        self.size = n
        self._lock = threading.Lock()

    def release(self):
        with self._lock:
            n, self.size = self.size, 0
        if n:
            self._budget._give(n)


# The buffers of every load and download at once (main.py sizes it from LOAD_MEMORY_BYTES).
buffers = Budget(128 * 1024 * 1024)
