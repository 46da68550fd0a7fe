# cython: language_level=3, embedsignature=True
"""Client of the Resource API (contract section 3).

Holds the session: credentials and token in memory only, the user read from the JWT, and the CDN
configuration fetched after login. Every call has a timeout; connection failures and 502/503/504 are
retried with bounded backoff; a 401 renews the token with one fresh login and retries once.
requests' exceptions never leave this module: answers map to the ``errors`` hierarchy.
"""

import logging
import threading
import time

import jwt
import requests

import security
from constants import CDN_CONFIG_NAME
from credentials import Credentials
from errors import (AuthError, Forbidden, HardwareMismatch, NotFound, NotLoggedIn, UpstreamError,
                    UpstreamTimeout)
from user import User

log = logging.getLogger("loader.api")

RETRY_STATUSES = frozenset((502, 503, 504))
# Small parts are at most 3072 bytes and cdn.yaml is tiny: anything far larger is not a valid answer.
MAX_SMALL_ANSWER = 1024 * 1024


class ResourceApi:
    """One logged-in session against the Resource API. Thread-safe."""

    def __init__(self, base_url, hardware, *, timeout=(5.0, 30.0), attempts=3, backoff=0.25, session=None):
        self._base = base_url.rstrip("/")
        self._hardware = hardware  # a callable giving the hardware line, read once when first needed
        self._timeout = timeout
        self._attempts = max(1, int(attempts))
        self._backoff = backoff
        self._http = session if session is not None else requests.Session()
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
        except (ValueError, KeyError, TypeError, jwt.PyJWTError):
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
                raise UpstreamError("cdn.yaml from the Resource API is not UTF-8 text") from None
            except NotFound:
                raise UpstreamError("the Resource API has no cdn.yaml: the CDN is not configured") from None
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
        url = self._base + path
        last = None
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(self._backoff * (2 ** (attempt - 1)))
            try:
                resp = self._http.request(method, url, headers=headers, timeout=self._timeout, **kwargs)
            except requests.Timeout as exc:
                last = UpstreamTimeout(f"the Resource API did not answer {method} {path} in time")
                log.warning("%s %s attempt %d: timeout (%s)", method, path, attempt + 1, type(exc).__name__)
                continue
            except requests.RequestException as exc:
                last = UpstreamError(f"the Resource API is unreachable ({type(exc).__name__})")
                log.warning("%s %s attempt %d: %s", method, path, attempt + 1, type(exc).__name__)
                continue
            if resp.status_code in RETRY_STATUSES and attempt + 1 < self._attempts:
                log.warning("%s %s attempt %d: status %d", method, path, attempt + 1, resp.status_code)
                resp.close()
                continue
            return resp
        raise last

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
            raise UpstreamError(f"the Resource API answer broke off ({type(exc).__name__})") from None
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

