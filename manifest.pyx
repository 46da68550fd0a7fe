# cython: language_level=3, embedsignature=True
"""The manifest of a sealed split (format 2, contract section 7).

Every upload encrypts under a data key of its own and writes ``N.manifest`` to the Resource API after the
big and the small part: the data key, the sizes, and the SHA-256 of the small part, of the big part and
of each block of the big part. A load trusts nothing from the CDN or the cache that the manifest does not
vouch for: ``Manifest.parse`` refuses anything that is not a complete, self-consistent manifest, and
``check_small`` / ``check_block`` refuse bytes that do not match it.

``SealedParts`` is the upload side: it hashes the small and the big part as they are written and builds
the manifest's JSON at the end.
"""

import base64
import binascii
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

from constants import (IV_SIZE, KEY_SIZE, MANIFEST_BLOCK_SIZE, MANIFEST_FORMAT, MAX_JSON_DEPTH,
                       MAX_MANIFEST_BLOCK_SIZE, MAX_RESOURCE_BYTES, SPLIT_SMALL_DENOMINATOR, SPLIT_SMALL_MAX,
                       SPLIT_SMALL_NUMERATOR)
from errors import IntegrityError, UpstreamError

cdef enum:
    AES_BLOCK = 16


def json_nests_deeper(data, int limit=MAX_JSON_DEPTH):
    """Whether the UTF-8 JSON text ``data`` (bytes-like) opens more than ``limit`` arrays or objects inside
    one another: one pass over the bytes, counting brackets outside strings, before a parser recurses into
    them (json.loads of a peer's 100,000 nested arrays is a RecursionError). Not a validation: text that is
    no JSON may pass, and is then the parser's to refuse."""
    cdef const unsigned char[:] text = data
    cdef Py_ssize_t i
    cdef int depth = 0
    cdef bint in_string = False, escaped = False
    cdef unsigned char c
    for i in range(text.shape[0]):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 92:  # backslash
                escaped = True
            elif c == 34:  # quote
                in_string = False
        elif c == 34:
            in_string = True
        elif c == 91 or c == 123:  # [ {
            depth += 1
            if depth > limit:
                return True
        elif c == 93 or c == 125:  # ] }
            depth -= 1
    return False


def blob_size(long long plaintext_size):
    """The blob length of a plaintext: IV, the plaintext and 1..16 bytes of PKCS#7 padding."""
    return IV_SIZE + (plaintext_size // AES_BLOCK + 1) * AES_BLOCK


def block_count(long long size, long long block_size):
    return -(-size // block_size)


class ManifestError(UpstreamError):
    """The Resource API answered a manifest that is not one: a 502 naming the resource."""


class Manifest:
    """A parsed, self-consistent manifest. ``blocks`` holds raw digests; ``identity`` names the sealed
    upload it describes (the cache keeps it beside the big part)."""

    def __init__(self, key, size, blob_size, small, big, block_size, blocks):
        self.key = key
        self.size = size
        self.blob_size = blob_size
        self.small = small
        self.big = big
        self.block_size = block_size
        self.blocks = blocks

    @property
    def identity(self):
        return identity(self.big)

    def big_size(self, small_size):
        return self.blob_size - small_size

    @classmethod
    def parse(cls, raw, what):
        """The manifest in ``raw`` (UTF-8 JSON) of the resource ``what``; ManifestError when it is not
        valid JSON, lacks a key, or does not add up (sizes, digests, the number of blocks)."""
        return cls.from_document(document(raw, what), what)

    @classmethod
    def from_document(cls, doc, what):
        """The manifest in ``doc`` (a JSON object, as ``document`` gives it); ManifestError as ``parse``."""
        def bad(reason):
            return ManifestError(f"the manifest of {what} is not valid: {reason}")

        missing = [k for k in ("format", "key", "size", "blobSize", "small", "big", "blockSize", "blocks")
                   if k not in doc]
        if missing:
            raise bad("it lacks " + ", ".join(missing))
        if doc["format"] != MANIFEST_FORMAT or type(doc["format"]) is not int:
            raise bad(f"format {doc['format']!r} is not {MANIFEST_FORMAT}")
        size, blob, block_size = doc["size"], doc["blobSize"], doc["blockSize"]
        if not all(type(v) is int for v in (size, blob, block_size)):
            raise bad("size, blobSize and blockSize must be whole numbers")
        # In Python, before any C arithmetic (long long): 2**64 would not convert, 2**63 - 1 would overflow.
        if not 0 <= size <= MAX_RESOURCE_BYTES:
            raise bad(f"size must be 0..{MAX_RESOURCE_BYTES}")
        if not 0 <= blob <= blob_size(MAX_RESOURCE_BYTES):
            raise bad(f"blobSize must be 0..{blob_size(MAX_RESOURCE_BYTES)}")
        if blob != blob_size(size):
            raise bad("blobSize does not fit size")
        if not 0 < block_size <= MAX_MANIFEST_BLOCK_SIZE:
            raise bad(f"blockSize must be 1..{MAX_MANIFEST_BLOCK_SIZE}")
        try:
            key = base64.b64decode(doc["key"], validate=True) if isinstance(doc["key"], str) else b""
        except binascii.Error:
            key = b""
        if len(key) != KEY_SIZE:
            raise bad("key is not the Base64 of 32 bytes")
        small, big = _digest(doc["small"]), _digest(doc["big"])
        if small is None or big is None:
            raise bad("small and big must be hex SHA-256 digests")
        if not isinstance(doc["blocks"], list):
            raise bad("blocks is not a list")
        blocks = [_digest(d) for d in doc["blocks"]]
        if any(d is None for d in blocks):
            raise bad("blocks must be hex SHA-256 digests")
        manifest = cls(key, size, blob, small, big, block_size, blocks)
        if len(blocks) != block_count(manifest.big_size(small_size(blob)), block_size):
            raise bad(f"it lists {len(blocks)} blocks for a big part of "
                      f"{manifest.big_size(small_size(blob))} bytes")
        return manifest

    def check_small(self, small, what):
        if len(small) != small_size(self.blob_size) or hashlib.sha256(small).digest() != self.small:
            raise IntegrityError(f"the small part of {what} does not match its manifest")

    def check_block(self, index, digest, what):
        if digest != self.blocks[index]:
            raise IntegrityError(f"block {index} of the big part of {what} does not match its manifest")


def document(raw, what):
    """The JSON object in ``raw`` (UTF-8 bytes from the Resource API, a manifest or its signed envelope);
    ManifestError when it is none. Nesting is counted before the parser recurses."""
    def bad(reason):
        return ManifestError(f"the manifest of {what} is not valid: {reason}")

    raw = bytes(raw)
    if json_nests_deeper(raw):
        raise bad(f"JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        # The manifest holds the data key, and a UnicodeDecodeError all of the text: not kept as the cause.
        raise bad("not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    return doc


def identity(big_digest):
    """The name of a sealed upload: its big part's digest. The cache keeps it beside the part."""
    return "sha256:" + big_digest.hex()


def _digest(value):
    if not isinstance(value, str) or len(value) != 64:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def small_size(long long blob_length):
    """Bytes of the blob that go to the Resource API: min(3072, floor(0.3 * len))."""
    return min(SPLIT_SMALL_MAX, blob_length * SPLIT_SMALL_NUMERATOR // SPLIT_SMALL_DENOMINATOR)


class SealedParts:
    """Digests of an upload's parts as they are written: the small part once, the big part as a stream
    (a whole digest and one per block). ``manifest`` gives the JSON the Resource API stores.

    The whole digest is taken on a thread of its own, one chunk behind the block digests: the two passes
    of SHA-256 over every byte were most of an upload's CPU, and the other core is free for the second.
    Each chunk handed to ``update_big`` must stay unchanged until the next call (or ``manifest``).
    """

    def __init__(self, block_size=MANIFEST_BLOCK_SIZE):
        self.block_size = block_size
        self.small = b""
        self._big = hashlib.sha256()
        self._whole = ThreadPoolExecutor(1, thread_name_prefix="upload-hash")
        self._pending = None
        self._block = hashlib.sha256()
        self._in_block = 0
        self.blocks = []
        self.big_size = 0

    def set_small(self, small):
        self.small = bytes(small)

    def update_big(self, data):
        view = memoryview(data)
        self._settle()
        self._pending = self._whole.submit(self._big.update, view)
        self.big_size += len(view)
        while len(view):
            take = min(len(view), self.block_size - self._in_block)
            self._block.update(view[:take])
            self._in_block += take
            view = view[take:]
            if self._in_block == self.block_size:
                self._close_block()

    def _settle(self):
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _close_block(self):
        self.blocks.append(self._block.digest())
        self._block = hashlib.sha256()
        self._in_block = 0

    def close(self):
        self._settle()
        self._whole.shutdown()

    @property
    def identity(self):
        self._settle()
        return identity(self._big.digest())

    def manifest(self, key, size):
        """The manifest JSON (bytes) for ``key`` and a plaintext of ``size`` bytes; call once, at the end."""
        return json.dumps(self.document(key, size)).encode("utf-8")

    def document(self, key, size):
        """The manifest as a dict (what ``manifest`` writes, or a publisher signs); call once, at the end."""
        self.close()
        if self._in_block:
            self._close_block()
        return {
            "format": MANIFEST_FORMAT,
            "key": base64.b64encode(key).decode("ascii"),
            "size": size,
            "blobSize": len(self.small) + self.big_size,
            "small": hashlib.sha256(self.small).hexdigest(),
            "big": self._big.hexdigest(),
            "blockSize": self.block_size,
            "blocks": [d.hex() for d in self.blocks],
        }
