# cython: language_level=3, embedsignature=True
"""The unlock state machine (its states are the contract's, in constants.pyx) and a thread-safe snapshot
of its progress (contract sections 4, 11).

Each running state has a deadline: an unlock that stays in one longer (a key fragment that trickles, an
Engine that stops reading) is in ``error`` as soon as anyone looks, and a new unlock may start from there.
The worker thread of the run that overran may still be blocked: it reports through its ``Run``, which
speaks only while its run is the current one, so a late word from it never lands in a newer run.
"""

import threading
import time

from constants import AUTHENTICATING, DECRYPTING, DOWNLOADING_KEY, ERROR, IDLE, LOADING_IMAGES, READY
from constants import UNLOCK_STATES as STATES

# States in which an unlock is running; a new unlock may start from any other.
RUNNING_STATES = frozenset((AUTHENTICATING, DOWNLOADING_KEY, DECRYPTING, LOADING_IMAGES))


class UnlockStatus:
    """Progress of the one unlock a loader runs at a time.

    Written by the unlock worker thread, read by HTTP handlers: every access holds the lock, and
    readers get a copy (``snapshot``) so they never see a half-updated status. ``deadlines`` maps a running
    state to the seconds an unlock may stay in it (a state not named has none).
    """

    def __init__(self, deadlines=None):
        self._lock = threading.RLock()  # a Run checks and reports in one step
        self._deadlines = dict(deadlines or {})
        self._run = 0  # counts the runs: a Run speaks only while it is the current one
        self._entered = None  # when the current state was entered
        self._state = IDLE
        self._error = None
        self._bytes_done = 0
        self._bytes_total = 0
        self._images = []
        self._started = None
        self._finished = None

    def try_begin(self):
        """Move to ``authenticating`` unless an unlock runs; the new ``Run``, or None when one runs."""
        with self._lock:
            self._expire()
            if self._state in RUNNING_STATES:
                return None
            self._run += 1
            self._state = AUTHENTICATING
            self._entered = time.monotonic()
            self._error = None
            self._bytes_done = 0
            self._bytes_total = 0
            self._images = []
            self._started = time.monotonic()
            self._finished = None
            return Run(self, self._run)

    def _expire(self):
        """Under the lock: a running state held past its deadline ends the run in ``error``."""
        limit = self._deadlines.get(self._state)
        if limit is None or self._entered is None or time.monotonic() - self._entered <= limit:
            return
        self._error = f"the unlock took longer than {limit:g} s in {self._state}"
        self._state = ERROR
        self._finished = time.monotonic()

    def set_state(self, str state):
        if state not in STATES:
            raise ValueError(f"unknown unlock state {state!r}")
        with self._lock:
            self._state = state
            self._entered = time.monotonic()
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
            self._expire()
            return self._state

    @property
    def duration(self):
        """Seconds the last (or current) unlock took, or None before the first one."""
        with self._lock:
            if self._started is None:
                return None
            end = self._finished if self._finished is not None else time.monotonic()
            return end - self._started

    def current(self, int run):
        """Whether ``run`` is the current run and still running (its word counts)."""
        with self._lock:
            self._expire()
            return run == self._run and self._state in RUNNING_STATES

    def stats(self):
        """The unlock's figures for /metrics::

            {"unlock_state": str,                # the current state, one of constants.UNLOCK_STATES
             "unlock_duration_seconds": float}   # of the last (or current) unlock; 0.0 before the first
        """
        with self._lock:
            return {"unlock_state": self.state, "unlock_duration_seconds": self.duration or 0.0}

    def snapshot(self):
        with self._lock:
            self._expire()
            return {
                "state": self._state,
                "error": self._error,
                "bytesDone": self._bytes_done,
                "bytesTotal": self._bytes_total,
                "images": list(self._images),
            }


class Run:
    """One unlock's handle on the status: its reports count only while it is the current run and still
    running (a run that overran a deadline, or a newer run, makes them no-ops)."""

    def __init__(self, status, int run):
        self._status = status
        self._run = run

    def _call(self, name, *args):
        status = self._status
        with status._lock:
            status._expire()
            if self._run == status._run and status._state in RUNNING_STATES:
                getattr(status, name)(*args)

    def set_state(self, state):
        self._call("set_state", state)

    def set_total(self, total):
        self._call("set_total", total)

    def add_done(self, n):
        self._call("add_done", n)

    def succeed(self, images):
        self._call("succeed", images)

    def fail(self, reason):
        self._call("fail", reason)
