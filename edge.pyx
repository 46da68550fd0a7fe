# cython: language_level=3, embedsignature=True
"""The HTTP edge of every request (pure ASGI middleware, ``Edge``): it refuses bodies over the JSON limit
without reading them, lets go of a /load client that reads nothing for the client stall time, writes one
log line per request, records the request metrics, tells the heap when requests begin and end (so it is
trimmed once the loader is idle), and turns an answer cut off after it began into a dropped connection
with one warning.

A failure after an answer began can no longer change its status: ``CutOff`` is how the rest of the loader
says so, and the edge ends the answer short of its Content-Length.
"""

import asyncio
import logging
import time
from contextvars import ContextVar

from fastapi.responses import JSONResponse

from logs import printable

log = logging.getLogger("loader")


class CutOff(Exception):  # noqa: N818 - what happens to the answer, not an error kind of the loader
    """A load failed after its answer began. The status line is gone; the only way left to tell the client
    is to drop the connection short of the announced Content-Length (see ``Edge``)."""


class ClientStalled(CutOff):
    """The client read nothing of a load's answer for the client stall time: it is let go."""


# Set in the server's task of a request whose answer the loader cut off (see ``Edge``).
_cut_off = ContextVar("cut_off", default=False)
UNFINISHED = "ASGI callable returned without completing response."  # uvicorn's words, at ERROR


def _not_a_cut_off(record):
    """uvicorn's filter: its ERROR for an answer left unfinished is dropped when the loader cut it off on
    purpose (its own warning said why); for any other request it stays."""
    return not (_cut_off.get() and record.msg == UNFINISHED)


class Edge:
    """Pure ASGI middleware (BaseHTTPMiddleware would re-buffer every streamed chunk): refuses bodies over
    the JSON limit without reading them, writes one log line per request, records request metrics, and
    tells ``memory`` (heap.MemoryTrim) when requests begin and end, so the heap is trimmed once idle.

    ``settings()`` gives the limits (MAX_JSON_BYTES, CLIENT_STALL_TIMEOUT), read at each request;
    ``metrics()`` the process's metrics, whose ``observe`` records each request."""

    def __init__(self, app, memory, settings, metrics):
        self.app = app
        self.memory = memory
        self.settings = settings
        self.metrics = metrics
        # One filter however many apps are built: logging adds the same filter only once.
        logging.getLogger("uvicorn.error").addFilter(_not_a_cut_off)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        limit = None if scope["path"].startswith("/upload/") else self.settings().max_json_bytes
        # A client that reads nothing of a load's answer for this long is let go (contract section 11).
        stall = self.settings().client_stall_timeout if scope["path"].startswith("/load/") else 0
        self.memory.begin()

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]  # no-cython-lint (a nonlocal: read below)
            elif stall > 0:  # the server's send waits while the client's socket is full
                try:
                    async with asyncio.timeout(stall):
                        return await send(message)
                except TimeoutError:
                    raise ClientStalled(f"the client read nothing for {stall:g} s") from None
            await send(message)

        try:
            body = receive if limit is None else await _bounded_body(scope, receive, limit)
            if body is None:
                too_large = JSONResponse(
                    {"detail": f"request body larger than {limit} bytes"}, status_code=413
                )
                return await too_large(scope, receive, counted_send)
            await self.app(scope, body, counted_send)
        except CutOff as exc:
            # Returning without the end of the body makes the server drop the connection: the client
            # sees a broken transfer. ASGI has no quieter way to abort an answer (raising, or ending it
            # short, is an ERROR too), so uvicorn's ERROR for it is filtered: one warning says why.
            _cut_off.set(True)  # in the server's task, which logs once this returns
            if isinstance(exc, ClientStalled):
                _abort(receive)
            log.warning(
                "%s %s cut off after its answer began: %s", scope["method"], printable(scope["path"]), exc
            )
        finally:
            self.memory.end(heavy=scope["path"].startswith(("/load/", "/upload/")))
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics().observe(scope["method"], route, status, elapsed)
            log.info("%s %s %d %.1fms", scope["method"], printable(scope["path"]), status, elapsed * 1000)


def _abort(receive):
    """Drop the connection at once, with what is still queued for the client: closing it would wait for a
    client that reads nothing. uvicorn's ``receive`` is a method of the request's cycle, which holds the
    connection's transport; another server's is left to close the connection itself."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is not None:
        transport.abort()


async def _bounded_body(scope, receive, limit):
    """Read a small body whole (at most ``limit`` bytes, announced or chunked) and replay it; None when it
    is larger, so that it is refused before more than ``limit`` bytes are held."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return None
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            parts = None
            replay = message
            break
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            return None
        more = message.get("more_body", False)
    else:
        replay = {"type": "http.request", "body": b"".join(parts), "more_body": False}
    sent = False

    async def replay_receive():
        nonlocal sent
        if not sent:
            sent = True
            return replay
        return await receive()

    return replay_receive
