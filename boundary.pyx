# cython: language_level=3, embedsignature=True
"""Who may reach the loader (contract section 10): the device's own apps, and nobody else.

A web page the device's browser shows can make that browser send requests to the loader: to a name of
the page's own that its DNS turns into 127.0.0.1 (DNS rebinding: the page may then read the answers), or
straight to 127.0.0.1 (a cross-site post). Both are told apart by their headers, as tailscaled's LocalAPI
tells them: a rebound name is in ``Host``, and a browser puts ``Origin`` on every request a page makes
that could change something. ``HostGuard`` refuses both before any other work.

``unix_socket`` and ``serve_unix`` serve the loader on a Unix socket instead of TCP: its permissions (0660,
the process's group) say who may call. ``health_check`` is the container's HEALTHCHECK, in either mode.

Only the standard library (and ``logs``, which imports nothing else) is imported here: the health check
runs every 30 s on small boards.
"""

import contextlib
import json
import logging
import os
import socket
import stat

from logs import printable

log = logging.getLogger("loader.boundary")

# The names a client on this machine calls the loader by, whatever the configuration.
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
# Addresses to listen on, not names to call: LOADER_HOST=0.0.0.0 adds no name (a page may call 0.0.0.0).
WILDCARDS = ("", "0.0.0.0", "[::]")
SHOWN = 60  # characters of a refused header value shown in a detail or a log line, at most
SOCKET_MODE = 0o660
BACKLOG = 2048  # uvicorn's


def shown(value) -> str:
    """A header value (bytes or text) fit for a detail or a log line: printable, quoted, cut short."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = printable(value)
    return repr(text[:SHOWN] + ("..." if len(text) > SHOWN else ""))


def host_name(value: str):
    """The name in a ``Host`` header's value, port aside: lower-case, an IPv6 address in brackets; None
    when the value is no host (empty, a bare IPv6 address, a port that is not digits, a space in it)."""
    value = value.lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
    else:
        name, _, port = value.partition(":")
        rest = ":" + port if _ else ""
    port_ok = not rest or (rest[0] == ":" and all(c in "0123456789" for c in rest[1:]))
    if not name or name == "[]" or not port_ok:
        return None
    if any(c.isspace() or not c.isprintable() for c in name):
        return None
    return name


def allowed_names(*sources) -> frozenset:
    """The names the loader answers to: the loopback names and each name in ``sources`` (strings of names
    separated by spaces or commas, as LOADER_HOST and ALLOWED_HOSTS hold them; a port, or an IPv6 address
    without brackets, is taken as the name it means). Wildcard addresses add nothing."""
    names = set(LOOPBACK)
    for source in sources:
        for entry in (source or "").replace(",", " ").split():
            if entry.count(":") > 1 and not entry.startswith("["):
                entry = f"[{entry}]"  # an IPv6 address, as a Host header carries it
            name = host_name(entry)
            if name is not None and name not in WILDCARDS:
                names.add(name)
    return frozenset(names)


class HostGuard:
    """Pure ASGI middleware, the outermost: a request (http or websocket) whose ``Host`` is not one of the
    allowed names is answered 421, one that carries ``Origin`` 403, both JSON ``{"detail": ...}``, before
    the app sees it and before its body is read; the connection is then closed. Other scopes (lifespan)
    pass through.

    ``allowed_hosts``: strings of names (see ``allowed_names``), or a function that returns them, called
    on each request (so that the app may be made before its settings are read)."""

    def __init__(self, app, allowed_hosts=()):
        self.app = app
        self._source = allowed_hosts
        self._key = None
        self._names = frozenset(LOOPBACK)

    def names(self) -> frozenset:
        source = self._source() if callable(self._source) else self._source
        key = (source,) if isinstance(source, str) else tuple(source)
        if key != self._key:
            self._names, self._key = allowed_names(*key), key
        return self._names

    def refusal(self, headers):
        """(status, detail, what to log) for a request with these ASGI headers, or None to let it in."""
        hosts = [value for name, value in headers if name == b"host"]
        if len(hosts) != 1:
            what = "no Host header" if not hosts else f"{len(hosts)} Host headers"
            return 421, f"{what}: call the loader as http://localhost (contract section 10)", what
        host = hosts[0].decode("latin-1")
        if host_name(host) not in self.names():
            return (
                421,
                f"the loader does not answer to the host {shown(host)}: call it as localhost or 127.0.0.1,"
                " or, for an app in another container that calls it by its name, add that name to"
                " ALLOWED_HOSTS (contract section 10)",
                f"Host {shown(host)}",
            )
        for name, value in headers:
            if name == b"origin":
                return (
                    403,
                    "a request with an Origin header (one a web page makes) is refused: the loader serves"
                    " the device's own apps; call it from one, without an Origin header"
                    " (contract section 10)",
                    f"Origin {shown(value)}",
                )
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refused = self.refusal(scope["headers"])
        if refused is None:
            return await self.app(scope, receive, send)
        status, detail, what = refused
        method = scope.get("method", "WEBSOCKET")
        log.info("refused %s %s with %d: %s", method, shown(scope["path"]), status, what)
        await _answer(scope, send, status, detail)


async def _answer(scope, send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # the body, if any, is never read: the server closes the connection
    ]
    if scope["type"] == "http":
        prefix = "http."
    elif "websocket.http.response" in (scope.get("extensions") or {}):
        prefix = "websocket.http."  # the denial response: a real status and body
    else:
        await send({"type": "websocket.close", "code": 1008})  # before accept: the server answers 403
        return
    await send({"type": prefix + "response.start", "status": status, "headers": headers})
    await send({"type": prefix + "response.body", "body": body})


# --- the Unix socket ---------------------------------------------------------------------------------


def _clear_stale(path: str) -> None:
    """Make room at ``path`` for a new socket: nothing there, or a socket nobody serves on (left by a
    loader that was killed), which is removed. Anything else ends the process with the reason."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(
            f"invalid configuration: LOADER_SOCKET {path!r} exists and is not a socket: remove it or name"
            " another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        log.info("removed the stale socket %s (nothing served on it)", path)
        return
    except OSError as exc:
        raise SystemExit(f"LOADER_SOCKET {path!r}: cannot tell whether it is in use: {exc}") from None
    finally:
        probe.close()
    raise SystemExit(
        f"LOADER_SOCKET {path!r}: another process (a loader already running?) serves on it: stop it first,"
        " or name another path"
    )


@contextlib.contextmanager
def unix_socket(path: str):
    """A listening Unix socket at ``path``, mode 0660 and of the process's group from the moment anyone
    can connect to it (it is made under a umask that leaves it the owner's only, and listens only once
    its mode and group are set); its file is removed when the block ends. A stale socket at ``path`` is
    replaced; an invalid path ends the process with the reason."""
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inode = None
    try:
        umask = os.umask(0o177)  # main() binds before any other thread starts
        try:
            sock.bind(path)
        except OSError as exc:
            reason = exc.strerror or exc
            raise SystemExit(f"invalid configuration: LOADER_SOCKET {path!r}: {reason}") from None
        finally:
            os.umask(umask)
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
        if st.st_gid != os.getegid():  # a set-group-id directory gives its own group
            os.chown(path, -1, os.getegid())
        os.chmod(path, SOCKET_MODE)
        sock.listen(BACKLOG)
        yield sock
    finally:
        sock.close()
        if inode is not None:
            remove_socket(path, inode)


def remove_socket(path: str, inode) -> None:
    """Remove the socket file at ``path`` if it is still the one made (``inode``: its (device, inode))."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == tuple(inode):
            os.unlink(path)


def serve_unix(app, path: str, **options) -> None:
    """Run ``app`` with uvicorn (``options``: uvicorn.Config's) on a Unix socket at ``path`` instead of
    TCP, until a signal stops it; the socket file is gone when this returns, or when the signal that
    stopped it is raised again (uvicorn does so, and the process ends at once)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            remove_socket(path, inode)  # first: a client now finds no socket rather than a dead one
            await super().shutdown(sockets=sockets)

    with unix_socket(path) as sock:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
        log.info("serving on the unix socket %s (mode %04o, group %d)", path, SOCKET_MODE, st.st_gid)
        Server(uvicorn.Config(app, **options)).run(sockets=[sock])


# --- the health check --------------------------------------------------------------------------------


def health_check(timeout: float = 4.0) -> int:
    """The container's HEALTHCHECK: 0 when the loader of this environment (LOADER_SOCKET, else LOADER_HOST
    and LOADER_PORT; a wildcard host means the loopback) answers ``GET /health`` with 200, else 1. It sends
    ``Host: localhost``, which every loader answers to."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def __init__(self, path):
            super().__init__("localhost", timeout=timeout)
            self.path = path

        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(self.path)

    path = os.environ.get("LOADER_SOCKET", "")
    host = os.environ.get("LOADER_HOST", "127.0.0.1").strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        if path:
            connection = UnixConnection(path)
        else:
            port = int(os.environ.get("LOADER_PORT", "8080"))
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        connection.request("GET", "/health", headers={"Host": "localhost"})
        response = connection.getresponse()
        answer = response.read(200).decode("utf-8", "replace")
        connection.close()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        print(f"unhealthy: {exc}")
        return 1
    print(f"{response.status} {answer}")
    return 0 if response.status == 200 else 1
