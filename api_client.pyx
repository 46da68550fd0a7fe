# cython: language_level=3, embedsignature=True
"""Client of the Resource API (contract section 3).

Holds the session: credentials and token in memory only, the user read from the JWT, and the CDN
configuration fetched after login. Every call has a timeout. Retries are urllib3's ``Retry`` mounted on the
session, with the numbers of ``constants`` (API_*): connection failures, timeouts before the answer and
502/503/504 are tried again with backoff, and a Retry-After is honoured. A 401 renews the token with one
fresh login and retries once. requests' exceptions never leave this module: answers map to the ``errors``
hierarchy, each failure logged at DEBUG with its cause.
"""

import logging
import threading
import time

import jwt
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError
from urllib3.util import parse_url
from urllib3.util.retry import Retry

import security
from constants import API_ATTEMPTS, API_BACKOFF, API_RETRY_AFTER_MAX, API_RETRY_STATUSES, CDN_CONFIG_NAME
from credentials import Credentials
from errors import (AuthError, Forbidden, HardwareMismatch, NotFound, NotLoggedIn, UpstreamError,
                    UpstreamTimeout)
from user import User

log = logging.getLogger("loader.api")

# Small parts are at most 3072 bytes and cdn.yaml is tiny: anything far larger is not a valid answer.
MAX_SMALL_ANSWER = 1024 * 1024


class _LoggedRetry(Retry):
    """urllib3's Retry, telling each retry in the loader's own words: the method, the path (no host, no
    query), the attempt and why; never a header or a body. urllib3 tells a retried status only at DEBUG, and
    its warning of a retried connection is silenced by main.configure_logging, so each retry is told once."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        retry = super().increment(method, url, response, error, _pool, _stacktrace)  # raises when spent
        why = type(error).__name__ if error is not None else f"status {response.status}"
        log.warning("%s %s attempt %d: %s: retrying", method, parse_url(url).path, len(retry.history), why)
        return retry


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
    adapter = HTTPAdapter(max_retries=retry)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return http


def _timed_out(exc):
    """A timeout, also one urllib3 gave up retrying (requests then raises a ConnectionError around it)."""
    if isinstance(exc, requests.Timeout):
        return True
    return isinstance(getattr(exc.args[0] if exc.args else None, "reason", None), ReadTimeoutError)


class ResourceApi:
    """One logged-in session against the Resource API. Thread-safe."""

    def __init__(self, base_url, hardware, *, timeout=(5.0, 30.0), attempts=API_ATTEMPTS, backoff=API_BACKOFF):
        self._base = base_url.rstrip("/")
        self._hardware = hardware  # a callable giving the hardware line, read once when first needed
        self._timeout = timeout
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
                                                        "password": credentials.password})
        if resp.status_code in (401, 403):
            raise AuthError("bad credentials: the Resource API refused the email or password")
        self._raise_for(resp, "login")
        try:
            token = resp.json()["token"]
            if not isinstance(token, str):
                raise TypeError
            claims = jwt.decode(token, options={"verify_signature": False})
            if not isinstance(claims, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, jwt.PyJWTError) as exc:
            # The answer holds the token, which a parse error may quote: only the error's type is logged,
            # and it is not kept as the cause.
            log.debug("POST /login: the answer did not parse (%s)", type(exc).__name__)
            raise UpstreamError("the Resource API's sign-in answer carries no valid JWT") from None
        return token, User.from_claims(claims)

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

    def get_resource(self, folder, file_name):
        """Bytes of a resource (a small part, cdn.yaml): the API's blob unwrapped with the API key."""
        creds = self.credentials()
        hardware = self._hardware()
        path = f"/resources/get/{folder}" if folder else "/resources/get"
        body = {"fileName": file_name, "password": creds.password, "hardware": hardware}
        resp = self._authed("POST", path, json=body, stream=True)
        try:
            self._raise_for(resp, f"{folder}/{file_name}" if folder else file_name)
            blob = self._read_capped(resp, MAX_SMALL_ANSWER)
        finally:
            resp.close()
        return security.decrypt(security.api_key(creds.email, creds.password, hardware), blob)

    def upload(self, folder, file_name, data):
        """Store a small file (a small part) in ``folder`` as ``file_name``."""
        resp = self._authed("POST", f"/resources/{folder}",
                            files={"data": (file_name, data, "application/octet-stream")})
        if resp.status_code == 403:
            raise Forbidden("the Resource API refused the upload: this role may not upload")
        self._raise_for(resp, f"{folder}/{file_name}")

    def key_fragment(self):
        resp = self._authed("GET", "/binary-split/key-fragment", stream=True)
        try:
            self._raise_for(resp, "key fragment")
            fragment = self._read_capped(resp, MAX_SMALL_ANSWER)
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
                text = self.get_resource("", CDN_CONFIG_NAME).decode("utf-8")
            except UnicodeDecodeError:
                # The error holds the whole text, CDN secrets and all: it is not kept as the cause.
                log.debug("cdn.yaml is not UTF-8")
                raise UpstreamError("cdn.yaml from the Resource API is not UTF-8 text") from None
            except NotFound as exc:
                raise UpstreamError("the Resource API has no cdn.yaml: the CDN is not configured") from exc
            self._cdn_yaml = text
        return text

    # --- plumbing -----------------------------------------------------------------------------

    def _authed(self, method, path, **kwargs):
        token = self._token_now()
        resp = self._send(method, path, token, **kwargs)
        if resp.status_code == 401:
            resp.close()
            log.info("401 on %s %s: renewing the session once", method, path)
            resp = self._send(method, path, self._renew(token), **kwargs)
        return resp

    def _send(self, method, path, token, **kwargs):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            return self._http.request(method, self._base + path, headers=headers, timeout=self._timeout,
                                      **kwargs)
        except requests.RequestException as exc:
            log.debug("%s %s failed", method, path, exc_info=True)
            if _timed_out(exc):
                raise UpstreamTimeout(f"the Resource API did not answer {method} {path} in time") from exc
            raise UpstreamError(f"the Resource API is unreachable ({type(exc).__name__})") from exc

    @staticmethod
    def _read_capped(resp, limit):
        chunks, size = [], 0
        try:
            for chunk in resp.iter_content(65536):
                size += len(chunk)
                if size > limit:
                    raise UpstreamError("the Resource API sent an answer far larger than expected")
                chunks.append(chunk)
        except requests.RequestException as exc:
            log.debug("%s %s: the answer broke off", resp.request.method, resp.request.path_url, exc_info=True)
            raise UpstreamError(f"the Resource API answer broke off ({type(exc).__name__})") from exc
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

