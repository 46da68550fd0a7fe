"""A reverse proxy for tests that forwards HTTP/1.1 faithfully and breaks it on request.

Put it between the loader and SeaweedFS or the Resource API by giving the client ``proxy.url`` as its
endpoint. Requests go upstream byte for byte (method, target, headers in their order and case, the Host
the client signed for SigV4, Range and If-Match), bodies stream both ways in 64 KiB pieces, so a 1 GiB
transfer passes in constant memory. Each connection carries one exchange (``Connection: close``).

Faults apply to the next ``n`` requests that match a method and a shell pattern over the path
(``n=None``: every matching request until ``clear_faults``):

    proxy.cut_next(after_bytes=1 << 20)   # the CDN drops the line 1 MiB into the body
    proxy.truncate_next()                 # full Content-Length announced, half the body sent
    proxy.fail_next(503, n=2)             # answered by the proxy, never reaching upstream
    proxy.delay_next(5.0)                 # upstream answers, 5 s late
    proxy.stall_next(1 << 20, 30.0)       # the body stops for 30 s after 1 MiB (read timeouts)
    proxy.trickle_next(1024, 1 << 20)     # after 1 MiB the body comes at 1 KiB/s (no read timeout fires)
    proxy.header_next("Content-Length", str(10**20), method="HEAD")  # the answer lies in a header
    proxy.drop_next()                     # connection closed before any answer
    proxy.hold_at(64 << 20, 60.0, path="/models/m.big")  # every GET pauses at byte 64 MiB of the object

What went through: ``counts()`` and ``seen()`` (the requests), ``sent(method, path)`` (the bytes of the
response bodies relayed to the clients).

Standard library only: the proxy must not share a failure mode with the clients it is testing.
"""

import contextlib
import fnmatch
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

PIECE = 64 * 1024
MAX_HEAD = 64 * 1024
REASONS = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
S3_CODES = {500: "InternalError", 503: "ServiceUnavailable", 403: "AccessDenied", 404: "NoSuchKey"}


class _Closed(Exception):
    """A peer went away mid-exchange; the handler just ends."""


@dataclass
class Fault:
    kind: str  # status | cut | truncate | delay | stall | trickle | header | drop
    method: str | None
    path: str
    remaining: int | None
    status: int = 503
    after_bytes: int = 0
    seconds: float = 0.0
    reset: bool = False
    body: bytes | None = None
    starts: range | None = None  # only ranged requests whose first byte is in this range
    rate: int = 0  # trickle: bytes a second
    header: tuple[str, str] | None = None  # header: (name, value)
    at: int | None = None  # stall: at this offset of the object (a ranged body starts at its range's first)

    def matches(self, method: str, path: str, headers: dict[str, str]) -> bool:
        return (
            (self.method is None or self.method == method)
            and fnmatch.fnmatchcase(path, self.path)
            and (self.starts is None or _range_start(headers) in self.starts)
        )


def headers_of(head: list[bytes]) -> dict[str, str]:
    """The header lines of a message as a dict: names lower-cased, values as sent."""
    headers = {}
    for line in head[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers


def _range_start(headers: dict[str, str]) -> int | None:
    first = headers.get("range", "").removeprefix("bytes=").partition("-")[0]
    return int(first) if first.isdigit() else None


@dataclass(frozen=True)
class Seen:
    """One request as it arrived: header names lower-cased, values as sent."""

    method: str
    path: str
    query: str
    headers: dict[str, str]


# --- HTTP/1.1 framing ----------------------------------------------------------------------------


def _read_head(rfile: BinaryIO) -> list[bytes] | None:
    """The start line and header lines, without line ends; None when the peer closed first."""
    lines, size = [], 0
    while True:
        line = rfile.readline(MAX_HEAD)
        if not line:
            if lines:
                raise _Closed("head cut short")
            return None
        size += len(line)
        if size > MAX_HEAD:
            raise _Closed("head too large")
        line = line.rstrip(b"\r\n")
        if not line:
            if lines:
                return lines
            continue  # stray CRLF between messages
        lines.append(line)


def _header(lines: list[bytes], name: bytes) -> str | None:
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return None


def _without(lines: list[bytes], *names: bytes) -> list[bytes]:
    return [lines[0]] + [ln for ln in lines[1:] if ln.partition(b":")[0].strip().lower() not in names]


def _encode_head(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def _fixed(rfile: BinaryIO, length: int) -> Iterator[bytes]:
    while length > 0:
        piece = rfile.read1(min(PIECE, length))
        if not piece:
            raise _Closed("body cut short")
        length -= len(piece)
        yield piece


def _until_eof(rfile: BinaryIO) -> Iterator[bytes]:
    while piece := rfile.read1(PIECE):
        yield piece


def _chunked(rfile: BinaryIO) -> Iterator[bytes]:
    """The raw chunked encoding, framing included, up to and including the trailer's blank line."""
    while True:
        size_line = rfile.readline(MAX_HEAD)
        if not size_line:
            raise _Closed("chunked body cut short")
        yield size_line
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:
                trailer = rfile.readline(MAX_HEAD)
                if not trailer:
                    raise _Closed("chunked trailer cut short")
                yield trailer
                if trailer in (b"\r\n", b"\n"):
                    return
        yield from _fixed(rfile, size + 2)  # the data and its CRLF


def _body(rfile: BinaryIO, head: list[bytes], *, request: bool, no_body: bool = False) -> Iterator[bytes]:
    if no_body:
        return iter(())
    if "chunked" in (_header(head, b"transfer-encoding") or "").lower():
        return _chunked(rfile)
    length = _header(head, b"content-length")
    if length is not None:
        return _fixed(rfile, int(length))
    # A request without framing has no body; a response without framing runs to the end of the stream.
    return iter(()) if request else _until_eof(rfile)


# --- the proxy -----------------------------------------------------------------------------------


class FaultProxy:
    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 120.0):
        """``upstream``: ``http://host:port`` of the real server."""
        self.set_upstream(upstream)
        self.host = host
        self.port = port
        self.timeout = timeout
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._seen: list[Seen] = []
        self._sent: Counter[tuple[str, str]] = Counter()
        self._stalls = 0
        self._trickles = 0
        self._server: socketserver.ThreadingTCPServer | None = None
        self._live: set[socket.socket] = set()

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_upstream(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)

    def start(self) -> "FaultProxy":
        """Starts listening; after a ``stop`` it comes back on the same port."""
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, name=f"faultproxy-{self.port}", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        """Stops listening and cuts every exchange in flight (clients then see connection refused)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            live, self._live = list(self._live), set()
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what went through ----------------------------------------------------------------------

    def counts(self) -> dict[tuple[str, str], int]:
        """Requests per ``(method, path)``, the path without its query string."""
        with self._lock:
            return dict(self._counts)

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return self._counts[(method, path)]

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def sent(self, method: str, path: str) -> int:
        """Bytes of response bodies relayed to clients for ``(method, path)``, cut and stalled bodies
        counted as far as they went: what the upstream (the CDN) sent them."""
        with self._lock:
            return self._sent[(method, path)]

    def _count_sent(self, method: str, path: str, n: int) -> None:
        with self._lock:
            self._sent[(method, path)] += n

    def stalls(self) -> int:
        """How many exchanges have reached their stall (a test waits for this, not for a while)."""
        with self._lock:
            return self._stalls

    def trickles(self) -> int:
        """How many exchanges have begun to trickle."""
        with self._lock:
            return self._trickles

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._seen.clear()
            self._sent.clear()
            self._stalls = 0
            self._trickles = 0

    # --- faults ---------------------------------------------------------------------------------

    def _add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def fail_next(
        self,
        status: int = 503,
        n: int | None = 1,
        *,
        method: str | None = None,
        path: str = "*",
        body: bytes | None = None,
    ) -> None:
        """Answer ``status`` from the proxy itself; the default body is an S3-style XML error."""
        self._add(Fault("status", method, path, n, status=status, body=body))

    def cut_next(
        self,
        after_bytes: int,
        n: int | None = 1,
        *,
        method: str | None = None,
        path: str = "*",
        reset: bool = False,
        starts: range | None = None,
    ) -> None:
        """Forward the response head and ``after_bytes`` of its body, then close (``reset``: with a RST)."""
        self._add(Fault("cut", method, path, n, after_bytes=after_bytes, reset=reset, starts=starts))

    def truncate_next(
        self, n: int | None = 1, *, method: str | None = None, path: str = "*", starts: range | None = None
    ) -> None:
        """Forward the real Content-Length but only half the body, then close cleanly."""
        self._add(Fault("truncate", method, path, n, starts=starts))

    def delay_next(
        self, seconds: float, n: int | None = 1, *, method: str | None = None, path: str = "*"
    ) -> None:
        self._add(Fault("delay", method, path, n, seconds=seconds))

    def stall_next(
        self,
        after_bytes: int,
        seconds: float,
        n: int | None = 1,
        *,
        method: str | None = None,
        path: str = "*",
        starts: range | None = None,
    ) -> None:
        """Forward ``after_bytes`` of the response body, pause ``seconds``, then forward the rest."""
        self._add(Fault("stall", method, path, n, after_bytes=after_bytes, seconds=seconds, starts=starts))

    def trickle_next(
        self,
        bytes_per_s: int,
        after_bytes: int = 0,
        n: int | None = 1,
        *,
        method: str | None = None,
        path: str = "*",
        starts: range | None = None,
    ) -> None:
        """Forward ``after_bytes`` of the response body at once, then the rest at ``bytes_per_s`` (a
        twentieth of a second's worth at a time), for as long as the client keeps reading: every read
        gets a byte well within any read timeout, yet the body takes as long as its rate says."""
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        self._add(Fault("trickle", method, path, n, after_bytes=after_bytes, rate=bytes_per_s, starts=starts))

    def hold_at(
        self,
        offset: int,
        seconds: float,
        *,
        method: str | None = "GET",
        path: str = "*",
        until: int | None = None,
    ) -> None:
        """Every matching response (until ``clear_faults``) pauses ``seconds`` once its body reaches byte
        ``offset`` of the object: a ranged answer that starts at or past it pauses before its first byte,
        one that starts before it after ``offset - start`` bytes. ``until``: requests whose range starts
        there or later are left alone (say, the object's tail, fetched first). A download on any number of
        threads, in segments of any size, is so held with exactly the bytes before ``offset`` relayed."""
        starts = None if until is None else range(until)
        self._add(Fault("stall", method, path, None, seconds=seconds, starts=starts, at=offset))

    def header_next(
        self,
        name: str,
        value: str,
        n: int | None = 1,
        *,
        method: str | None = None,
        path: str = "*",
        starts: range | None = None,
    ) -> None:
        """Send the upstream's answer with the header ``name`` (any case) set to ``value``: it replaces the
        upstream's (every one of that name), or is added. The body still goes as the upstream framed it,
        so a lying Content-Length of a body leaves the client short of bytes, or with bytes to spare."""
        if any(c in f"{name}{value}" for c in "\r\n") or not name or ":" in name:
            raise ValueError("a header name and value are one line, and a name has no colon")
        self._add(Fault("header", method, path, n, header=(name, value), starts=starts))

    def drop_next(self, n: int | None = 1, *, method: str | None = None, path: str = "*") -> None:
        """Close the connection without any answer."""
        self._add(Fault("drop", method, path, n))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _arrive(self, method: str, path: str, query: str, head: list[bytes]) -> Fault | None:
        headers = headers_of(head)
        with self._lock:
            self._counts[(method, path)] += 1
            self._seen.append(Seen(method, path, query, headers))
            for fault in self._faults:
                if fault.matches(method, path, headers):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    # --- one exchange ---------------------------------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        opened = [client]
        with self._lock:
            self._live.add(client)
        try:
            client.settimeout(self.timeout)
            self._exchange(client, opened)
        except (_Closed, OSError, ValueError):
            pass  # one side went away or spoke garbage: the exchange is over either way
        finally:
            with self._lock:
                self._live.difference_update(opened)
            for sock in reversed(opened):
                with contextlib.suppress(OSError):
                    sock.close()

    def _exchange(self, client: socket.socket, opened: list[socket.socket]) -> None:
        # makefile() objects keep the descriptor open after sock.close(); closing them with the exchange
        # makes a cut reach the client at once.
        with client.makefile("rb", buffering=PIECE) as crfile:
            head = _read_head(crfile)
            if head is None:
                return
            method, target, _ = head[0].decode("latin-1").split(" ", 2)
            path, _, query = target.partition("?")
            fault = self._arrive(method, path, query, head)
            kind = fault.kind if fault else None
            if kind == "drop":
                return
            if kind == "delay":
                time.sleep(fault.seconds)
            expects_continue = (_header(head, b"expect") or "").lower() == "100-continue"
            if kind == "status":
                if not expects_continue:  # a client that asked first sends no body after a refusal
                    for _ in _body(crfile, head, request=True):
                        pass
                client.sendall(self._status_response(fault, method))
                client.shutdown(socket.SHUT_WR)
                return
            upstream = socket.create_connection(self.upstream, timeout=self.timeout)
            opened.append(upstream)
            with self._lock:
                self._live.add(upstream)
            # The proxy answers 100 Continue itself: Expect and Connection are outside SigV4's signed
            # headers, so dropping one and setting the other leaves the signature valid.
            if expects_continue:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            upstream.sendall(_encode_head(_without(head, b"expect", b"connection") + [b"Connection: close"]))
            for piece in _body(crfile, head, request=True):
                upstream.sendall(piece)
            with upstream.makefile("rb", buffering=PIECE) as urfile:
                self._relay_response(method, path, _range_start(headers_of(head)) or 0, urfile, client, fault)

    def _relay_response(
        self, method: str, path: str, start: int, urfile: BinaryIO, client: socket.socket, fault: Fault | None
    ) -> None:
        while True:
            head = _read_head(urfile)
            if head is None:
                raise _Closed("upstream closed before answering")
            status = int(head[0].split()[1])
            if not 100 <= status < 200:
                break  # interim answers were already given to the client by the proxy
        no_body = method == "HEAD" or status in (204, 304)
        body = _body(urfile, head, request=False, no_body=no_body)
        limit = None
        if fault is not None and fault.kind == "cut":
            limit = fault.after_bytes
        elif fault is not None and fault.kind == "truncate":
            limit = int(_header(head, b"content-length") or 0) // 2
        head = _without(head, b"connection") + [b"Connection: close"]
        if fault is not None and fault.kind == "header":
            name, value = fault.header
            head = _without(head, name.lower().encode("latin-1"))
            head.append(f"{name}: {value}".encode("latin-1"))
        client.sendall(_encode_head(head))
        client = _Counting(client, lambda n: self._count_sent(method, path, n))
        stall_at, past = None, 0
        if fault is not None and fault.kind == "stall":
            # hold_at: a body that ends at the offset is relayed whole, never held after its last byte.
            stall_at = fault.after_bytes if fault.at is None else max(0, fault.at - start)
            past = 0 if fault.at is None else 1
        trickle = (
            _Trickle(self, fault.after_bytes, fault.rate)
            if fault is not None and fault.kind == "trickle"
            else None
        )
        sent = 0
        for piece in body:
            if limit is not None and sent + len(piece) >= limit:
                client.sendall(piece[: limit - sent])
                self._abort(client, fault.reset)
                return
            if stall_at is not None and sent + len(piece) >= stall_at + past:
                client.sendall(piece[: stall_at - sent])
                with self._lock:
                    self._stalls += 1
                time.sleep(fault.seconds)
                piece, sent, stall_at = piece[stall_at - sent :], stall_at, None
            if trickle is not None:
                trickle.send(client, piece, sent)
            else:
                client.sendall(piece)
            sent += len(piece)

    def _trickling(self) -> None:
        with self._lock:
            self._trickles += 1

    @staticmethod
    def _abort(client: "socket.socket | _Counting", reset: bool) -> None:
        client = getattr(client, "sock", client)
        if reset:
            # SO_LINGER 0: close() sends RST, as a crashed middlebox would.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            client.shutdown(socket.SHUT_WR)

    @staticmethod
    def _status_response(fault: Fault, method: str) -> bytes:
        code = S3_CODES.get(fault.status, "InjectedFault")
        body = (
            fault.body
            if fault.body is not None
            else (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>injected by faultproxy</Message></Error>"
            ).encode()
        )
        head = [
            f"HTTP/1.1 {fault.status} {REASONS.get(fault.status, 'Injected')}".encode(),
            b"Content-Type: application/xml",
            f"Content-Length: {len(body)}".encode(),
            b"Connection: close",
        ]
        return _encode_head(head) + (b"" if method == "HEAD" else body)


class _Counting:
    """A client socket whose ``sendall`` counts the bytes it sends (the body's, for ``FaultProxy.sent``)."""

    def __init__(self, sock: socket.socket, count):
        self.sock = sock
        self._count = count

    def sendall(self, data) -> None:
        self.sock.sendall(data)
        self._count(len(data))

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)


class _Trickle:
    """A body's bytes past ``after`` sent at ``rate`` bytes a second, a twentieth of a second's worth at a
    time, on the clock of the first byte trickled (so the rate holds across the pieces read upstream)."""

    def __init__(self, proxy: FaultProxy, after: int, rate: int):
        self.proxy = proxy
        self.after = after
        self.rate = rate
        self.step = max(1, rate // 20)
        self.started: float | None = None
        self.trickled = 0

    def send(self, client: socket.socket, piece: bytes, sent: int) -> None:
        """Send ``piece``, which starts ``sent`` bytes into the body."""
        fast = max(0, min(len(piece), self.after - sent))
        if fast:
            client.sendall(piece[:fast])
        view = memoryview(piece)[fast:]
        if not view:
            return
        if self.started is None:
            self.started = time.monotonic()
            self.proxy._trickling()
        for i in range(0, len(view), self.step):
            part = view[i : i + self.step]
            client.sendall(part)
            self.trickled += len(part)
            time.sleep(max(0.0, self.started + self.trickled / self.rate - time.monotonic()))
