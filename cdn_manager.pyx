# cython: language_level=3, embedsignature=True
"""The S3-compatible CDN (contract sections 2 and 3): ``cdn.yaml`` and the S3 calls.

``CdnManager`` wraps two injected boto3 clients: the downloader identity for HEAD/GET, the uploader
identity for PUT. ``fill`` reads a range of an object straight into a caller's buffer; an interrupted
transfer is resumed with a ranged GET pinned to the ETag (``IfMatch``), so a resumed download can never
splice two versions of an object.

One retry policy (constants CDN_*): botocore's standard mode retries a request that fails; a body cut off
mid-stream, which botocore does not retry, is resumed a bounded number of times with backoff. Nothing
retries on top of botocore. botocore's and boto3's exceptions never leave this module: each becomes the
``errors`` hierarchy, its cause kept and logged at DEBUG with the operation.

Liveness (contract section 11), like curl's ``--speed-limit``/``--speed-time``: botocore's read timeout
bounds each socket read, so a body that sends a byte every few seconds would never time out. A body that
brings in less than ``speed_limit`` bytes a second over ``speed_time`` seconds is dropped and resumed like
one that broke off; once the resumes are spent the transfer is an UpstreamTimeout (504). The GET and HEAD
before a body are bounded by botocore's read timeout (a silent server); a server that trickles the
response *head* is not caught (that would need a deadline inside botocore's request: a known limit).
Every value the CDN answers is range-checked (ObjectInfo), and so is cdn.yaml (CdnConfig.from_yaml).

Threads and locks: a fill runs on its caller's thread. One watchdog thread for the process
(``cdn-watchdog``, a daemon started with the first transfer) keeps a heap of the transfers' window ends;
at each it judges the window (what the connection brought in, from the kernel) and, for a transfer too
slow, shuts its socket down (a blocked ``readinto`` cannot be cancelled otherwise) so that the read
returns. The watchdog's lock guards the heap and each transfer's window, pause and end; the reading
thread alone writes a transfer's count of bytes read (no lock). Nothing is called under that lock but the
socket's getsockopt and shutdown and the caller's ``stop`` (which must take no lock of its own), so it
comes last in any lock order.

The bandwidth cap (contract section 8): one Throttle, shared by every CdnManager of the process, paces the
reads of every download body so that all of them together keep to ``CDN_MAX_BYTES_PER_S``; a thread waits
for its turn with the transfer's window paused, so a cap below the progress rule's limit never gets a
transfer dropped. Uploads and loads from the cache are not capped. The Throttle's lock is a leaf lock too:
nothing but the clock is called under it, and no thread sleeps holding it; it is never taken together with
the watchdog's.
"""

import heapq
import http.client
import itertools
import logging
import os
import random
import re
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import boto3
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError
from botocore.response import StreamingBody
from urllib3.exceptions import HTTPError as Urllib3Error

from constants import CDN_ATTEMPTS, CDN_RESUME_BACKOFF, CDN_RESUMES, CHUNK_SIZE, MAX_RESOURCE_BYTES
from errors import IntegrityError, NotFound, StorageError, UpstreamError, UpstreamTimeout, storage_error

log = logging.getLogger("loader.cdn")

# Errors while a body streams in that a ranged GET from the current offset can cure.
STREAM_ERRORS = (BotoCoreError, Urllib3Error, http.client.HTTPException, OSError)
# Uploads: parts of this size, this many in flight (in memory) at once.
UPLOAD_PART = 16 * 1024 * 1024
UPLOAD_CONCURRENCY = 4
# The progress rule (main.py's CDN_SPEED_LIMIT and CDN_SPEED_TIME): a transfer that brings in less than
# SPEED_LIMIT bytes a second over SPEED_TIME seconds is dropped and resumed; 0 turns the rule off.
SPEED_LIMIT = 16 * 1024
SPEED_TIME = 30.0
# A transfer's progress is what the kernel has received on its TCP connection (Linux's TCP_INFO,
# tcpi_bytes_received, at this offset), read by the watchdog at the end of each window: so the reads stay
# whole buffers. Where that is not to be had (a body that is no socket's), the body is read in pieces of
# at most an eighth of a window's bytes (and MAX_PIECE), whose bytes count once each is in: reading a
# socket so cost twice the CPU of whole 4 MiB reads (0.2 s more per GiB).
TCP_BYTES_RECEIVED = 128
MAX_PIECE = 256 * 1024
PIECES_PER_WINDOW = 8
# The bandwidth cap: a capped body is read in pieces of an eighth of a second's bytes (at least
# THROTTLE_MIN_PIECE, at most THROTTLE_MAX_PIECE), each after its turn, so the bytes come in evenly and the
# connection's TCP window, not a burst and then a silence, holds the sender back. A thread waiting for its
# turn looks at its ``stop`` (and at the rate, which may change) this often.
THROTTLE_MIN_PIECE = 64 * 1024
THROTTLE_MAX_PIECE = 1024 * 1024
THROTTLE_POLL = 0.1
# Values in the CDN's answers: an ETag is sent back in If-Match, so it is printable ASCII, and short.
MAX_ETAG = 1024
# cdn.yaml: a region is a name as botocore takes it; keys and secrets are printable and short.
REGION_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_HOST = 2048
MAX_KEY = 1024


_session = None
_session_lock = threading.Lock()


def _s3_client(**kw):
    """An S3 client of the process's one boto3 session. A client of a fresh session parses botocore's S3
    model (about 60 ms of CPU); another client of the same session takes about 3 ms. A session is not safe
    for threads making clients at once: they take turns."""
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client("s3", **kw)


def warm_up():
    """Parse botocore's S3 model now (at start-up, off the request path), so that the clients made after a
    login are quick: the first load after a login waited about 150 ms for them. Makes no request."""
    _s3_client(endpoint_url="http://127.0.0.1:9", aws_access_key_id="warm-up",
               aws_secret_access_key="warm-up", region_name="us-east-1").close()


class CdnConfig:
    """The keys of cdn.yaml. Secrets stay in memory; ``repr`` never shows them."""

    REQUIRED = ("host", "downloader_access_key", "downloader_access_secret", "uploader_access_key",
                "uploader_access_secret")

    def __init__(self, host, downloader, uploader, region="us-east-1"):
        self.host = host
        self.downloader = downloader
        self.uploader = uploader
        self.region = region

    @classmethod
    def from_yaml(cls, text):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            # A YAML error quotes the text around the fault, which may be a CDN key or secret: only its type
            # is logged, and it is not kept as the cause.
            log.debug("cdn.yaml did not parse (%s)", type(exc).__name__)
            raise UpstreamError("cdn.yaml is not valid YAML") from None
        if not isinstance(data, dict):
            raise UpstreamError("cdn.yaml is not a mapping")
        missing = [k for k in cls.REQUIRED if not data.get(k)]
        if missing:
            raise UpstreamError(f"cdn.yaml lacks {', '.join(missing)}")
        # Each value is checked before use; a message names the field, never its value (it may be a secret).
        if not _is_http_url(data["host"]):
            raise UpstreamError("cdn.yaml is not valid: host must be an http(s) URL")
        region = data.get("region") or "us-east-1"
        if not isinstance(region, str) or not REGION_PATTERN.fullmatch(region):
            raise UpstreamError("cdn.yaml is not valid: region must be a region name (letters, digits, -)")
        for name in cls.REQUIRED[1:]:
            if not _is_key(data[name]):
                raise UpstreamError(f"cdn.yaml is not valid: {name} must be a short printable text")
        return cls(data["host"],
                   (str(data["downloader_access_key"]), str(data["downloader_access_secret"])),
                   (str(data["uploader_access_key"]), str(data["uploader_access_secret"])),
                   region)

    def client(self, identity, *, connect_timeout=5, read_timeout=30, pool=16):
        key, secret = self.downloader if identity == "downloader" else self.uploader
        config = Config(
            # No SHA-256 of each request body for its signature (botocore takes one over plain HTTP, and over
            # HTTPS too without a checksum header): a sealed part's every byte is in its manifest's digests,
            # which every load checks end to end, and that pass cost an upload about 15 % of its CPU.
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            retries={"total_max_attempts": CDN_ATTEMPTS, "mode": "standard"},  # the one retry of a request
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=pool,
            # An upload's parts carry no CRC of their own: every byte of a sealed part is in its manifest's
            # digests, checked end to end by every load, and the CRC cost the loader and the CDN CPU.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_supported",
        )
        try:
            return _s3_client(endpoint_url=self.host, aws_access_key_id=key, aws_secret_access_key=secret,
                              region_name=self.region, config=config)
        except (ValueError, BotoCoreError) as exc:
            # botocore refuses an endpoint or region it cannot use (a ValueError, or InvalidRegionError). Its
            # message may quote what it was given: only the type is logged, and it is not kept as the cause.
            log.debug("building the CDN client failed (%s)", type(exc).__name__)
            raise UpstreamError(f"cdn.yaml is not valid: the CDN client could not be built "
                                f"({type(exc).__name__})") from None

    def __repr__(self):
        return f"CdnConfig(host={self.host!r}, region={self.region!r})"


def _error_code(exc):
    return str(exc.response.get("Error", {}).get("Code", ""))


def _unreachable(exc):
    """The error for a request botocore gave up on: no answer in time (a 504), or none at all."""
    if isinstance(exc, ReadTimeoutError):
        return UpstreamTimeout(f"the CDN did not answer in time ({type(exc).__name__})")
    return UpstreamError(f"the CDN is unreachable ({type(exc).__name__})")


def _map_client_error(exc, what):
    code = _error_code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
        return NotFound(f"no such object on the CDN: {what}")
    if code in ("PreconditionFailed", "412") or status == 412:
        return UpstreamError(f"the CDN object changed during the transfer: {what}")
    return UpstreamError(f"the CDN answered {status or code} for {what}")


def _is_http_url(host):
    """Whether ``host`` is an http or https URL with a host name (and nothing a client would not send: no
    user or password, query, fragment, space or control character)."""
    if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST or not host.isascii() or \
            not host.isprintable() or " " in host:
        return False
    try:
        parts = urlsplit(host)
        parts.port  # a port that is no number, or out of range, is a ValueError here
    except ValueError:  # "http://[::1", say
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and parts.username is None
            and parts.password is None and not parts.query and not parts.fragment)


def _is_key(value):
    """Whether a key or secret of cdn.yaml is usable: a scalar YAML gave (text, or digits read as a number)
    whose text is printable ASCII without spaces, and short."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return False
    text = str(value)
    return 0 < len(text) <= MAX_KEY and text.isascii() and text.isprintable() and " " not in text


def _shown(value, int limit=40):
    """A value from an answer, for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class ObjectInfo:
    """An object's size and ETag as the CDN answered them (a HEAD, an upload): a size out of 0 ..
    MAX_RESOURCE_BYTES, or anything but an int, is refused before any arithmetic is done with it (a HEAD
    that announced 10**20 bytes was a MemoryError, a 500), and so is an ETag that is not short printable
    text. ``what`` names the object in the UpstreamError."""

    def __init__(self, size, etag, what="the object"):
        if type(size) is not int or not 0 <= size <= MAX_RESOURCE_BYTES:
            raise UpstreamError(f"the CDN's answer for {what} is not valid: a size of {_shown(size)} bytes")
        if not isinstance(etag, str) or not 0 < len(etag) <= MAX_ETAG or not etag.isascii() or \
                not etag.isprintable():
            raise UpstreamError(f"the CDN's answer for {what} is not valid: an ETag of {_shown(etag)}")
        self.size = size
        self.etag = etag


def _checked_rate(rate):
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
        raise ValueError(f"a bandwidth cap is a whole number of bytes a second, 0 (none) or more: {rate!r}")
    return rate


class Throttle:
    """A cap of ``rate`` bytes a second (0: none) on all the reads of the threads that ``take`` from it,
    together, however many they are: the process's one cap on its CDN downloads (contract section 8).

    One schedule serves every taker: ``_next`` is when the bytes granted so far are paid for at the rate.
    A ``take`` moves it on by its own bytes' time and waits until then, so takers are served in the order
    they came, each after the one before, and the bytes granted over any stretch of time come to its
    length times the rate (plus the burst below).

    The burst: a take may reach back up to BURST seconds before now, so a thread that was briefly busy
    between takes (reading, its caller holding a step, a late wake-up) loses none of the rate. The price:
    after a pause of BURST seconds or more, ``rate * BURST`` bytes more than the rate may go through at once.

    ``set_rate`` applies at once, to the turns already given too (what a waiting take still owes is
    owed at the new rate, from its next look at the clock); a rate of 0 lets every waiting take go. A take
    whose ``stop`` turns true returns early, raising nothing (its caller checks ``stop``); the turn it
    took is not given back (its bytes count as read).

    The lock guards the schedule alone: nothing but ``clock`` is called under it and no thread sleeps
    holding it (a leaf lock). With no cap, ``take`` returns without taking it."""

    BURST = 0.05  # seconds

    def __init__(self, rate=0, clock=time.monotonic, sleep=time.sleep):
        self._rate = _checked_rate(rate)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = float("-inf")

    @property
    def rate(self):
        return self._rate

    def set_rate(self, rate):
        rate = _checked_rate(rate)
        with self._lock:
            now = self._clock()
            if self._rate and rate and self._next > now:
                self._next = now + (self._next - now) * self._rate / rate
            self._rate = rate

    def take(self, n, stop=None):
        """Wait until ``n`` more bytes may be read (or ``stop()`` is true: looked at every THROTTLE_POLL
        seconds at least while waiting)."""
        rate = self._rate
        if not rate or n <= 0:
            return
        with self._lock:
            now = self._clock()
            self._next = max(self._next, now - self.BURST) + n / rate
            until = self._next
        while True:
            now = self._clock()
            if now >= until or (stop is not None and stop()):
                return
            current = self._rate
            if current != rate:  # set_rate: the rest of the wait at the new rate
                if not current:
                    return
                until = now + (until - now) * rate / current
                rate = current
                continue
            self._sleep(min(THROTTLE_POLL, until - now))


def _throttled_piece(rate):
    return max(THROTTLE_MIN_PIECE, min(THROTTLE_MAX_PIECE, rate // 8))


class CdnManager:
    """S3 operations with the downloader and uploader clients (injected, or built from a CdnConfig).

    ``speed_limit`` (bytes a second; 0: off) and ``speed_time`` (seconds) are the progress rule of
    ``fill``; ``resumes`` and ``resume_backoff`` how a transfer that broke off is resumed; ``throttle``
    the process's bandwidth cap on downloads (a Throttle shared by every CdnManager; None: no cap)."""

    def __init__(self, config=None, *, download_client=None, upload_client=None, chunk_size=CHUNK_SIZE,
                 part_size=UPLOAD_PART, resumes=CDN_RESUMES, resume_backoff=CDN_RESUME_BACKOFF,
                 speed_limit=SPEED_LIMIT, speed_time=SPEED_TIME, throttle=None):
        if download_client is None or upload_client is None:
            if config is None:
                raise ValueError("a CdnConfig or both clients are required")
        if speed_limit < 0 or (speed_limit and not speed_time > 0):
            raise ValueError("speed_limit must be 0 (off) or more, with a speed_time above 0")
        self._download = download_client or config.client("downloader")
        self._upload = upload_client or config.client("uploader")
        self.chunk_size = chunk_size
        self.part_size = part_size
        self.resumes = resumes
        self.resume_backoff = resume_backoff
        self.speed_limit = int(speed_limit)
        self.speed_time = float(speed_time)
        self.throttle = throttle

    def head(self, bucket, key):
        what = f"{bucket}/{key}"
        try:
            r = self._download.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            log.debug("HEAD %s failed", what, exc_info=True)
            raise _map_client_error(exc, what) from exc
        except BotoCoreError as exc:
            log.debug("HEAD %s failed", what, exc_info=True)
            raise _unreachable(exc) from exc
        except ValueError as exc:  # botocore could not parse a header of the answer (a size, no number)
            log.debug("HEAD %s failed", what, exc_info=True)
            raise UpstreamError(f"the CDN's answer for {what} is not valid: {type(exc).__name__}") from exc
        return ObjectInfo(r.get("ContentLength"), r.get("ETag"), what)

    def _get(self, bucket, key, etag, long long first, long long end):
        """A ranged GET of bytes ``first``..``end`` pinned to ``etag``. botocore has retried a request that
        failed (CDN_ATTEMPTS in all): a failure here is final."""
        try:
            return self._download.get_object(Bucket=bucket, Key=key, IfMatch=etag,
                                             Range=f"bytes={first}-{end - 1}")
        except ClientError as exc:
            log.debug("GET %s/%s at %d failed", bucket, key, first, exc_info=True)
            raise _map_client_error(exc, f"{bucket}/{key}") from exc
        except BotoCoreError as exc:
            log.debug("GET %s/%s at %d failed", bucket, key, first, exc_info=True)
            raise _unreachable(exc) from exc
        except ValueError as exc:
            log.debug("GET %s/%s at %d failed", bucket, key, first, exc_info=True)
            raise UpstreamError(
                f"the CDN's answer for {bucket}/{key} is not valid: {type(exc).__name__}"
            ) from exc

    def fill(self, bucket, key, info, buf, start=0, end=None, stop=None):
        """Read bytes ``start``..``end`` of the object into ``buf``, one buffer at a time: each step yields
        how many bytes ``buf`` holds (all of it, but at the end), to be used before the next step. A caller
        that ``send``s a buffer (of the same size) has the next step read into that one instead.

        Where botocore has nothing to check in the body (no checksum came with it), the bytes go from the
        socket straight into ``buf``: no chunk objects, no copies. A transfer that breaks off is resumed
        from the first byte missing, pinned to ``info.etag``, so a resumed download can never splice two
        versions of an object; at most ``resumes`` times, the n-th after a random wait of up to
        ``resume_backoff * 2 ** (n - 1)`` seconds.

        The progress rule: a body that brings in less than ``speed_limit`` bytes a second over a window of
        ``speed_time`` seconds is dropped (the watchdog shuts its socket down) and resumed the same way;
        when the last resume was dropped so, the transfer is an UpstreamTimeout. A trickle is so dropped
        within two windows of its start. The time the caller holds a step (between a yield and the next
        step) is no part of any window, nor are the bytes the connection brought in meanwhile. Progress
        is what the kernel received on the connection (TCP_INFO), so a link at the limit or faster is
        never dropped, and the reads stay whole buffers. A body whose connection cannot be asked so (a test
        double that is no socket) is read in pieces of an eighth of a window's bytes and judged at their
        ends: a link at the limit is still never dropped, one below 7/8 of it always is.

        The bandwidth cap: with a ``throttle`` whose rate is above 0, each read first waits its turn
        (``throttle.take`` of the bytes it is about to read), and reads are pieces of an eighth of a
        second's bytes (64 KiB to 1 MiB); without one, they stay whole buffers. The wait is no part of any
        window, as a held step is not: a cap below ``speed_limit`` never gets a transfer dropped.

        ``stop``, when given, is asked (a callable, taking no lock) at the end of each piece, at each
        window's end, while waiting for the cap and before each resume: once true, the transfer gives up
        with an UpstreamError (the caller's download has failed).
        """
        end = info.size if end is None else end
        what = f"{bucket}/{key}"
        cdef long long pos = start  # the object offset of buf[0]
        cdef Py_ssize_t n = 0  # bytes in buf, not yet handed out
        cdef Py_ssize_t want, got, step
        cdef Py_ssize_t piece = len(buf)
        cdef int resumes = 0
        throttle = self.throttle
        while pos + n < end:
            r = self._get(bucket, key, info.etag, pos + n, end)
            body = r["Body"]
            asked = end - pos - n
            cut = broke = None  # why the body broke off, when it did
            transfer = None
            try:
                if r.get("ContentLength", asked) != asked:
                    raise IntegrityError(f"the CDN answered a ranged GET of {bucket}/{key} with "
                                         f"{r.get('ContentLength')} bytes instead of {asked}")
                sock = _socket_reader(body)
                if self.speed_limit:
                    transfer = _Transfer(self.speed_limit, self.speed_time, _socket_of(body), stop)
                    piece = transfer.piece or len(buf)
                    watchdog.watch(transfer)
                while pos + n < end:
                    want = min(len(buf), end - pos)
                    step = min(want, n + piece)
                    rate = throttle.rate if throttle is not None else 0
                    if rate:
                        step = min(step, n + _throttled_piece(rate))
                        if transfer is not None:
                            watchdog.pause(transfer)
                        throttle.take(step - n, stop)
                        if transfer is not None:
                            watchdog.resume(transfer)
                        if stop is not None and stop():
                            raise UpstreamError(f"the CDN transfer of {what} was stopped")
                    if sock is not None:
                        got = sock.readinto(buf[n:step])
                    else:
                        data = body.read(step - n)
                        got = len(data)
                        buf[n:n + got] = data
                    n += got
                    if transfer is not None:
                        transfer.got += got
                    if n == want:
                        if transfer is not None:
                            watchdog.pause(transfer)
                        other = yield n
                        if transfer is not None:
                            watchdog.resume(transfer)
                        if other is not None:  # the caller goes on in another buffer of the same size
                            buf = other
                        pos += n
                        n = 0
                    elif not got:
                        break
                    if transfer is not None and transfer.dropped:
                        break
                    if stop is not None and stop():
                        raise UpstreamError(f"the CDN transfer of {what} was stopped")
                if transfer is not None:
                    watchdog.end(transfer)  # before the read below, which may hand the connection back
                if pos + n < end:
                    cut = "it ended early"
                elif transfer is not None and transfer.dropped:
                    pass  # all in, as its socket was shut down: it is closed below, never reused
                elif (body if sock is None else body._raw_stream).read(1):  # also frees the connection
                    raise IntegrityError(f"the CDN sent more bytes than asked of {bucket}/{key}")
            except STREAM_ERRORS as exc:
                log.debug("GET %s broke off at %d", what, pos + n, exc_info=True)
                cut, broke = type(exc).__name__, exc
            finally:
                if transfer is not None:
                    watchdog.end(transfer)
                body.close()
            if pos + n < end:
                if stop is not None and stop():
                    raise UpstreamError(f"the CDN transfer of {what} was stopped") from broke
                slow = transfer is not None and transfer.dropped
                resumes += 1
                if resumes > self.resumes:
                    if slow:
                        raise UpstreamTimeout(f"the CDN transfer of {what} made less than {self.speed_limit} "
                                              f"bytes/s for {self.speed_time:g} s") from broke
                    raise UpstreamError(f"the CDN transfer of {what} kept breaking off") from broke
                if slow:
                    cut = f"less than {self.speed_limit} bytes/s for {self.speed_time:g} s"
                log.warning("GET %s broke off at %d of %d (%s): resuming (%d of %d)", what, pos + n, end, cut,
                            resumes, self.resumes)
                time.sleep(random.random() * self.resume_backoff * 2 ** (resumes - 1))

    def part_upload(self, bucket, key, path):
        """A PartUpload of ``path`` (still being written) to ``bucket/key`` with the uploader identity."""
        return PartUpload(self, bucket, key, path, self.part_size)

    def upload_file(self, bucket, key, path):
        """Upload a local file (multipart when large) with the uploader identity; returns the new ETag."""
        # Ten parts in flight: a 1 GiB upload to SeaweedFS ran at 210 MiB/s, against 187 with four.
        config = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024,
                                max_concurrency=10)
        try:
            try:
                self._upload.upload_file(path, bucket, key, Config=config)
            except boto3.exceptions.S3UploadFailedError as exc:
                cause = exc.__cause__ or exc.__context__
                if not isinstance(cause, ClientError) or _error_code(cause) != "NoSuchBucket":
                    raise
                _create_bucket(self._upload, bucket)
                self._upload.upload_file(path, bucket, key, Config=config)
            return self.head(bucket, key).etag
        except ClientError as exc:
            log.debug("upload of %s/%s failed", bucket, key, exc_info=True)
            raise _map_client_error(exc, f"{bucket}/{key}") from exc
        except (BotoCoreError, boto3.exceptions.S3UploadFailedError) as exc:
            log.debug("upload of %s/%s failed", bucket, key, exc_info=True)
            raise UpstreamError(f"the CDN upload of {bucket}/{key} failed ({type(exc).__name__})") from exc
        except OSError as exc:  # reading the staged file
            log.debug("upload of %s/%s failed", bucket, key, exc_info=True)
            raise storage_error(exc, "the upload") from exc


class PartUpload:
    """A big part sent to the CDN while it is still being written to ``path``: a multipart upload whose
    parts (``part_size`` bytes, read back from the file) go out as soon as they are whole, up to
    ``concurrency`` at once, so the upload overlaps the encryption. ``written(n)`` tells how far the file is
    written (and flushed); ``finish(size)`` sends the rest and completes it (the object changes only
    then); ``abort`` drops the parts.
    """

    def __init__(self, manager, bucket, key, path, part_size=UPLOAD_PART, concurrency=UPLOAD_CONCURRENCY):
        self._client, self.bucket, self.key, self._path = manager._upload, bucket, key, path
        self._part_size = part_size
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="cdn-part")
        self._room = threading.Semaphore(concurrency)  # parts read into memory and not yet sent
        self._parts = []  # futures of (number, ETag)
        self._sent = 0  # bytes handed to parts
        self._id = None
        self._fd = -1

    def _call(self, what, call, **kw):
        try:
            return call(Bucket=self.bucket, Key=self.key, **kw)
        except ClientError as exc:
            log.debug("upload of %s/%s failed at %s", self.bucket, self.key, what, exc_info=True)
            raise _map_client_error(exc, f"{self.bucket}/{self.key}") from exc
        except BotoCoreError as exc:
            log.debug("upload of %s/%s failed at %s", self.bucket, self.key, what, exc_info=True)
            raise UpstreamError(f"the CDN upload of {self.bucket}/{self.key} failed at {what} "
                                f"({type(exc).__name__})") from exc

    def _start(self):
        try:
            self._id = self._call("its start", self._client.create_multipart_upload)["UploadId"]
        except NotFound:  # no such bucket yet
            _create_bucket(self._client, self.bucket)
            self._id = self._call("its start", self._client.create_multipart_upload)["UploadId"]
        try:
            self._fd = os.open(self._path, os.O_RDONLY)
        except OSError as exc:
            raise storage_error(exc, "the upload") from exc

    def written(self, long long size):
        """The file holds ``size`` bytes: send every whole part not sent yet (waits while ``concurrency``
        parts are in flight, which slows the writer down to the CDN's pace)."""
        while size - self._sent >= self._part_size:
            self._send(self._part_size)

    def _send(self, long long n):
        if self._id is None:
            self._start()
        for done in [f for f in self._parts if f.done()]:
            done.result()  # a failed part fails the upload now, not at the end
        self._room.acquire()
        try:
            data = os.pread(self._fd, n, self._sent)
            if len(data) != n:
                raise StorageError(f"the upload's staging file ended early at {self._sent + len(data)}")
        except OSError as exc:
            self._room.release()
            raise storage_error(exc, "the upload") from exc
        except BaseException:
            self._room.release()
            raise
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._part, number, data))
        self._sent += n

    def _part(self, number, data):
        try:
            r = self._call(f"part {number}", self._client.upload_part, UploadId=self._id, PartNumber=number,
                           Body=data)
            return number, r["ETag"]
        finally:
            self._room.release()

    def finish(self, long long size):
        """Send the rest (``size`` bytes in all) and complete the upload; returns the object's ETag."""
        if self._id is None:  # never a whole part: one PUT
            try:
                return self._put()
            except NotFound:  # no such bucket yet
                _create_bucket(self._client, self.bucket)
                return self._put()
        if size > self._sent:
            self._send(size - self._sent)
        parts = [f.result() for f in self._parts]
        r = self._call("its completion", self._client.complete_multipart_upload, UploadId=self._id,
                       MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]})
        self._id = None
        self.close()
        return r["ETag"]

    def _put(self):
        try:
            f = open(self._path, "rb")
        except OSError as exc:
            raise storage_error(exc, "the upload") from exc
        with f:
            return self._call("its PUT", self._client.put_object, Body=f)["ETag"]

    def abort(self):
        """Drop the parts sent so far (the object on the CDN stays as it was)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._id is not None:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._id)
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not abort the upload of %s/%s (%s)", self.bucket, self.key,
                            type(exc).__name__)
            self._id = None
        self.close()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _create_bucket(client, bucket):
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            log.debug("creating the bucket %s failed", bucket, exc_info=True)
            raise _map_client_error(exc, bucket) from exc
    except BotoCoreError as exc:
        log.debug("creating the bucket %s failed", bucket, exc_info=True)
        raise UpstreamError(f"the CDN could not create the bucket {bucket} ({type(exc).__name__})") from exc


def _socket_reader(body):
    """The HTTP response under a botocore body, to read it straight into a buffer; None when botocore must
    read the body itself (a checksum to validate as it goes) or the body is not urllib3's (test doubles)."""
    if type(body) is not StreamingBody:
        return None
    fp = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    return fp if isinstance(fp, http.client.HTTPResponse) else None


def _socket_of(body):
    """The socket under a botocore body (plain, or one that validates a checksum), for the watchdog to shut
    down; None for a body that is no socket's (test doubles: judged at the ends of their pieces only)."""
    fp = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    if not isinstance(fp, http.client.HTTPResponse):
        return None
    sock = getattr(getattr(getattr(fp, "fp", None), "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _tcp_received(sock):
    """How many bytes the kernel has received on ``sock``'s TCP connection (read or not); None where it
    does not tell (not Linux, a kernel before 4.1)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_BYTES_RECEIVED + 8)
    if len(info) < TCP_BYTES_RECEIVED + 8:
        return None
    return struct.unpack_from("=Q", info, TCP_BYTES_RECEIVED)[0]


class _Transfer:
    """One GET's body under the progress rule. A window is ``seconds`` long, and what the connection brings
    in during it must come to ``quota`` bytes. What it brought in is the kernel's count (``kernel``), or the
    bytes read (``got``, written by the reading thread alone) less a piece, since those count once their
    piece is in. The window, the pause, ``dropped`` and ``ended`` change under the watchdog's lock."""

    def __init__(self, limit, seconds, sock, stop):
        self.sock = sock
        self.kernel = False
        if sock is not None and hasattr(socket, "TCP_INFO"):
            try:
                self.kernel = _tcp_received(sock) is not None
            except OSError:
                pass
        want = int(limit * seconds)
        self.piece = None if self.kernel else max(1, min(MAX_PIECE, want // PIECES_PER_WINDOW))
        self.quota = want if self.kernel else want - self.piece
        self.seconds = seconds
        self.stop = stop
        self.got = 0
        self.mark = self.received()  # what it had brought in when the window began
        self.excluded = 0  # brought in while paused, in this window
        self.deadline = time.monotonic() + seconds  # when the window ends
        self.paused_at = None  # while the caller holds a step: since when
        self.paused_mark = 0  # and what it had brought in then
        self.parked = False  # out of the heap while paused: resume puts it back
        self.dropped = False
        self.ended = False

    def received(self):
        """What the connection has brought in so far (only while the transfer has not ended)."""
        if self.kernel:
            try:
                return _tcp_received(self.sock)
            except OSError:  # the connection is gone: the read that follows tells
                return self.mark + self.excluded
        return self.got

    def judge(self, now):
        """The watchdog, under its lock, at the end of the window (or later): drop the transfer, or open the
        next window. The next time to judge it, or None."""
        if self.ended or self.dropped:
            return None
        if self.paused_at is not None:
            self.parked = True
            return None
        if self.deadline > now:  # moved on by a pause
            return self.deadline
        received = self.received()
        if received - self.mark - self.excluded < self.quota or (self.stop is not None and self.stop()):
            self.dropped = True
            try:
                # socket.socket's own shutdown, also for an SSLSocket (whose shutdown would drop its TLS
                # state under the reading thread): the blocked read returns, and nothing else is touched.
                if self.sock is not None:
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass  # closed already
            return None
        self.mark, self.excluded = received, 0
        self.deadline = now + self.seconds
        return self.deadline


class _Watchdog:
    """The one thread that ends the windows of every transfer: a heap of (deadline, n, transfer), each
    transfer in it at most once."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap = []
        self._order = itertools.count()
        self._thread = None

    def _push(self, transfer, deadline):
        heapq.heappush(self._heap, (deadline, next(self._order), transfer))
        if self._heap[0][2] is transfer:
            self._cond.notify()

    def watch(self, transfer):
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="cdn-watchdog")
                self._thread.start()
            self._push(transfer, transfer.deadline)

    def pause(self, transfer):
        """The caller holds a step: this time, and what the connection brings in meanwhile, are no part of
        the window."""
        with self._cond:
            transfer.paused_at = time.monotonic()
            transfer.paused_mark = transfer.received()

    def resume(self, transfer):
        with self._cond:
            if transfer.paused_at is None:
                return
            transfer.deadline += time.monotonic() - transfer.paused_at
            transfer.excluded += transfer.received() - transfer.paused_mark
            transfer.paused_at = None
            if transfer.parked and not (transfer.ended or transfer.dropped):
                transfer.parked = False
                self._push(transfer, transfer.deadline)

    def end(self, transfer):
        """The body is done with (read, broken off or dropped): never judged again, its socket never touched
        again (it may go back to the pool and serve another request)."""
        with self._cond:
            transfer.ended = True
            transfer.sock = None

    def _run(self):
        with self._cond:
            while True:
                if not self._heap:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                deadline, _, transfer = self._heap[0]
                if deadline > now:
                    self._cond.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                try:
                    later = transfer.judge(now)
                except Exception:  # noqa: BLE001 - a caller's stop() that fails must not end the watchdog
                    log.exception("judging a CDN transfer failed")
                    later = None
                if later is not None:
                    self._push(transfer, later)


watchdog = _Watchdog()
