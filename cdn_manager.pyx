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
"""

import http.client
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.response import StreamingBody
from urllib3.exceptions import HTTPError as Urllib3Error

from constants import CDN_ATTEMPTS, CDN_RESUME_BACKOFF, CDN_RESUMES, CHUNK_SIZE
from errors import IntegrityError, NotFound, StorageError, UpstreamError, storage_error

log = logging.getLogger("loader.cdn")

# Errors while a body streams in that a ranged GET from the current offset can cure.
STREAM_ERRORS = (BotoCoreError, Urllib3Error, http.client.HTTPException, OSError)
# Uploads: parts of this size, this many in flight (in memory) at once.
UPLOAD_PART = 16 * 1024 * 1024
UPLOAD_CONCURRENCY = 4


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
    _s3_client(endpoint_url="http://127.0.0.1:9", aws_access_key_id="warm-up", aws_secret_access_key="warm-up",
               region_name="us-east-1").close()


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
        return cls(str(data["host"]),
                   (str(data["downloader_access_key"]), str(data["downloader_access_secret"])),
                   (str(data["uploader_access_key"]), str(data["uploader_access_secret"])),
                   str(data.get("region") or "us-east-1"))

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
        return _s3_client(endpoint_url=self.host, aws_access_key_id=key, aws_secret_access_key=secret,
                          region_name=self.region, config=config)

    def __repr__(self):
        return f"CdnConfig(host={self.host!r}, region={self.region!r})"


def _error_code(exc):
    return str(exc.response.get("Error", {}).get("Code", ""))


def _map_client_error(exc, what):
    code = _error_code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
        return NotFound(f"no such object on the CDN: {what}")
    if code in ("PreconditionFailed", "412") or status == 412:
        return UpstreamError(f"the CDN object changed during the transfer: {what}")
    return UpstreamError(f"the CDN answered {status or code} for {what}")


class ObjectInfo:
    def __init__(self, size, etag):
        self.size = int(size)
        self.etag = etag


class CdnManager:
    """S3 operations with the downloader and uploader clients (injected, or built from a CdnConfig)."""

    def __init__(self, config=None, *, download_client=None, upload_client=None, chunk_size=CHUNK_SIZE,
                 part_size=UPLOAD_PART, resumes=CDN_RESUMES, resume_backoff=CDN_RESUME_BACKOFF):
        if download_client is None or upload_client is None:
            if config is None:
                raise ValueError("a CdnConfig or both clients are required")
        self._download = download_client or config.client("downloader")
        self._upload = upload_client or config.client("uploader")
        self.chunk_size = chunk_size
        self.part_size = part_size
        self.resumes = resumes
        self.resume_backoff = resume_backoff

    def head(self, bucket, key):
        try:
            r = self._download.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            log.debug("HEAD %s/%s failed", bucket, key, exc_info=True)
            raise _map_client_error(exc, f"{bucket}/{key}") from exc
        except BotoCoreError as exc:
            log.debug("HEAD %s/%s failed", bucket, key, exc_info=True)
            raise UpstreamError(f"the CDN is unreachable ({type(exc).__name__})") from exc
        return ObjectInfo(r["ContentLength"], r["ETag"])

    def fill(self, bucket, key, info, buf, start=0, end=None):
        """Read bytes ``start``..``end`` of the object into ``buf``, one buffer at a time: each step yields
        how many bytes ``buf`` holds (all of it, but at the end), to be used before the next step. A caller
        that ``send``s a buffer (of the same size) has the next step read into that one instead.

        Where botocore has nothing to check in the body (no checksum came with it), the bytes go from the
        socket straight into ``buf``: no chunk objects, no copies. A transfer that breaks off is resumed
        from the first byte missing, pinned to ``info.etag``, so a resumed download can never splice two
        versions of an object; at most ``resumes`` times, the n-th after a random wait of up to
        ``resume_backoff * 2 ** (n - 1)`` seconds.
        """
        end = info.size if end is None else end
        cdef long long pos = start  # the object offset of buf[0]
        cdef Py_ssize_t n = 0  # bytes in buf, not yet handed out
        cdef Py_ssize_t want, got
        cdef int resumes = 0
        while pos + n < end:
            try:
                # botocore has retried a request that failed (CDN_ATTEMPTS in all): a failure here is final.
                r = self._download.get_object(Bucket=bucket, Key=key, IfMatch=info.etag,
                                              Range=f"bytes={pos + n}-{end - 1}")
            except ClientError as exc:
                log.debug("GET %s/%s at %d failed", bucket, key, pos + n, exc_info=True)
                raise _map_client_error(exc, f"{bucket}/{key}") from exc
            except BotoCoreError as exc:
                log.debug("GET %s/%s at %d failed", bucket, key, pos + n, exc_info=True)
                raise UpstreamError(f"the CDN is unreachable ({type(exc).__name__})") from exc
            body = r["Body"]
            asked = end - pos - n
            cut = broke = None  # why the body broke off, when it did
            try:
                if r.get("ContentLength", asked) != asked:
                    raise IntegrityError(f"the CDN answered a ranged GET of {bucket}/{key} with "
                                         f"{r.get('ContentLength')} bytes instead of {asked}")
                sock = _socket_reader(body)
                while pos + n < end:
                    want = min(len(buf), end - pos)
                    if sock is not None:
                        got = sock.readinto(buf[n:want])
                    else:
                        data = body.read(want - n)
                        got = len(data)
                        buf[n:n + got] = data
                    if not got:
                        break
                    n += got
                    if n == want:
                        other = yield n
                        if other is not None:  # the caller goes on in another buffer of the same size
                            buf = other
                        pos += n
                        n = 0
                if pos + n < end:
                    cut = "it ended early"
                elif (body if sock is None else body._raw_stream).read(1):  # also frees the connection
                    raise IntegrityError(f"the CDN sent more bytes than asked of {bucket}/{key}")
            except STREAM_ERRORS as exc:
                log.debug("GET %s/%s broke off at %d", bucket, key, pos + n, exc_info=True)
                cut, broke = type(exc).__name__, exc
            finally:
                body.close()
            if pos + n < end:
                resumes += 1
                if resumes > self.resumes:
                    raise UpstreamError(f"the CDN transfer of {bucket}/{key} kept breaking off") from broke
                log.warning("GET %s/%s broke off at %d of %d (%s): resuming (%d of %d)", bucket, key, pos + n,
                            end, cut, resumes, self.resumes)
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
                log.warning("could not abort the upload of %s/%s (%s)", self.bucket, self.key, type(exc).__name__)
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
