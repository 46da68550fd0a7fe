"""An in-memory Resource API and S3 client wrappers, for ModelStore and the cache against moto's S3."""

import threading

import security
from binary_split import ModelStore, small_size
from cdn_manager import CdnConfig, CdnManager
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
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._c, name)

    def get_object(self, **kw):
        with self._lock:
            self.gets.append(kw.get("Range"))
            wrapped = kw.get("Range", "").startswith(self.ranges) and self._takes()
        r = self._c.get_object(**kw)
        if wrapped:
            r["Body"] = self.wrap(r["Body"])
        return r

    def _takes(self):
        return True


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
    **options,
):
    """A ModelStore on a FakeApi (``api``, or a new one for ``roles``) and moto's S3 (``options``:
    max_upload, require_manifest...), its uploads sealed in BLOCK-sized blocks; the cache (``cache_options``:
    hasher, hash_grace) keeps format-1 parts in BLOCK-sized blocks too. The store builds its CDN clients for
    the session's cdn.yaml as it does in the service: moto's S3 for YAML, real clients for any other;
    ``built`` gets each cdn.yaml it built clients for."""
    api = api or FakeApi(roles)
    cache = BigPartCache(tmp_path / "cache", block_size=BLOCK, **(cache_options or {}))
    cdn = CdnManager(
        download_client=download_client or s3,
        upload_client=upload_client or s3,
        chunk_size=64 * 1024,
        part_size=PART,
        resume_backoff=0,
    )

    def cdn_factory(text):
        if built is not None:
            built.append(text)
        return cdn if text == YAML else CdnManager(config=CdnConfig.from_yaml(text))

    options.setdefault("block_size", BLOCK)
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
