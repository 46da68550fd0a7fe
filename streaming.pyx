# cython: language_level=3, embedsignature=True
"""A load's answer: its plaintext streamed to the client as a worker thread reads and decrypts it, a few
chunks ahead, with the announced Content-Length; a failure after the answer began cuts it off
(``edge.CutOff``), and however the sending ends the load's files and buffers are let go at once."""

from fastapi.responses import StreamingResponse

import errors
import read_ahead
from edge import CutOff

# Decrypted chunks of a load waiting to be sent, at most.
LOAD_AHEAD = 2


async def stream_loaded(svc, plaintext, what):
    """Send a load's chunks as a worker thread reads and decrypts them, at most LOAD_AHEAD ahead, so
    reading and decrypting the next chunks overlaps with sending this one. A failure after the answer
    began can only cut it off. ``svc`` (main.Services) counts the bytes and shows the stream in /status."""
    chunks = read_ahead.ReadAhead(plaintext, LOAD_AHEAD, "load-stream")
    op = svc.workers.begin("stream", what[:300])
    try:
        async for chunk in chunks:
            svc.bytes_loaded += len(chunk)
            yield chunk
    except errors.LoaderError as exc:
        raise CutOff(exc.detail) from exc
    finally:
        svc.workers.end(op)
        chunks.stop()  # the client is gone, or all was sent: the worker closes the load's files


class LoadResponse(StreamingResponse):
    """A load's answer: the chunks of ``stream_loaded``, ``size`` bytes in all. However its sending ends
    (sent, cut off, the client gone or stalled), the stream is closed at once, so its worker stops and its
    buffers go back to the budget, not whenever the collector finds it."""

    def __init__(self, chunks, size):
        super().__init__(chunks, media_type="application/octet-stream", headers={"Content-Length": str(size)})

    async def stream_response(self, send):
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()
