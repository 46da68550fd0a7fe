"""Call counters and injected faults for the reference Resource API.

Routes are keyed ``"METHOD /path"`` as the request arrived (``"POST /resources/get/models"``); a fault's
``route`` is matched as a shell pattern, so ``"POST /resources/get*"`` covers every folder and the root.
The ``/_devstack/`` endpoints are neither counted nor faulted: a test must always be able to clear faults.

What a fault does to the next ``count`` matching calls (``None``: all, until cleared), in this order:

- ``delay``: wait that many seconds before anything is sent (the answer's head included);
- ``status`` and/or ``garbage``: answer instead of the real handler, ``status`` (default 200) with
  ``{"detail": "injected fault"}`` or with the body ``garbage`` names:
    - ``html``, ``truncated_json``, ``not_jwt``, ``empty``, ``random``: what a broken upstream or a captive
      portal really sends back;
    - ``deep_json``: a JSON answer nested 100,000 deep;
    - ``huge``: 300 MB of JSON-ish text, streamed a MiB at a time without a Content-Length (never held whole);
    - ``jwt_exp_inf``, ``jwt_exp_nan``: a sign-in answer whose JWT (made by hand, any signature) has an exp of
      1e999 or NaN;
- ``trickle``: send the body (the real handler's, or the fault's) at that many bytes a second, for as long as
  it takes or until the client goes away. The head goes out at once: ASGI sends a head whole (``delay``
  delays it).
"""

import asyncio
import base64
import fnmatch
import json
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass

ADMIN_PREFIX = "/_devstack/"
HUGE_SIZE = 300 * 1024 * 1024
MiB = 1024 * 1024


def _login_answer(exp: bytes) -> bytes:
    """``{"token": <JWT>}``, its claims' ``exp`` written as it is (PyJWT would not write 1e999 or NaN)."""
    claims = b'{"nameid": "1", "unique_name": "x@azaion.local", "role": "Operator", "exp": ' + exp + b"}"
    segments = (b'{"alg": "HS256", "typ": "JWT"}', claims, b"any-signature")
    return b'{"token": "' + b".".join(base64.urlsafe_b64encode(s).rstrip(b"=") for s in segments) + b'"}'


def _huge():
    """HUGE_SIZE bytes of a sign-in answer whose token never ends, a MiB at a time."""
    yield b'{"token": "'
    chunk = b"A" * MiB
    for _ in range(HUGE_SIZE // MiB):
        yield chunk
    yield b'"}'


# name: (content type, body); a body of None is random bytes, a function gives the chunks of a streamed body.
GARBAGE = {
    "html": ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "truncated_json": ("application/json", b'{"token": "eyJhbGciOiJIUzI1NiIsInR5cCI6'),
    "not_jwt": ("application/json", b'{"token": "this-is-not-a-jwt"}'),
    "empty": ("application/octet-stream", b""),
    "random": ("application/octet-stream", None),
    "deep_json": ("application/json", b"[" * 100_000 + b"]" * 100_000),
    "huge": ("application/json", _huge),
    "jwt_exp_inf": ("application/json", _login_answer(b"1e999")),
    "jwt_exp_nan": ("application/json", _login_answer(b"NaN")),
}


@dataclass
class Fault:
    route: str
    count: int | None = 1  # None: every matching call until the faults are cleared
    status: int | None = None
    delay: float = 0.0
    garbage: str | None = None
    trickle: float | None = None  # bytes a second of the body

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
        if fault.trickle is not None and not fault.trickle > 0:
            raise ValueError("trickle must be a positive number of bytes a second")
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
    """Plain ASGI, so a delayed or trickled call sleeps without holding a worker thread."""

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
        trickle = _Trickle(send, receive, fault.trickle) if fault.trickle else None
        try:
            await self._answer(fault, scope, receive, trickle or send)
        finally:
            if trickle is not None:
                trickle.close()

    async def _answer(self, fault, scope, receive, send):
        if not fault.answers:
            await self.app(scope, receive, send)
            return
        headers = []
        if fault.garbage is None:
            content_type, body = "application/json", json.dumps({"detail": "injected fault"}).encode()
        else:
            content_type, body = GARBAGE[fault.garbage]
            # 4095 bytes: never a whole number of AES blocks, so "random" can never decrypt by chance (one
            # 4096-byte body in about 256 unpads cleanly, and then fails later with another message).
            body = os.urandom(4095) if body is None else body
        if isinstance(body, bytes):
            headers.append((b"content-length", str(len(body)).encode()))
            chunks = [body]
        else:
            chunks = body()  # streamed: no length, chunked transfer
        headers.append((b"content-type", content_type.encode()))
        await send({"type": "http.response.start", "status": fault.status or 200, "headers": headers})
        for chunk in chunks:
            await send(_body(chunk, more=True))
        await send(_body(b"", more=False))


def _body(data: bytes, *, more: bool) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


class _Trickle:
    """An ASGI ``send`` that passes the head on at once and the body at ``rate`` bytes a second (a tenth of a
    second's worth at a time) until the client goes away, which a task reading ``receive`` notices."""

    def __init__(self, send, receive, rate: float):
        self._send = send
        self._receive = receive
        self._rate = rate
        self._piece = max(1, int(rate / 10))
        self._gone = asyncio.Event()
        self._watch = None

    async def _until_gone(self):
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._gone.set()

    async def __call__(self, message):
        if self._gone.is_set():
            return  # nobody reads any more
        if message["type"] == "http.response.start":
            self._watch = asyncio.ensure_future(self._until_gone())
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        body, more = message.get("body", b""), message.get("more_body", False)
        for i in range(0, len(body), self._piece):
            if self._gone.is_set():
                return
            await self._send(_body(body[i : i + self._piece], more=True))
            await asyncio.sleep(self._piece / self._rate)
        await self._send(_body(b"", more=more))

    def close(self):
        if self._watch is not None:
            self._watch.cancel()
