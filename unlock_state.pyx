# cython: language_level=3, embedsignature=True
"""The unlock state machine's states and a thread-safe snapshot of its progress (contract section 4)."""

import threading
import time

IDLE = "idle"
AUTHENTICATING = "authenticating"
DOWNLOADING_KEY = "downloading_key"
DECRYPTING = "decrypting"
LOADING_IMAGES = "loading_images"
READY = "ready"
ERROR = "error"

STATES = (IDLE, AUTHENTICATING, DOWNLOADING_KEY, DECRYPTING, LOADING_IMAGES, READY, ERROR)
# States in which an unlock is running; a new unlock may start from any other.
RUNNING_STATES = frozenset((AUTHENTICATING, DOWNLOADING_KEY, DECRYPTING, LOADING_IMAGES))


class UnlockStatus:
    """Progress of the one unlock a loader runs at a time.

    Written by the unlock worker thread, read by HTTP handlers: every access holds the lock, and
    readers get a copy (``snapshot``) so they never see a half-updated status.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._state = IDLE
        self._error = None
        self._bytes_done = 0
        self._bytes_total = 0
        self._images = []
        self._started = None
        self._finished = None

    def try_begin(self):
        """Move to ``authenticating`` unless an unlock runs; returns whether this call started one."""
        with self._lock:
            if self._state in RUNNING_STATES:
                return False
            self._state = AUTHENTICATING
            self._error = None
            self._bytes_done = 0
            self._bytes_total = 0
            self._images = []
            self._started = time.monotonic()
            self._finished = None
            return True

    def set_state(self, str state):
        if state not in STATES:
            raise ValueError(f"unknown unlock state {state!r}")
        with self._lock:
            self._state = state
            if state in (READY, ERROR):
                self._finished = time.monotonic()

    def set_total(self, total):
        with self._lock:
            self._bytes_total = int(total)

    def add_done(self, n):
        with self._lock:
            self._bytes_done += int(n)

    def succeed(self, images):
        with self._lock:
            self._images = list(images)
            self._error = None
            self._state = READY
            self._finished = time.monotonic()

    def fail(self, str reason):
        with self._lock:
            self._error = reason
            self._state = ERROR
            self._finished = time.monotonic()

    @property
    def state(self):
        with self._lock:
            return self._state

    @property
    def duration(self):
        """Seconds the last (or current) unlock took, or None before the first one."""
        with self._lock:
            if self._started is None:
                return None
            end = self._finished if self._finished is not None else time.monotonic()
            return end - self._started

    def snapshot(self):
        with self._lock:
            return {
                "state": self._state,
                "error": self._error,
                "bytesDone": self._bytes_done,
                "bytesTotal": self._bytes_total,
                "images": list(self._images),
            }
