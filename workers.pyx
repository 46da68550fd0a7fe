# cython: language_level=3, embedsignature=True
"""Worker threads for the blocking work of the routes, in pools of their own, and what /health and
/status say of them (contract section 11).

A route's blocking work (a load up to its first byte, a login, an unlock's start) runs on a thread of the
pool for its kind, never of a pool shared with the others: a Resource API or a CDN that holds every load
can then not take the threads a login or another kind of work needs. Loads of one resource take at most
``per_key`` threads of their pool; the others wait for one on the event loop, holding no thread, so one
stuck model leaves the threads to the loads of the others.

Every operation is recorded with its start while it runs (/status lists them with their age), and a pool
whose every thread is held past the pool's deadline cannot serve: ``Pools.unhealthy`` says why, and /health
answers 503 with it, so the image's HEALTHCHECK and a restart policy recover the loader.

Threads: the pools' worker threads (anyio's) run the calls; everything else here runs on the event loop,
so the books (``_running``, ``_waiting``) need no lock but the GIL: a worker thread never touches them.
"""

import asyncio
import itertools
import time

from anyio import CapacityLimiter
from anyio.to_thread import run_sync

_ids = itertools.count(1)


class Operation:
    """One call in progress: its ``kind`` (the pool's name), ``what`` it works on, when it started, and
    since when it holds a thread of its pool (None while it waits for one)."""

    __slots__ = ("id", "kind", "what", "started", "holding")

    def __init__(self, kind, what):
        self.id = next(_ids)
        self.kind = kind
        self.what = what
        self.started = time.monotonic()
        self.holding = None

    def age(self, now=None):
        return (time.monotonic() if now is None else now) - self.started

    def to_dict(self, now=None):
        return {"kind": self.kind, "what": self.what, "ageSeconds": round(self.age(now), 1)}


class Pool:
    """``size`` worker threads for one kind of work, each call expected to end within ``deadline``
    seconds; at most ``per_key`` of them for calls of one key (None: no such limit)."""

    def __init__(self, name, int size, deadline, per_key=None):
        if size < 1:
            raise ValueError("a pool needs at least one thread")
        self.name = name
        self.size = size
        self.deadline = float(deadline)
        self.per_key = per_key
        self._threads = asyncio.Semaphore(size)  # the pool's threads: a call holds one while it runs
        self._limiter = None  # anyio's, for run_sync (never waited on: the semaphore is taken first)
        self._running = {}  # Operation.id -> Operation, holding a thread or waiting for one
        self._keys = {}  # key -> [asyncio.Semaphore, calls of that key running or waiting]

    async def run(self, fn, *args, what, key=None):
        """``fn(*args)`` on a thread of this pool; its result, or its exception raised here."""
        op = Operation(self.name, what)
        self._running[op.id] = op
        try:
            if key is None or self.per_key is None:
                return await self._call(op, fn, args)
            gate = self._keys.setdefault(key, [asyncio.Semaphore(self.per_key), 0])
            gate[1] += 1
            try:
                async with gate[0]:
                    return await self._call(op, fn, args)
            finally:
                gate[1] -= 1
                if not gate[1]:
                    del self._keys[key]
        finally:
            del self._running[op.id]

    async def _call(self, op, fn, args):
        async with self._threads:
            if self._limiter is None:
                self._limiter = CapacityLimiter(self.size)  # anyio makes it on the event loop
            op.holding = time.monotonic()
            try:
                return await run_sync(fn, *args, limiter=self._limiter)
            finally:
                op.holding = None

    @property
    def busy(self):
        """Threads of this pool in use now."""
        return sum(op.holding is not None for op in self._running.values())

    def operations(self):
        return list(self._running.values())

    def unhealthy(self):
        """Why this pool cannot serve (every thread held past the deadline), or None."""
        now = time.monotonic()
        held = [now - op.holding for op in self._running.values() if op.holding is not None]
        if len(held) < self.size or min(held) <= self.deadline:
            return None
        return (f"all {self.size} {self.name} workers are held past their deadline of {self.deadline:g} s "
                f"(the oldest for {max(held):.0f} s)")


class Pools:
    """The process's pools, by name, and the operations that do not need one (streams to clients)."""

    def __init__(self, *pools):
        self._pools = {p.name: p for p in pools}
        self._other = {}  # Operation.id -> Operation

    def __getattr__(self, name):
        try:
            return self.__dict__["_pools"][name]
        except KeyError:
            raise AttributeError(name) from None

    def begin(self, kind, what):
        """Record an operation that runs without a pool's thread (a stream); ``end`` it when it ends."""
        op = Operation(kind, what)
        self._other[op.id] = op
        return op

    def end(self, op):
        self._other.pop(op.id, None)

    def operations(self):
        """Every operation in progress, the oldest first, as /status shows them."""
        now = time.monotonic()
        ops = list(self._other.values())
        for pool in self._pools.values():
            ops.extend(pool.operations())
        return [op.to_dict(now) for op in sorted(ops, key=lambda op: op.started)]

    def stats(self):
        """The operations in progress for /metrics, counted by kind (a pool's name, or ``stream``); a kind
        with none in progress is left out::

            {"operations_in_progress": {kind: int}}
        """
        counts = {}
        for op in self.operations():
            counts[op["kind"]] = counts.get(op["kind"], 0) + 1
        return {"operations_in_progress": counts}

    def unhealthy(self):
        """Why the loader cannot serve, or None."""
        reasons = [r for r in (p.unhealthy() for p in self._pools.values()) if r]
        return "; ".join(reasons) or None
