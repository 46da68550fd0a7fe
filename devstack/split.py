"""The publisher's side of the binary split (contract section 2), independent of the loader's code.

``E = blob(resource key, R)``; the first ``k = min(3072, floor(0.3 * len(E)))`` bytes go to the Resource
API as ``N.small``, the rest to the CDN as bucket ``F``, key ``N.big``. ``len(E)`` follows from ``len(R)``,
so ``k`` is known before encrypting and nothing is ever held whole in memory: the small part is kept,
the big part streams into a temporary file that boto3 uploads in parts.
"""

import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from botocore.exceptions import ClientError

from devstack import crypto
from devstack.admin import AdminClient
from devstack.store import valid_name

SMALL_MAX = 3072
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CHUNK = 1024 * 1024

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


def small_size(encrypted_len: int) -> int:
    # Integer arithmetic: 0.3 * n in floating point can land a hair below an integer and floor one short.
    return min(SMALL_MAX, encrypted_len * 3 // 10)


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
) -> Published:
    """Splits and uploads one resource. ``data_or_file``: bytes, a path, or a seekable binary file."""
    if not (valid_name(folder) and BUCKET.fullmatch(folder)) or not valid_name(name):
        raise ValueError("folder must be a valid name and S3 bucket name, and name a valid name")
    size, chunks = _open_source(data_or_file)
    total = crypto.encrypted_size(size)
    k = small_size(total)
    small = bytearray()
    with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="devstack-big-") as big:
        for piece in crypto.encrypt_stream(crypto.resource_key(), chunks):
            if len(small) < k:
                take = k - len(small)
                small += piece[:take]
                piece = piece[take:]
            big.write(piece)
        big.flush()
        if big.tell() != total - k:
            raise RuntimeError("the resource changed size while it was being published")
        ensure_bucket(s3_admin_client, folder)
        s3_admin_client.upload_file(big.name, folder, name + ".big")
    api_admin.put_file(folder, name + ".small", bytes(small))
    etag = s3_admin_client.head_object(Bucket=folder, Key=name + ".big")["ETag"]
    return Published(folder, name, size, total, k, total - k, etag)
