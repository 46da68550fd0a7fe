# cython: language_level=3, embedsignature=True
"""The binary split: models stored as a small part (Resource API) and a big part (CDN), sealed by a
manifest on the Resource API (contract sections 2 and 7). Loads and uploads of models; the Docker unlock is
``unlock.pyx``'s.

Every upload is sealed (format 2): a data key of its own, the blob split as ever, and the manifest as the
commit point. A load fetches the manifest with the small part, and nothing leaves the loader that the
manifest does not vouch for. Models uploaded before (format 1: no manifest) still load under the resource
key, with a warning, unless ``require_manifest`` refuses them. A manifest a publisher signed (section 9)
is read only once a key the device trusts verifies it (``signing.Trust``); uploads sign theirs when the store
has a ``publisher``.
"""

import json
import logging
import os
import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from itertools import chain

import heap
import security
from cdn_manager import CdnConfig, CdnManager, ObjectInfo
from constants import (BIG_SUFFIX, BUCKET_PATTERN, MANIFEST_BLOCK_SIZE, MANIFEST_SUFFIX, NAME_PATTERN,
                       READ_AHEAD, SMALL_SUFFIX, SPLIT_SMALL_MAX)
from errors import (BadRequest, DecryptionError, Forbidden, IntegrityError, LoaderError, NotFound,
                    PayloadTooLarge, StorageError, storage_error)
from manifest import Manifest, SealedParts, document, small_size
from model_cache import Expect
from signing import Trust, is_envelope

log = logging.getLogger("loader.split")

# Blocks of buffers a streaming load holds at most, reserved from the one memory budget (heap.buffers):
# the read-ahead ring (READ_AHEAD + 1), the decrypted chunks waiting to be sent (streaming.LOAD_AHEAD, 2), the
# one its worker decrypted and waits to hand over, and the one in the server's buffer for the client.
LOAD_BUFFERS = READ_AHEAD + 1 + 4

# Uploads are staged in a folder of the cache that no bucket can be named like (it starts with a dot).
STAGING = ".staging"

_NAME = re.compile(NAME_PATTERN)
_BUCKET = re.compile(BUCKET_PATTERN)


def validate_name(name):
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadRequest("invalid resource name: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def validate_folder(folder):
    # S3 also forbids ".." inside a bucket name.
    if (not isinstance(folder, str) or not _NAME.fullmatch(folder) or not _BUCKET.fullmatch(folder)
            or ".." in folder):
        raise BadRequest("invalid folder: use 3-63 lowercase letters, digits, '.' or '-' (an S3 bucket name)")
    return folder


class Plaintext:
    """A resource on its way out: its exact ``size``, known before the first byte, and its chunks."""

    def __init__(self, size, chunks):
        self.size = size
        self._chunks = chunks

    def __iter__(self):
        return iter(self._chunks)


class ModelStore:
    """Load and upload models over the split. ``api`` is a ResourceApi, ``cache`` a BigPartCache."""

    def __init__(self, api, cache, cdn_factory=None, max_upload=None, require_manifest=False,
                 block_size=MANIFEST_BLOCK_SIZE, memory=None, trust=None, publisher=None):
        self._api = api
        self.trust = Trust() if trust is None else trust  # the publishers a load accepts (section 9)
        self.publisher = publisher  # signs the manifests of uploads, when set
        self._memory = heap.buffers if memory is None else memory  # the buffers of every load and download
        self._cache = cache
        self._cdn_factory = cdn_factory or (lambda text: CdnManager(CdnConfig.from_yaml(text)))
        self._cdn_key = None
        self._cdn = None
        self._cdn_lock = threading.Lock()
        # The manifest and the small part are fetched side by side: a load waits for one round trip. As many
        # threads as loads may prepare at once (operations.LOAD_WORKERS): loads stuck on a slow Resource API
        # must not make the calls of the others queue behind theirs.
        self._calls = ThreadPoolExecutor(64, thread_name_prefix="api-call")
        self.max_upload = max_upload
        self.require_manifest = require_manifest
        self.block_size = block_size  # of the manifests uploads write (the contract's; tests use less)
        self.format1_loads = 0

    def stats(self):
        """The store's figures for /metrics (counts since start): its own and its ``trust``'s
        (``signing.Trust.stats``)::

            {"format1_loads": int,  # loads of resources without a manifest (format 1, unverified)
             "unsigned_manifest_loads": int, "signed_manifest_loads": int, "signature_refusals": int}
        """
        return {"format1_loads": self.format1_loads, **self.trust.stats()}

    def cdn(self):
        """The CDN manager for the session's cdn.yaml, rebuilt only when the configuration changes."""
        with self._cdn_lock:  # built once, also when loads (or prepare) ask for it together
            text = self._api.cdn_yaml()
            if text != self._cdn_key:
                self._cdn, self._cdn_key = self._cdn_factory(text), text
            return self._cdn

    def prepare(self):
        """Fetch the session's cdn.yaml and build the CDN clients ahead of the first load (after a login):
        that costs a few hundred milliseconds, which the first load then no longer waits for. A failure
        here is only logged, whatever it is (this runs on a thread of its own, which must not die with a
        traceback); the load that needs the CDN meets it again and reports it."""
        try:
            self.cdn()
        except LoaderError as exc:
            log.info("could not prepare the CDN clients yet (%s)", type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - a load meets it again, mapped by the CDN manager
            log.warning("could not prepare the CDN clients (%s)", type(exc).__name__)

    def load(self, folder, name):
        """Check everything that can fail early, then return the decrypted resource as a Plaintext.

        Before this returns, the small part and the big part's first block have been checked (and, for a
        format-1 part, the blob's last block decrypted), so a mismatch is still an error status. Every
        later block is checked before any plaintext that depends on it is handed out."""
        what, small, sealed = self._resolve(folder, name)
        big_key = name + BIG_SUFFIX
        if sealed is None:
            size, key, big = self._open_format1(folder, big_key, what, small)
        else:
            key = sealed.key

            def check(big_size, tail):
                # The verified last block's padding must give the manifest's size.
                if _plaintext_size(key, small, big_size, tail) != sealed.size:
                    raise IntegrityError(f"{what} decrypts to another size than its manifest says")

            _, big = self._cache.open(folder, big_key, self.cdn(), self._expect(what, small, sealed, check))
            size = sealed.size
        # Room for this load's buffers, waited for (never a failure): all loads and downloads together stay
        # within the one budget. Taken once the part is open (a download it starts has its own first
        # buffer by then, so the loads that hold room always have a download that moves); held until the
        # stream ends; a load refused before it streams gives it back at once.
        try:
            memory = self._memory.reserve(LOAD_BUFFERS * (self._cache.block_size if sealed is None
                                                          else sealed.block_size))
        except BaseException:
            big.close()
            raise
        try:
            chunks = self._decrypt(folder, big_key, key, small, _primed(big), size, memory)
        except BaseException:
            memory.release()
            raise
        plaintext = Plaintext(size, chunks)
        weakref.finalize(plaintext, memory.release)  # a load whose stream never started
        return plaintext

    def _resolve(self, folder, name):
        """``(what, small part, Manifest or None)`` of a resource, checked against each other."""
        validate_folder(folder)
        validate_name(name)
        self._api.credentials()
        what = f"{folder}/{name}"
        manifest = self._calls.submit(self._api.get_resource, folder, name + MANIFEST_SUFFIX)
        try:
            small = self._api.get_resource(folder, name + SMALL_SUFFIX)
        finally:
            wait([manifest])  # no call of this load outlives it (a later /login must find none under way)
        try:
            raw = manifest.result()
        except NotFound:
            raw = None
        if raw is None:
            if self.require_manifest:
                raise IntegrityError(f"{what} has no manifest (format 1), and REQUIRE_MANIFEST refuses that")
            if self.trust.require:
                self.trust.unsigned(what, "it has no manifest: format 1")
            return what, small, None
        doc = document(raw, what)
        if is_envelope(doc):
            doc = self.trust.open(doc, folder, name, what, lambda payload: document(payload, what))
        else:
            self.trust.unsigned(what)
        sealed = Manifest.from_document(doc, what)
        sealed.check_small(small, what)
        return what, small, sealed

    def seal(self, manifest, folder, name):
        """The bytes an upload stores as its manifest (a dict): the JSON, or the publisher's envelope."""
        if self.publisher is None:
            return json.dumps(manifest).encode("utf-8")
        return self.publisher.sign(manifest, folder, name)

    @staticmethod
    def _expect(what, small, sealed, check=None):
        return Expect(what, sealed.big_size(len(small)), sealed.blocks, sealed.identity, sealed.block_size,
                      check)

    def prefetch(self, folder, name):
        """Stage a resource's big part in the cache ahead of need (contract section 8.4): ``(200, status)``
        when it is cached already, ``(202, status)`` of the download started or joined."""
        what, small, sealed = self._resolve(folder, name)
        expect = Expect(what) if sealed is None else self._expect(what, small, sealed)
        return self._cache.prefetch(folder, name + BIG_SUFFIX, self.cdn(), expect)

    def resume_prefetches(self):
        """After a login: prefetch again what a restart interrupted, without an app asking again. Never
        raises: a prefetch that fails now is logged, and its part stays for the next try."""
        try:
            interrupted = self._cache.interrupted_prefetches()
        except OSError as exc:
            log.warning("could not look for interrupted prefetches: %s", exc.strerror)
            return
        for folder, key in interrupted:
            name = key[:-len(BIG_SUFFIX)] if key.endswith(BIG_SUFFIX) else key
            try:
                self.prefetch(folder, name)
                log.info("resumed the prefetch of %s/%s that a restart interrupted", folder, name)
            except LoaderError as exc:
                log.warning("could not resume the prefetch of %s/%s: %s", folder, name, exc.detail)
            except Exception as exc:  # noqa: BLE001 - runs on a thread of its own after a login
                log.warning("could not resume the prefetch of %s/%s (%s)", folder, name, type(exc).__name__)

    def _open_format1(self, folder, big_key, what, small):
        """(size, key, blocks) of a resource uploaded before manifests: under the resource key, checked
        only by its last block's padding."""
        log.warning("%s has no manifest: loading it as format 1, unverified", what)
        self.format1_loads += 1
        key = security.resource_key()

        def check(big_size, tail):
            # The blob's last block decrypts (else: wrong key, or a damaged or mismatched part) and its
            # padding gives the plaintext size before a byte is streamed.
            return _plaintext_size(key, small, big_size, tail)

        size, big = self._cache.open(folder, big_key, self.cdn(), Expect(what, check=check))
        return size, key, big

    def _decrypt(self, folder, big_key, key, small, big, long long size, memory):
        """The plaintext of ``small ‖ big``, which must come to ``size`` bytes (the manifest's, or the
        padding's): the last bytes are held back until that is certain. ``memory`` (the load's reservation
        of buffers) is released when the stream ends, however it ends."""
        try:
            yield from self._decrypted(folder, big_key, key, small, big, size)
        finally:
            big.close()
            memory.release()

    def _decrypted(self, folder, big_key, key, small, big, long long size):
        cdef long long sent = 0
        dec = security.Decryptor(key)
        try:
            for chunk in chain((small,), big):
                out = dec.update(chunk)
                sent += len(out)
                if sent > size:
                    break
                if len(out):
                    yield out
            last = dec.finalize() if sent <= size else b""
        except DecryptionError:
            # The stream was already on its way: drop the cache so the next load fetches afresh.
            self._cache.discard(folder, big_key)
            log.warning("%s/%s failed to decrypt: cache discarded", folder, big_key)
            raise
        except OSError as exc:  # the cache disk failed under the load
            raise storage_error(exc, f"{folder}/{big_key}") from exc
        if sent + len(last) != size:
            raise IntegrityError(f"{folder}/{big_key} decrypts to another size than its manifest says")
        if last:
            yield last

    def check_upload(self, name, folder=None):
        """Refuse an upload before its body is read: bad names, no session, a role that may not upload."""
        validate_name(name)
        if folder is not None:
            validate_folder(folder)
        self._api.credentials()
        user = self._api.user
        if user is None or not user.can_upload:
            raise Forbidden("this user's role may not upload (needs Admin, ResourceUploader or ApiAdmin)")

    def begin_upload(self, name, folder=None):
        """A staged upload: ``write`` plaintext chunks, then ``finish(folder)``; ``abort`` on failure. With
        the ``folder`` known from the start, the big part goes to the CDN while it is written."""
        self.check_upload(name, folder)
        try:
            part = self._cache.new_part(STAGING, name + BIG_SUFFIX)
        except OSError as exc:
            log.debug("staging %s failed", name, exc_info=True)
            raise storage_error(exc, "the upload") from exc
        cdn_upload = None if folder is None else self.cdn().part_upload(folder, name + BIG_SUFFIX, part)
        return StagedUpload(self, name, part, self.max_upload, folder, cdn_upload)

    def publish(self, folder, name, part, small, parts, manifest, cdn_upload=None):
        """Big part to the CDN, the small part, then the manifest to the API: the manifest is the commit
        point, so a load of ``name`` meanwhile is refused (its parts do not match the old manifest), never
        spliced. The big part then joins the cache; a failure there costs a download later, not the
        upload."""
        validate_folder(folder)
        big_key = name + BIG_SUFFIX
        if cdn_upload is not None:
            etag = cdn_upload.finish(parts.big_size)
        else:
            etag = self.cdn().upload_file(folder, big_key, part)
        self._cache.discard(folder, big_key)  # also a download of the old part still in flight
        self._api.upload(folder, name + SMALL_SUFFIX, small)
        self._api.upload(folder, name + MANIFEST_SUFFIX, manifest)
        try:
            _fsync_file(part)  # written through the page cache: most of it is on disk by now
            self._cache.commit(folder, big_key, part, ObjectInfo(parts.big_size, etag), parts.identity,
                               parts.blocks, parts.block_size)
            self._cache.fit(folder, big_key)  # within the disk budget
        except OSError as exc:
            log.warning("uploaded %s/%s, but could not keep it in the cache: %s", folder, name,
                        storage_error(exc, "it").detail)
        except StorageError as exc:
            log.warning("uploaded %s/%s, but could not keep it in the cache: %s", folder, name, exc.detail)


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plaintext_size(key, small, big_size, tail):
    return security.plaintext_size(key, len(small) + big_size, (small + tail)[-security.TAIL:])


def _primed(blocks):
    """``blocks`` with the first one already read and checked, so that a part refused at its first block
    is still an error status; the rest as they come."""
    try:
        first = next(blocks, None)
    except OSError as exc:  # the cache disk failed under the load's first block
        raise storage_error(exc, "the model's first block") from exc

    def rest():
        try:
            if first is not None:
                yield first
                yield from blocks
        finally:
            blocks.close()

    return rest()


class StagedUpload:
    """Encrypts a plaintext stream under a fresh data key into a staging ``.part`` file, keeping back the
    blob's first bytes until it is certain where the split falls, and hashing the parts for the manifest.
    Memory stays bounded by the chunk size."""

    def __init__(self, store, name, part, limit, folder=None, cdn_upload=None):
        self._store, self.name, self._part, self._limit = store, name, part, limit
        self._folder, self._cdn_upload = folder, cdn_upload
        self._key = security.data_key()
        self._enc = security.Encryptor(self._key)
        self._parts = SealedParts(store.block_size)
        self._head = bytearray()
        self._small = None
        self.size = 0
        self._blob_size = 0
        try:
            self._file = open(part, "wb")
        except OSError as exc:
            log.debug("staging %s failed", name, exc_info=True)
            raise storage_error(exc, "the upload") from exc

    def write(self, chunk):
        self.size += len(chunk)
        if self._limit is not None and self.size > self._limit:
            self.abort()
            raise PayloadTooLarge(f"the upload is larger than the configured maximum of {self._limit} bytes")
        self._emit(self._enc.update(chunk))

    def _emit(self, data):
        self._blob_size += len(data)
        if self._small is None:
            self._head += data
            # The blob is at least this long: once that gives the small part its cap, nothing that follows
            # changes where the split falls.
            k = small_size(len(self._head))
            if k < SPLIT_SMALL_MAX:
                return
            self._split(k)
            data, self._head = self._head[k:], None
        self._put(data)

    def _split(self, k):
        self._small = bytes(self._head[:k])
        self._parts.set_small(self._small)

    def _put(self, data):
        try:
            self._file.write(data)
            if self._cdn_upload is not None:
                self._file.flush()
        except OSError as exc:
            log.debug("staging %s failed", self.name, exc_info=True)
            self.abort()
            raise storage_error(exc, "the upload") from exc
        self._parts.update_big(data)
        if self._cdn_upload is not None:
            try:
                self._cdn_upload.written(self._parts.big_size)
            except LoaderError:
                self.abort()
                raise

    def finish(self, folder):
        """Seal the blob and publish it under ``folder``; returns the plaintext size."""
        try:
            validate_folder(folder)
            if self._cdn_upload is not None and folder != self._folder:
                self._cdn_upload.abort()  # named another folder at the end: sent as a whole, there
                self._cdn_upload = None
            self._emit(self._enc.finalize())
            if self._small is None:
                k = small_size(self._blob_size)
                self._split(k)
                self._put(self._head[k:])
            try:
                self._file.close()  # fsynced only once it is published: the CDN upload need not wait
            except OSError as exc:
                log.debug("staging %s failed", self.name, exc_info=True)
                raise storage_error(exc, "the upload") from exc
            manifest = self._store.seal(self._parts.document(self._key, self.size), folder, self.name)
            self._store.publish(folder, self.name, self._part, self._small, self._parts, manifest,
                                self._cdn_upload)
            self._cdn_upload = None
        finally:
            self.abort()
        log.info("uploaded %s/%s (%d bytes)", folder, self.name, self.size)
        return self.size

    def abort(self):
        """Drop the staging file, and the parts already sent (a no-op once it has been published). It runs
        on the way out of a failure, whose error is the one to report: a disk error here is only logged."""
        if self._cdn_upload is not None:
            self._cdn_upload.abort()
            self._cdn_upload = None
        self._parts.close()
        try:
            self._file.close()  # a full disk fails the flush of what is still buffered
        except OSError as exc:
            log.debug("closing the staging file of %s failed (%s)", self.name, exc.strerror)
        try:
            os.unlink(self._part)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove the staging file of %s: %s", self.name, exc.strerror)
