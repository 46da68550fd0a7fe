# cython: language_level=3, embedsignature=True
"""The answers to the exceptions that leave a route: each a JSON ``{"detail": text}`` (contract section 4)
with the status main.py's table gives it, never the request's input echoed back (it may be a password),
and at most one log line."""

import logging

from fastapi.responses import JSONResponse

from logs import printable

log = logging.getLogger("loader")


def loader_error(status_of):
    """The answer to a LoaderError: its detail, with the status ``status_of(exc)``."""

    async def answer(request, exc):
        return JSONResponse({"detail": exc.detail}, status_code=status_of(exc))

    return answer


def unexpected_error(status):
    """The answer to an exception no handler knows: its kind is logged, its text (which may hold anything)
    is not sent."""

    async def answer(request, exc):
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, printable(request.url.path))
        return JSONResponse({"detail": "internal error"}, status_code=status)

    return answer


def invalid_request(status):
    """The answer to a request that fails validation."""

    async def answer(request, exc):
        # FastAPI's default echoes the input back; the input may be a password, so only name the fields.
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        ]
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=status)

    return answer


def client_gone(status):
    """The answer to a client that left while its body was read."""

    async def answer(request, exc):
        # The client left while its body was read (an upload it gave up on): nobody reads the answer, and it
        # is no fault of the loader's, so one line says so, not an ERROR with a traceback.
        log.info(
            "%s %s: the client went away before its request was read",
            request.method,
            printable(request.url.path),
        )
        detail = "the client went away before its request was read"
        return JSONResponse({"detail": detail}, status_code=status)

    return answer


async def http_error(request, exc):
    """The answer to Starlette's HTTPException (an unknown route, a method not allowed): its own status."""
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)
