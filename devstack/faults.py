"""Call counters and injected faults for the reference Resource API.

Routes are keyed ``"METHOD /path"`` as the request arrived (``"POST /resources/get/models"``); a fault's
``route`` is matched as a shell pattern, so ``"POST /resources/get*"`` covers every folder and the root.
The ``/_devstack/`` endpoints are neither counted nor faulted: a test must always be able to clear faults.
"""

import asyncio
import fnmatch
import json
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass

ADMIN_PREFIX = "/_devstack/"

# Bodies a broken upstream or a captive portal really sends back.
GARBAGE = {
    "html": ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "truncated_json": ("application/json", b'{"token": "eyJhbGciOiJIUzI1NiIsInR5cCI6'),
    "not_jwt": ("application/json", b'{"token": "this-is-not-a-jwt"}'),
    "empty": ("application/octet-stream", b""),
    "random": ("application/octet-stream", None),
}


@dataclass
class Fault:
    route: str
    count: int | None = 1  # None: every matching call until the faults are cleared
    status: int | None = None
    delay: float = 0.0
    garbage: str | None = None

    @property
    def answers(self) -> bool:
        """False for a pure delay: the real handler still answers, only later."""
        return self.status is not None or self.garbage is not None


class Faults:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._faults: list[Fault] = []

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def reset_counters(self) -> None:
        with self._lock:
            self._counters.clear()

    def add(self, fault: Fault) -> None:
        if fault.garbage is not None and fault.garbage not in GARBAGE:
            raise ValueError(f"garbage must be one of {sorted(GARBAGE)}")
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def list(self) -> list[dict]:
        with self._lock:
            return [asdict(f) for f in self._faults]

    def arrive(self, route: str) -> Fault | None:
        """Counts the call and hands out the first fault that still applies to it."""
        with self._lock:
            self._counters[route] += 1
            for fault in self._faults:
                if fnmatch.fnmatchcase(route, fault.route):
                    if fault.count is not None:
                        fault.count -= 1
                        if fault.count <= 0:
                            self._faults.remove(fault)
                    return fault
        return None


class FaultMiddleware:
    """Plain ASGI, so a delayed call sleeps without holding a worker thread."""

    def __init__(self, app, faults: Faults):
        self.app = app
        self.faults = faults

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        fault = self.faults.arrive(f"{scope['method']} {scope['path']}")
        if fault is None:
            await self.app(scope, receive, send)
            return
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if not fault.answers:
            await self.app(scope, receive, send)
            return
        if fault.garbage is None:
            content_type, body = "application/json", json.dumps({"detail": "injected fault"}).encode()
        else:
            content_type, body = GARBAGE[fault.garbage]
            # 4095 bytes: never a whole number of AES blocks, so "random" can never decrypt by chance (one
            # 4096-byte body in about 256 unpads cleanly, and then fails later with another message).
            body = os.urandom(4095) if body is None else body
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": fault.status or 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
