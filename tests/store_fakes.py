"""An in-memory Resource API and S3 client wrappers, for ModelStore and the cache against moto's S3; a load
held mid-download, and a hasher that records who hashed each block."""

import hashlib
import os
import threading

import heap
import security
from binary_split import ModelStore, small_size
from cdn_manager import CdnConfig, CdnManager
from devstack.wait import until
from errors import NotFound, NotLoggedIn, UpstreamError
from model_cache import BigPartCache
from user import User

MIB = 1024 * 1024
# The session's cdn.yaml: the stores make_store builds answer it with moto's S3.
YAML = """host: http://moto.invalid
downloader_access_key: dk
downloader_access_secret: ds-secret
uploader_access_key: uk
uploader_access_secret: us-secret
"""
OFFLINE_YAML = YAML.replace("http://moto.invalid", "http://127.0.0.1:1")  # a CDN where nothing listens


class FakeApi:
    """The Resource API as ModelStore sees it, in memory."""

    def __init__(self, roles=("ResourceUploader",)):
        self.user = User("1", "u@x", roles)
        self.store = {}
        self.refuse = set()  # names whose upload fails
        self.yaml = YAML

    def credentials(self):
        if self.user is None:
            raise NotLoggedIn()
        return object()

    def get_resource(self, folder, name):
        try:
            return self.store[(folder, name)]
        except KeyError:
            raise NotFound(f"no such resource: {folder}/{name}") from None

    def upload(self, folder, name, data):
        if name in self.refuse:
            raise UpstreamError(f"the Resource API answered 500 for {folder}/{name}")
        self.store[(folder, name)] = bytes(data)

    def cdn_yaml(self):
        return self.yaml


class WrappedClient:
    """Wraps an S3 client and records each GET's Range; the body of a GET whose Range starts with
    ``ranges`` (and that ``_takes``) is replaced by ``wrap(body)``."""

    def __init__(self, client, ranges="bytes="):
        self._c, self.ranges = client, ranges
        self.gets = []
        self.pins = []  # each GET's IfMatch
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._c, name)

    def get_object(self, **kw):
        with self._lock:
            self.gets.append(kw.get("Range"))
            self.pins.append(kw.get("IfMatch"))
            wrapped = kw.get("Range", "").startswith(self.ranges) and self._takes()
        r = self._c.get_object(**kw)
        if wrapped:
            r["Body"] = self.wrap(r["Body"])
        return r

    def _takes(self):
        return True


class RecordingClient(WrappedClient):
    """Records each GET's Range and IfMatch; the bodies pass as they are."""

    def _takes(self):
        return False


class CutAfter(WrappedClient):
    """The CDN's link goes down for good once it has sent ``allowed`` bytes of bodies in all (whatever the
    number of GETs): every read after that breaks off (ConnectionResetError), so a download fails after its
    first blocks."""

    def __init__(self, client, allowed):
        super().__init__(client)
        self.left = allowed

    def wrap(self, body):
        return _Rationed(body, self)


class _Rationed:
    def __init__(self, body, link):
        self._body, self._link = body, link

    def read(self, amt=None):
        with self._link._lock:
            n = self._link.left if amt is None else min(amt, self._link.left)
            self._link.left -= n
        if not n:
            raise ConnectionResetError("the link went down")
        return self._body.read(n)

    def close(self):
        self._body.close()


class EndAfter(WrappedClient):
    """The body of the first GET whose Range starts with ``ranges`` holds back its last bytes until
    ``event`` is set (the other GETs pass as they are)."""

    def __init__(self, client, event, ranges="bytes="):
        super().__init__(client, ranges)
        self._event = event
        self._held = False

    def _takes(self):
        held, self._held = self._held, True
        return not held

    def wrap(self, body):
        return _HeldEnd(body.read(), self._event)


class _HeldEnd:
    def __init__(self, data, event):
        self._data, self._event = data, event

    def read(self, amt=None):
        if amt is None or amt >= len(self._data):
            assert self._event.wait(30), "the event never came"
        data, self._data = self._data[:amt], self._data[amt:]
        return data

    def close(self):
        pass


class FlakyClient(WrappedClient):
    """The bodies of the first ``failures`` GETs (of those whose Range starts with ``ranges``) raise after
    ``after`` bytes."""

    def __init__(self, client, failures=0, after=0, end_early=False, ranges="bytes="):
        super().__init__(client, ranges)
        self.failures, self.after, self.end_early = failures, after, end_early

    def _takes(self):
        if self.failures <= 0:
            return False
        self.failures -= 1
        return True

    def wrap(self, body):
        return _Broken(body, self.after, self.end_early)


class _Broken:
    """A body that gives its first ``after`` bytes, then breaks off (or, ``end_early``, just ends)."""

    def __init__(self, body, after, end_early):
        self._data = body.read()[:after]
        self.end_early = end_early

    def read(self, amt=None):
        if self._data:
            data, self._data = self._data[:amt], self._data[amt:]
            return data
        if not self.end_early:
            raise ConnectionResetError("cut")
        return b""

    def close(self):
        pass


BLOCK = 64 * 1024  # the tests' block size: models of a few hundred KB span several blocks


PART = 5 * 1024 * 1024  # the smallest part S3 takes: uploads of a few MiB go in several parts


def make_store(
    tmp_path,
    s3,
    roles=("ResourceUploader",),
    download_client=None,
    upload_client=None,
    api=None,
    built=None,
    cache_options=None,
    memory=None,
    cdn_options=None,
    **options,
):
    """A ModelStore on a FakeApi (``api``, or a new one for ``roles``) and moto's S3 (``options``:
    max_upload, require_manifest...), its uploads sealed in BLOCK-sized blocks; the cache (``cache_options``:
    hasher, config, download, opener...) keeps format-1 parts in BLOCK-sized blocks too. The store's loads
    and the cache's downloads share one memory budget: ``memory``, or a heap.Budget of their own (so no
    test's buffers count in another's). The store builds its CDN clients for the session's cdn.yaml as it
    does in the service: moto's S3 for YAML, real clients for any other; ``built`` gets each cdn.yaml it
    built clients for; ``cdn_options`` are the CdnManager's (resumes...). A store made again on the same
    ``tmp_path`` finds the cache as a restarted loader does."""
    api = api or FakeApi(roles)
    memory = memory or heap.Budget(160 * MIB)
    cache = BigPartCache(tmp_path / "cache", block_size=BLOCK, **{"buffers": memory, **(cache_options or {})})
    cdn = CdnManager(
        download_client=download_client or s3,
        upload_client=upload_client or s3,
        chunk_size=64 * 1024,
        part_size=PART,
        resume_backoff=0,
        **(cdn_options or {}),
    )

    def cdn_factory(text):
        if built is not None:
            built.append(text)
        return cdn if text == YAML else CdnManager(config=CdnConfig.from_yaml(text))

    options.setdefault("block_size", BLOCK)
    options.setdefault("memory", memory)
    return ModelStore(api, cache, cdn_factory=cdn_factory, **options), api, cache


def load(store, name="m.bin", folder="models"):
    plaintext = store.load(folder, name)
    data = b"".join(bytes(c) for c in plaintext)
    assert plaintext.size == len(data)  # known before the first byte, and exact
    return data


def publish(s3, api, data, name="m.bin"):
    blob = security.encrypt(security.resource_key(), data)
    k = small_size(len(blob))
    api.store[("models", name + ".small")] = blob[:k]
    s3.put_object(Bucket="models", Key=name + ".big", Body=blob[k:])
    return blob[k:]


def go_offline(api):
    """From now on the session's cdn.yaml names a CDN where nothing listens (127.0.0.1:1)."""
    api.yaml = OFFLINE_YAML


def ended(cache, timeout=10):
    """Wait until every download of ``cache`` has ended for good. ``settle`` returns once each is committed
    or failed; a failed one then still joins its fetchers, keeps or removes its part and record, and gives
    its first buffer back (its thread's ``_end``), which the cache books in ``_finished``."""
    assert cache.settle(timeout)
    until(lambda: not cache._running, timeout, "a download never ended")


class RecordingSha256:
    """hashlib.sha256 that records the name of the thread that hashed each block: injected as the cache's
    hasher, it shows who took each block's digest, and how often."""

    def __init__(self, calls):
        self._h, self._calls = hashlib.sha256(), calls

    def update(self, data):
        self._calls.append(threading.current_thread().name)
        self._h.update(data)

    def digest(self):
        return self._h.digest()


def recording_store(tmp_path, s3, download_client=None):
    calls = []
    hashing = {"hasher": lambda: RecordingSha256(calls)}
    store, api, cache = make_store(tmp_path, s3, download_client=download_client, cache_options=hashing)
    return store, api, cache, calls


def block_digests(big, block_size=64 * 1024):
    return [hashlib.sha256(big[i : i + block_size]).hexdigest() for i in range(0, len(big), block_size)]


def fetchers_of(key="models/m.bin.big"):
    """The name prefix of the fetcher threads of a download of ``key``."""
    return f"cdn-{key}-"


def _streaming(tmp_path, s3, size=3 * MIB):
    """A download held in flight while a load streams it: the segment from the object's start holds back its
    last block until ``release`` is set (the object's end comes first, in a segment of its own, for the
    check before the answer), and the load has taken its first block. Returns (store, api, cache, chunks,
    big, data, first, calls, release) once every block but that last one is in."""
    release = threading.Event()
    store, api, cache, calls = recording_store(tmp_path, s3, EndAfter(s3, release, "bytes=0-"))
    data = os.urandom(size)
    big = publish(s3, api, data)
    plaintext = store.load("models", "m.bin")
    chunks = iter(plaintext)
    first = bytes(next(chunks))
    download = cache.downloading("models", "m.bin.big")
    until(lambda: download.bytes_done == len(big) - BLOCK)
    assert not download.done
    return store, api, cache, chunks, big, data, first, calls, release
