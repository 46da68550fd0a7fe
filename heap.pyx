# cython: language_level=3, embedsignature=True
"""The process heap: how many glibc malloc arenas the loader's threads share, and handing the memory loads
and uploads freed back to the OS once the loader is idle.

Both answer what the soak found: the loader's RSS at rest climbing over a run while nothing leaked, because
glibc keeps freed chunks in its arenas. Elsewhere than glibc both are no-ops.
"""

import asyncio
import ctypes
import os

# glibc's mallopt parameter (malloc.h), and how many arenas the loader's threads share.
M_ARENA_MAX = -8
MALLOC_ARENAS = 2
# How long the loader must stay idle after a load or upload before it trims the heap.
TRIM_AFTER_IDLE = 0.5


def _libc(name):
    """glibc's function ``name``, or None where the C library has none."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def limit_malloc_arenas():
    """At most two glibc malloc arenas. By default a thread that allocates while the others' arenas are busy
    gets one of its own, up to eight per core, and each keeps the multi-MiB chunks that loads and uploads
    freed in it: the soak saw the loader's RSS at rest climb from 160 to 390 MB over 800 operations; with
    two arenas, 135 to 170 MB, and loads no slower. MALLOC_ARENA_MAX in the environment has the last word.
    Call it first, while the process has one thread."""
    mallopt = _libc("mallopt")
    if "MALLOC_ARENA_MAX" not in os.environ and mallopt is not None:
        mallopt(M_ARENA_MAX, MALLOC_ARENAS)


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


# The process's one heap, trimmed by the HTTP edge (main.Edge).
memory = MemoryTrim()
