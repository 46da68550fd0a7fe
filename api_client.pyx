# cython: language_level=3, embedsignature=True
"""Client of the Resource API (contract section 3).

Holds the session: credentials and token in memory only, the user read from the JWT, and the CDN
configuration fetched after login. Retries are urllib3's ``Retry`` mounted on the session, with the numbers of
``constants`` (API_*): connection failures, timeouts before the answer and 502/503/504 are tried again with
backoff, and a Retry-After is honoured. A 401 renews the token with one fresh login and retries once.
requests' exceptions never leave this module: answers map to the ``errors`` hierarchy, each failure logged at
DEBUG with its cause.

Liveness (contract section 11). ``timeout`` bounds each attempt's connect and each read of its answer;
``deadline`` bounds a whole public call (login, get_resource, upload, key_fragment, cdn_yaml), its tries,
backoff and token renewal included: past it the call raises UpstreamTimeout. Every answer is read as a
stream, at most its cap (constants MAX_*_ANSWER); a larger one, JSON nested deeper than MAX_JSON_DEPTH or a
JWT whose exp is no time is an UpstreamError "... is not valid: ...".

Threads and locks:
- A call runs on its caller's thread; ``_local.deadline`` is the _Deadline of the public call it is in.
- One daemon thread, "api-deadlines" (``_Watchdog``, started by the first call), sleeps until the earliest
  deadline of the calls under way. When one passes, it shuts down the sockets that call is using, so a read
  or a write blocked on them returns at once (a thread blocked on a socket cannot be interrupted otherwise);
  whatever requests then raises is mapped to UpstreamTimeout. Connecting is bounded by the time left (the
  name lookup before it is not: getaddrinfo cannot be interrupted), and a retry whose wait (backoff or
  Retry-After) would end past the deadline is not started.
- ``_lock`` guards the watchdog's heap, each _Deadline's connections and flags, and each connection's
  ``_deadline`` and ``_watch``: a watched socket is shut down or closed only under it, so a shutdown never
  lands on a file descriptor the OS has handed to something else meanwhile.
- ``ResourceApi._lock`` guards the session: credentials, token, user, cdn.yaml and the login count.
"""

import contextlib
import heapq
import json
import logging
import socket
import threading
import time

import jwt
import requests
from jwt.utils import base64url_decode
from requests.adapters import HTTPAdapter
from urllib3 import ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError, InvalidHeader, ReadTimeoutError
from urllib3.util import parse_url
from urllib3.util.retry import Retry

import security
from constants import (API_ATTEMPTS, API_BACKOFF, API_RETRY_AFTER_MAX, API_RETRY_STATUSES, CDN_CONFIG_NAME,
                       MANIFEST_SUFFIX, MAX_CDN_YAML_ANSWER, MAX_JSON_DEPTH, MAX_KEY_FRAGMENT_ANSWER,
                       MAX_LOGIN_ANSWER, MAX_MANIFEST_ANSWER, MAX_SMALL_ANSWER, MAX_UPLOAD_ANSWER)
from credentials import Credentials
from errors import (AuthError, Forbidden, HardwareMismatch, NotFound, NotLoggedIn, UpstreamError,
                    UpstreamTimeout)
from manifest import json_nests_deeper
from user import User

log = logging.getLogger("loader.api")

# --- deadlines ------------------------------------------------------------------------------------

_lock = threading.Lock()
_local = threading.local()


class _DeadlinePassed(Exception):
    """Raised inside urllib3 when a call's deadline has passed or leaves no time for another try; caught in
    ``_send`` (it is no requests exception, so nothing on the way retries it)."""


class _Deadline:
    """One public call's deadline, and the connections it is using now."""

    def __init__(self, seconds, what):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.what = what  # the request under way ("POST /login"), for the message
        self.conns = set()  # guarded by _lock, like the two flags
        self.passed = False  # the watchdog shut its connections, or a retry could not fit
        self.done = False  # the call has returned

    def left(self):
        return self.at - time.monotonic()

    @property
    def expired(self):
        return self.passed or time.monotonic() >= self.at

    def give_up(self):
        with _lock:
            self.passed = True

    def error(self):
        return UpstreamTimeout(
            f"the Resource API did not answer {self.what} in time (within {self.seconds:g} s)"
        )


def _current():
    return getattr(_local, "deadline", None)


class _Watchdog:
    """The "api-deadlines" thread: shuts the connections of each call whose deadline passes."""

    def __init__(self):
        self._wake = threading.Condition(_lock)
        self._heap = []  # (at, n, _Deadline); a call that returned stays until it comes first
        self._n = 0
        self._thread = None

    def start(self, deadline):
        with _lock:
            self._n += 1
            heapq.heappush(self._heap, (deadline.at, self._n, deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="api-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is deadline:
                self._wake.notify()

    def end(self, deadline):
        with _lock:
            deadline.done = True
            for conn in deadline.conns:
                conn._deadline = None
            deadline.conns.clear()

    def _run(self):
        with _lock:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                deadline = heapq.heappop(self._heap)[2]
                deadline.passed = True
                for conn in deadline.conns:
                    _shut(conn)


_watchdog = _Watchdog()


def _shut(conn):
    """Under _lock: end every read and write on ``conn`` (the caller then closes it)."""
    if conn._watch is not None:
        try:
            conn._watch.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected (any more)


def _use(conn, deadline):
    """``conn`` serves ``deadline`` from now on (None: it is back in its pool); shut at once if that has
    passed already."""
    with _lock:
        if conn._deadline is not None:
            conn._deadline.conns.discard(conn)
        conn._deadline = None
        if deadline is None or deadline.done:
            return
        if deadline.passed:
            _shut(conn)
            return
        deadline.conns.add(conn)
        conn._deadline = deadline


class _Watched:
    """Mixed into urllib3's connections: registers the connection with the calling thread's deadline when it
    connects or sends a request, so the watchdog can shut it."""

    _deadline = None  # the _Deadline of the call using it (guarded by _lock)
    # A duplicate of its socket: still valid once TLS has taken the socket over (guarded by _lock).
    _watch = None

    def _new_conn(self):
        deadline = _current()
        if deadline is not None:
            left = deadline.left()
            if left <= 0:
                raise _DeadlinePassed()
            if not isinstance(self.timeout, (int, float)) or self.timeout > left:
                self.timeout = left  # connecting (and TLS) may take the time left at most
        sock = super()._new_conn()
        with _lock:
            if self._watch is not None:
                self._watch.close()
            self._watch = sock.dup()
        _use(self, deadline)
        return sock

    def request(self, *args, **kwargs):
        _use(self, _current())
        return super().request(*args, **kwargs)

    def close(self):
        try:
            super().close()
        finally:
            with _lock:
                if self._watch is not None:
                    self._watch.close()
                    self._watch = None


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _Releasing:
    """Mixed into urllib3's pools: a connection back in its pool serves no call."""

    def _put_conn(self, conn):
        if conn is not None:
            _use(conn, None)
        super()._put_conn(conn)


class _HTTPPool(_Releasing, HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(_Releasing, HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _Adapter(HTTPAdapter):
    """requests' adapter with the watched pools (direct and through an HTTP proxy)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is ProxyManager:
            manager.pool_classes_by_scheme = _POOLS
        return manager


# --- the session ----------------------------------------------------------------------------------


class _LoggedRetry(Retry):
    """urllib3's Retry, telling each retry in the loader's own words: the method, the path (no host, no
    query), the attempt and why; never a header or a body. urllib3 tells a retried status only at DEBUG, and
    its warning of a retried connection is silenced by logs.configure_logging, so each retry is told once.
    No try starts past the call's deadline, nor one whose wait (backoff or Retry-After) would end past it."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        deadline = _current()
        if deadline is not None and deadline.expired:
            if response is not None:
                response.close()
            raise _DeadlinePassed()
        retry = super().increment(method, url, response, error, _pool, _stacktrace)  # raises when spent
        why = type(error).__name__ if error is not None else f"status {response.status}"
        log.warning("%s %s attempt %d: %s: retrying", method, parse_url(url).path, len(retry.history), why)
        return retry

    def sleep(self, response=None):
        wait = self.get_backoff_time()
        if response is not None and self.respect_retry_after_header:
            try:
                wait = self.get_retry_after(response) or wait
            except InvalidHeader:
                pass  # a Retry-After that is no time: the backoff
        deadline = _current()
        if deadline is not None and wait >= deadline.left():
            log.warning("%s: the next try would start past the deadline: giving up", deadline.what)
            deadline.give_up()
            raise _DeadlinePassed()
        if wait > 0:
            time.sleep(wait)


def _session(attempts, backoff):
    """A requests session whose every call is retried by the Resource API's one policy (constants API_*)."""
    retry = _LoggedRetry(
        total=max(1, int(attempts)) - 1,
        backoff_factor=backoff,
        status_forcelist=API_RETRY_STATUSES,
        allowed_methods=None,  # POSTs too: every call of the contract is idempotent
        raise_on_status=False,  # the last answer is returned, and mapped like any other
        retry_after_max=API_RETRY_AFTER_MAX,
    )
    http = requests.Session()
    adapter = _Adapter(max_retries=retry)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return http


def _timed_out(exc):
    """A timeout, also one urllib3 gave up retrying (requests then raises a ConnectionError around it)."""
    if isinstance(exc, requests.Timeout):
        return True
    return isinstance(getattr(exc.args[0] if exc.args else None, "reason", None), ReadTimeoutError)


def _answer_cap(folder, file_name):
    """The cap of the answer to ``get_resource(folder, file_name)``, told by the name."""
    if file_name.endswith(MANIFEST_SUFFIX):
        return MAX_MANIFEST_ANSWER
    if not folder and file_name == CDN_CONFIG_NAME:
        return MAX_CDN_YAML_ANSWER
    return MAX_SMALL_ANSWER


def _not_valid(what, reason):
    return UpstreamError(f"the Resource API's answer to {what} is not valid: {reason}")


class ResourceApi:
    """One logged-in session against the Resource API. Thread-safe.

    ``timeout``: (connect, read) seconds of each try; ``deadline``: seconds of a whole public call."""

    def __init__(self, base_url, hardware, *, timeout=(5.0, 30.0), deadline=60.0, attempts=API_ATTEMPTS,
                 backoff=API_BACKOFF):
        self._base = base_url.rstrip("/")
        self._hardware = hardware  # a callable giving the hardware line, read once when first needed
        self._timeout = timeout
        self._deadline = float(deadline)
        self._http = _session(attempts, backoff)
        self._lock = threading.Lock()
        self._credentials = None
        self._token = None
        self._user = None
        self._cdn_yaml = None
        self._session = 0  # counts the logins: a renewal belongs to the one it started in

    # --- session ------------------------------------------------------------------------------

    @property
    def user(self):
        return self._user

    @property
    def authenticated(self):
        return self._token is not None

    def login(self, credentials):
        """Log in and return the user; the credentials are kept (in memory) to renew the token."""
        if not isinstance(credentials, Credentials):
            raise TypeError("credentials must be Credentials")
        with self._bounded("POST /login"):
            token, user = self._fetch_token(credentials)
        with self._lock:
            self._credentials, self._token, self._user = credentials, token, user
            self._cdn_yaml = None
            self._session += 1  # a renewal still under way for the session before must not land in this one
        log.info("logged in user_id=%s roles=%s", user.id, user.role)
        return user

    def credentials(self):
        """The session's credentials (for key derivation); raises NotLoggedIn without a session."""
        creds = self._credentials
        if creds is None:
            raise NotLoggedIn()
        return creds

    def _fetch_token(self, credentials):
        resp = self._send("POST", "/login", None, json={"email": credentials.email,
                                                        "password": credentials.password}, stream=True)
        try:
            if resp.status_code in (401, 403):
                raise AuthError("bad credentials: the Resource API refused the email or password")
            self._raise_for(resp, "login")
            raw = self._read_capped(resp, MAX_LOGIN_ANSWER, "POST /login")
        finally:
            resp.close()
        return _token_and_user(raw)

    def _renew(self, stale_token):
        """One fresh sign-in, shared by every thread that saw the same stale JWT."""
        with self._lock:
            if self._token is not None and self._token != stale_token:
                return self._token
            creds, session = self._credentials, self._session
        if creds is None:
            raise NotLoggedIn()
        token, user = self._fetch_token(creds)
        with self._lock:
            if self._session != session:  # another sign-in came in meanwhile: its JWT stands
                raise AuthError("the session changed while it was being renewed: try again")
            self._token, self._user = token, user
        log.info("session renewed user_id=%s", user.id)
        return token

    def _token_now(self):
        token, user = self._token, self._user
        if token is None:
            raise NotLoggedIn()
        # Renew ahead of time when the JWT says it has expired: saves a round trip that would 401.
        if user is not None and user.expires_at is not None and user.expires_at <= time.time():
            return self._renew(token)
        return token

    # --- calls --------------------------------------------------------------------------------

    def get_resource(self, folder, file_name, *, cap=None):
        """Bytes of a resource (a small part, a manifest, cdn.yaml): the API's blob unwrapped with the API
        key.
        ``cap``: the largest answer taken; by default the one its name tells (MAX_*_ANSWER)."""
        creds = self.credentials()
        hardware = self._hardware()
        path = f"/resources/get/{folder}" if folder else "/resources/get"
        body = {"fileName": file_name, "password": creds.password, "hardware": hardware}
        with self._bounded(f"POST {path}"):
            resp = self._authed("POST", path, json=body, stream=True)
            try:
                self._raise_for(resp, f"{folder}/{file_name}" if folder else file_name)
                blob = self._read_capped(resp, _answer_cap(folder, file_name) if cap is None else cap,
                                         f"POST {path} ({file_name})")
            finally:
                resp.close()
        return security.decrypt(security.api_key(creds.email, creds.password, hardware), blob)

    def upload(self, folder, file_name, data):
        """Store a small file (a small part, a manifest) in ``folder`` as ``file_name``."""
        path = f"/resources/{folder}"
        with self._bounded(f"POST {path}"):
            resp = self._authed("POST", path, files={"data": (file_name, data, "application/octet-stream")},
                                stream=True)
            try:
                if resp.status_code == 403:
                    raise Forbidden("the Resource API refused the upload: this role may not upload")
                self._raise_for(resp, f"{folder}/{file_name}")
                self._read_capped(resp, MAX_UPLOAD_ANSWER, f"POST {path} ({file_name})")
            finally:
                resp.close()

    def key_fragment(self):
        path = "/binary-split/key-fragment"
        with self._bounded(f"GET {path}"):
            resp = self._authed("GET", path, stream=True)
            try:
                self._raise_for(resp, "key fragment")
                fragment = self._read_capped(resp, MAX_KEY_FRAGMENT_ANSWER, f"GET {path}")
            finally:
                resp.close()
        if not fragment:
            raise UpstreamError("the Resource API sent an empty key fragment")
        return fragment

    def cdn_yaml(self):
        """The text of cdn.yaml, fetched once per session and held in memory only."""
        text = self._cdn_yaml
        if text is None:
            try:
                text = self.get_resource("", CDN_CONFIG_NAME, cap=MAX_CDN_YAML_ANSWER).decode("utf-8")
            except UnicodeDecodeError:
                # The error holds the whole text, CDN secrets and all: it is not kept as the cause.
                log.debug("cdn.yaml is not UTF-8")
                raise UpstreamError("cdn.yaml from the Resource API is not UTF-8 text") from None
            except NotFound as exc:
                raise UpstreamError("the Resource API has no cdn.yaml: the CDN is not configured") from exc
            self._cdn_yaml = text
        return text

    # --- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _bounded(self, what):
        """The public call in the block ends within the deadline (a call inside another is part of it):
        past it, whatever upstream failure the shut connections caused is UpstreamTimeout."""
        if _current() is not None:
            yield
            return
        deadline = _Deadline(self._deadline, what)
        _local.deadline = deadline
        _watchdog.start(deadline)
        try:
            yield
        except UpstreamTimeout:
            raise
        except UpstreamError as exc:
            if deadline.expired:
                raise deadline.error() from exc
            raise
        finally:
            _local.deadline = None
            _watchdog.end(deadline)

    def _authed(self, method, path, **kwargs):
        token = self._token_now()
        resp = self._send(method, path, token, **kwargs)
        if resp.status_code == 401:
            resp.close()
            log.info("401 on %s %s: renewing the session once", method, path)
            resp = self._send(method, path, self._renew(token), **kwargs)
        return resp

    def _send(self, method, path, token, **kwargs):
        deadline = _current()
        if deadline is not None:
            deadline.what = f"{method} {path}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            return self._http.request(method, self._base + path, headers=headers, timeout=self._timeout,
                                      **kwargs)
        except (requests.RequestException, _DeadlinePassed) as exc:
            log.debug("%s %s failed", method, path, exc_info=True)
            if deadline is not None and deadline.expired:
                raise deadline.error() from exc
            if _timed_out(exc):
                raise UpstreamTimeout(f"the Resource API did not answer {method} {path} in time") from exc
            raise UpstreamError(f"the Resource API is unreachable ({type(exc).__name__})") from exc

    @staticmethod
    def _read_capped(resp, limit, what):
        """The whole body of ``resp``, at most ``limit`` bytes, read within the call's deadline."""
        deadline = _current()
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit and not resp.headers.get("Content-Encoding"):
            raise _not_valid(what, f"larger than {limit} bytes")
        chunks, size = [], 0
        try:
            for chunk in resp.iter_content(65536):
                size += len(chunk)
                if size > limit:
                    raise _not_valid(what, f"larger than {limit} bytes")
                chunks.append(chunk)
                if deadline is not None and deadline.expired:
                    break
        except (requests.RequestException, HTTPError, OSError) as exc:
            log.debug("%s: the answer broke off", what, exc_info=True)
            if deadline is not None and deadline.expired:
                raise deadline.error() from exc
            raise UpstreamError(f"the Resource API answer broke off ({type(exc).__name__})") from exc
        if deadline is not None and deadline.expired:
            raise deadline.error()  # what arrived may have been cut short by the watchdog
        return b"".join(chunks)

    @staticmethod
    def _raise_for(resp, what):
        code = resp.status_code
        if 200 <= code < 300:
            return
        resp.close()
        if code in (401, 403):
            raise AuthError(f"the Resource API refused access to {what} ({code})")
        if code == 404:
            raise NotFound(f"no such resource: {what}")
        if code == 409:
            raise HardwareMismatch("this account is bound to other hardware")
        raise UpstreamError(f"the Resource API answered {code} for {what}")


def _token_and_user(raw):
    """The JWT and the user of a sign-in answer; UpstreamError when it holds none, or one not valid."""
    if json_nests_deeper(raw, MAX_JSON_DEPTH):
        raise _not_valid("POST /login", f"JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        token = json.loads(raw.decode("utf-8"))["token"]
        if not isinstance(token, str):
            raise TypeError
        segments = token.split(".")
        if len(segments) != 3:
            raise ValueError
        if any(json_nests_deeper(base64url_decode(s), MAX_JSON_DEPTH) for s in segments[:2]):
            raise _not_valid("POST /login", f"its JWT nests deeper than {MAX_JSON_DEPTH}")
        claims = jwt.decode(token, options={"verify_signature": False})
        if not isinstance(claims, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, jwt.PyJWTError) as exc:
        # The answer holds the token, which a parse error may quote: only the error's type is logged,
        # and it is not kept as the cause.
        log.debug("POST /login: the answer did not parse (%s)", type(exc).__name__)
        raise UpstreamError("the Resource API's sign-in answer carries no valid JWT") from None
    try:
        return token, User.from_claims(claims)
    except ValueError as exc:
        raise _not_valid("POST /login", f"its JWT's {exc}") from None
