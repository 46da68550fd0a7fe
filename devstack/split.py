"""The publisher's side of the binary split (contract sections 2 and 7), independent of the loader's code.

Format 2 (the default, "sealed split"): a fresh 32-byte data key ``D`` per publish, ``E = blob(D, R)``;
the first ``k = min(3072, floor(0.3 * len(E)))`` bytes go to the Resource API as ``N.small``, the rest to
the CDN as bucket ``F``, key ``N.big``, and then a manifest ``N.manifest`` (plain UTF-8 JSON) to the API:
``D`` in Base64, the sizes, the SHA-256 of the small part, of the big part and of each 4 MiB block of the
big part. Order: big part, small part, manifest — the manifest is the commit point.

With a ``signer`` (a devstack.signing.Publisher, contract section 9) ``N.manifest`` is instead a DSSE
envelope over ``M``: that manifest with ``"folder"`` and ``"name"``.

Format 1 (models uploaded before format 2): ``E = blob(resource key, R)``, the same split, no manifest.

``len(E)`` follows from ``len(R)``, so ``k`` is known before encrypting and nothing is ever held whole in
memory: the small part is kept, the big part streams into a temporary file (hashed as it is written) that
boto3 uploads in parts.
"""

import base64
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from botocore.exceptions import ClientError

from devstack import crypto, signing
from devstack.api.admin_client import AdminClient
from devstack.api.store import valid_name

SMALL_MAX = 3072
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CHUNK = 1024 * 1024
DATA_KEY_SIZE = 32
MANIFEST_BLOCK_SIZE = 4 * 1024 * 1024
FORMATS = (1, 2)

Source = bytes | bytearray | memoryview | os.PathLike | str | BinaryIO


@dataclass(frozen=True)
class Published:
    folder: str
    name: str
    size: int  # of the resource R
    encrypted_size: int  # of E
    small_size: int  # k
    big_size: int
    etag: str  # of the big part, as the CDN reports it
    format: int = 2
    small_sha256: str = ""  # hex
    big_sha256: str = ""  # hex
    block_sha256: tuple[str, ...] = ()  # hex, one per MANIFEST_BLOCK_SIZE of the big part
    data_key: bytes | None = field(default=None, repr=False)  # D (format 2); format 1: None
    manifest: dict | None = field(default=None, repr=False)  # the section 7 manifest (format 2)
    # Signed (section 9): M, the exact bytes signed, and the envelope stored as N.manifest; else None.
    payload: bytes | None = field(default=None, repr=False)
    envelope: bytes | None = field(default=None, repr=False)

    @property
    def signed(self) -> bool:
        return self.envelope is not None

    @property
    def stored_manifest(self) -> bytes | None:
        """The bytes stored as ``N.manifest``: the envelope, the plain JSON, or None (format 1)."""
        if self.envelope is not None:
            return self.envelope
        return None if self.manifest is None else json.dumps(self.manifest).encode("utf-8")

    @property
    def key(self) -> bytes:
        """The AES key ``E`` was encrypted under: ``D``, or the resource key for format 1."""
        return self.data_key if self.data_key is not None else crypto.resource_key()


def small_size(encrypted_len: int) -> int:
    # Integer arithmetic: 0.3 * n in floating point can land a hair below an integer and floor one short.
    return min(SMALL_MAX, encrypted_len * 3 // 10)


def manifest_name(name: str) -> str:
    return name + ".manifest"


def _open_source(source: Source) -> tuple[int, Iterator[bytes]]:
    """The plaintext size and its chunks."""
    if isinstance(source, bytes | bytearray | memoryview):
        return len(source), iter([bytes(source)])
    if isinstance(source, os.PathLike | str):
        return Path(source).stat().st_size, crypto.file_chunks(source, CHUNK)
    start = source.tell()
    size = source.seek(0, os.SEEK_END) - start
    source.seek(start)
    return size, iter(lambda: source.read(CHUNK), b"")


class BigPartDigests:
    """SHA-256 of the whole big part and of each ``block_size`` block of it, fed as it is written."""

    def __init__(self, block_size: int = MANIFEST_BLOCK_SIZE):
        self.block_size = block_size
        self.whole = hashlib.sha256()
        self.blocks: list[str] = []
        self._block = hashlib.sha256()
        self._in_block = 0

    def update(self, data: bytes) -> None:
        self.whole.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self.block_size - self._in_block)
            self._block.update(view[:take])
            self._in_block += take
            view = view[take:]
            if self._in_block == self.block_size:
                self._close_block()

    def _close_block(self) -> None:
        self.blocks.append(self._block.hexdigest())
        self._block = hashlib.sha256()
        self._in_block = 0

    def finish(self) -> tuple[str, list[str]]:
        if self._in_block:
            self._close_block()
        return self.whole.hexdigest(), self.blocks


def ensure_bucket(s3, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("404", "NoSuchBucket", "NotFound"):
            raise
        try:
            s3.create_bucket(Bucket=bucket)
        except ClientError as create_exc:
            if create_exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


def publish_resource(
    api_admin: AdminClient,
    s3_admin_client,
    folder: str,
    name: str,
    data_or_file: Source,
    tmp_dir: Path | None = None,
    *,
    format: int = 2,
    signer: signing.Publisher | None = None,
) -> Published:
    """Splits and uploads one resource. ``data_or_file``: bytes, a path, or a seekable binary file.

    ``format=2``: sealed under a fresh data key, with a manifest (contract section 7). ``format=1``: the
    old split under the resource key (section 2); a stale ``N.manifest`` from an earlier format-2 publish
    is deleted last, so until then the new parts are refused against the old manifest, never spliced.
    ``signer``: the manifest is stored as its DSSE envelope over M (section 9); format 2 only."""
    if not (valid_name(folder) and BUCKET.fullmatch(folder)) or not valid_name(name):
        raise ValueError("folder must be a valid name and S3 bucket name, and name a valid name")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    if signer is not None and format != 2:
        raise ValueError("only a format 2 manifest can be signed")
    data_key = os.urandom(DATA_KEY_SIZE) if format == 2 else None
    key = data_key if data_key is not None else crypto.resource_key()
    size, chunks = _open_source(data_or_file)
    total = crypto.encrypted_size(size)
    k = small_size(total)
    small = bytearray()
    digests = BigPartDigests()
    with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="devstack-big-") as big:
        for piece in crypto.encrypt_stream(key, chunks):
            if len(small) < k:
                take = k - len(small)
                small += piece[:take]
                piece = piece[take:]
            if piece:
                big.write(piece)
                digests.update(piece)
        big.flush()
        if big.tell() != total - k or len(small) != k:
            raise RuntimeError("the resource changed size while it was being published")
        ensure_bucket(s3_admin_client, folder)
        s3_admin_client.upload_file(big.name, folder, name + ".big")
    big_sha256, blocks = digests.finish()
    small_sha256 = hashlib.sha256(small).hexdigest()
    api_admin.put_file(folder, name + ".small", bytes(small))
    manifest = payload = envelope = None
    if format == 2:
        manifest = {
            "format": 2,
            "key": base64.b64encode(data_key).decode("ascii"),
            "size": size,
            "blobSize": total,
            "small": small_sha256,
            "big": big_sha256,
            "blockSize": MANIFEST_BLOCK_SIZE,
            "blocks": blocks,
        }
        stored = json.dumps(manifest).encode("utf-8")
        if signer is not None:
            payload = signing.payload(manifest, folder, name)
            stored = envelope = signing.envelope(payload, [signer.signature(payload)])
        api_admin.put_file(folder, manifest_name(name), stored)
    else:
        api_admin.delete_file(folder, manifest_name(name))
    etag = s3_admin_client.head_object(Bucket=folder, Key=name + ".big")["ETag"]
    return Published(
        folder,
        name,
        size,
        total,
        k,
        total - k,
        etag,
        format=format,
        small_sha256=small_sha256,
        big_sha256=big_sha256,
        block_sha256=tuple(blocks),
        data_key=data_key,
        manifest=manifest,
        payload=payload,
        envelope=envelope,
    )
