"""Liveness of the cache and the upload form against the real loader process: what it finds on its cache disk
that it cannot use (a damaged sidecar, a bucket folder that is a symbolic link, a FIFO where a file goes)
costs a download, never a 500, a hang or a write outside MODEL_CACHE_DIR; an upload form with a field twice is
a 400 and publishes nothing."""

import hashlib
import json
import os
from pathlib import Path

import botocore.exceptions
import pytest

from devstack.cache_damage import link_folder_outside, snapshot
from devstack.wait import until
from tests.faults.conftest import PASSWORD, MiB, model_name

pytestmark = pytest.mark.integration

BLOCK = 4 * MiB  # the loader's block, of format-1 parts too
BOUND = 60  # seconds a load may take here: one that hangs fails the test instead of hanging it


def digests(big, block_size):
    return [hashlib.sha256(big[i : i + block_size]).hexdigest() for i in range(0, len(big), block_size)]


def cdn_big(stack, name, folder="models"):
    return stack.s3_admin_client().get_object(Bucket=folder, Key=name + ".big")["Body"].read()


def cached_model(stack, loader, user):
    """A 6 MiB model published, loaded once by ``user`` and committed to the loader's cache: its name, its
    bytes and its big part."""
    data = os.urandom(6 * MiB)
    n = model_name("liveness")
    stack.publish("models", n, data)
    big = cdn_big(stack, n)
    assert loader.login(user, PASSWORD).status_code == 200
    loaded(loader, n, data)
    loader.cached_big_part("models", n)
    return n, data, big


def cached_afresh(loader, name, big):
    """Wait until the part and a sound sidecar (the loader's block size) are in the cache as regular files."""
    part = Path(loader.env["MODEL_CACHE_DIR"]) / "models" / (name + ".big")
    meta = part.with_name(part.name + ".meta")

    def sound():
        try:
            if part.is_symlink() or meta.is_symlink() or not (part.is_file() and meta.is_file()):
                return False
            written = json.loads(meta.read_text())
            return written["blockSize"] == BLOCK and part.stat().st_size == len(big)
        except (OSError, ValueError, KeyError):
            return False

    until(sound, 30, f"{name} was not cached afresh", every=0.05)
    assert part.read_bytes() == big


def release_fifo(path):
    """Let an open() blocked on the FIFO at ``path`` (the old code's) go on, so the loader can stop."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def loaded(loader, name, data):
    r = loader.load(name, "models", timeout=BOUND)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(data).digest()


def with_other_block_size(meta, big):
    meta.update(blockSize=2 * BLOCK, blocks=digests(big, 2 * BLOCK))
    return json.dumps(meta).encode()


DAMAGED = {
    "another block size": with_other_block_size,
    "not JSON": lambda meta, big: b"\x00\xff{not json",
    "nested too deep": lambda meta, big: b"[" * 200_000 + b"]" * 200_000,
    "size infinite": lambda meta, big: (
        json.dumps(meta).encode().replace(b'"size": ', b'"size": 1e400, "x": ')
    ),
    "size a string": lambda meta, big: json.dumps({**meta, "size": str(meta["size"])}).encode(),
    "over the cap": lambda meta, big: json.dumps(meta).encode() + b" " * (16 * MiB + 1),
}


@pytest.mark.parametrize("how", DAMAGED)
def test_a_damaged_sidecar_is_fetched_again_never_a_500(stack, loader, user, how):
    """A format-1 part whose sidecar names blocks of 8 MiB (the old code: a 500 on every load until someone
    deleted it), or garbage, or absurd numbers, or more than MAX_SIDECAR_BYTES: 200, byte-identical, and the
    part cached afresh.

    Reliability: a cache sidecar naming another blockSize, garbage, absurd numbers or over its cap | 200
    byte-identical, the part discarded and fetched again (a 500 on every load before)
    """
    data = os.urandom(10 * MiB)
    n = model_name("liveness")
    stack.publish("models", n, data, format=1)
    big = cdn_big(stack, n)
    assert loader.login(user, PASSWORD).status_code == 200
    loaded(loader, n, data)
    meta = Path(str(loader.cached_big_part("models", n)) + ".meta")
    meta.write_bytes(DAMAGED[how](json.loads(meta.read_text()), big))
    loaded(loader, n, data)
    cached_afresh(loader, n, big)
    assert "is damaged" in loader.log()
    loaded(loader, n, data)


def test_a_symlinked_bucket_folder_is_replaced_nothing_outside_changes(tmp_path, stack, loader, user):
    """The cache's folder of the bucket is a link to a folder outside (holding a damaged copy of the part, a
    file of someone else's, and a leftover .part file): the old code read, deleted and wrote through it. The
    loader, restarted on it, sweeps without following the link, puts a real folder in its place and loads.

    Reliability: a cache folder that is a symlink to a folder outside | the link replaced by a real folder,
    200 byte-identical, nothing outside the cache read, written or deleted
    """
    n, data, big = cached_model(stack, loader, user)
    loader.stop()

    folder = Path(loader.env["MODEL_CACHE_DIR"]) / "models"
    outside = tmp_path / "outside"
    before = link_folder_outside(folder, outside, n)

    loader.start()
    assert loader.login(user, PASSWORD).status_code == 200
    loaded(loader, n, data)
    cached_afresh(loader, n, big)
    assert snapshot(outside) == before
    assert folder.is_dir() and not folder.is_symlink()
    loaded(loader, n, data)


@pytest.mark.parametrize("which", [".big", ".big.meta"])
def test_a_fifo_in_the_cache_never_hangs_a_load(stack, loader, user, which):
    """A FIFO where the cached part or its sidecar goes hung the old code's load in open() for good.

    Reliability: a FIFO where a cached .big or .meta should be | 200 byte-identical within seconds, the
    part fetched again (the load hung in open() for good before)
    """
    n, data, big = cached_model(stack, loader, user)
    path = Path(loader.env["MODEL_CACHE_DIR"]) / "models" / (n + which)
    path.unlink()
    os.mkfifo(path)
    try:
        loaded(loader, n, data)
    finally:
        release_fifo(path)
    cached_afresh(loader, n, big)
    loaded(loader, n, data)


def assert_nothing_published(stack, loader, name, folders):
    for folder in folders:
        r = loader.load(name, folder, timeout=BOUND)
        assert r.status_code == 404, (folder, r.status_code, r.text[:300])
        assert stack.admin.get_file(folder, name + ".small") is None
        assert stack.admin.get_file(folder, name + ".manifest") is None
        with pytest.raises(botocore.exceptions.ClientError):
            stack.s3_admin_client().head_object(Bucket=folder, Key=name + ".big")


@pytest.mark.parametrize(
    "fields,message",
    [
        (
            [("folder", "models"), ("folder", "evil-bucket"), ("data", 3 * MiB)],
            "more than one 'folder' field",
        ),
        ([("folder", "models"), ("data", 3 * MiB), ("data", 1024)], "more than one file field 'data'"),
        ([("data", 3 * MiB), ("data", 1024), ("folder", "models")], "more than one file field 'data'"),
    ],
    ids=["folder-twice", "data-twice-folder-first", "data-twice-folder-last"],
)
def test_an_upload_form_with_a_field_twice_is_400_publishes_nothing(stack, loader, uploader, fields, message):
    """The old code joined two 'folder' fields ('models' + 'evil-bucket': the bucket 'modelsevil-bucket') and
    two 'data' parts into one model, and answered 200.

    Reliability: an upload form with two 'folder' fields or two 'data' parts | 400 naming the field,
    nothing published
    """
    n = model_name("liveness")
    files = [
        (field, (n, os.urandom(value))) if field == "data" else (field, (None, value))
        for field, value in fields
    ]
    assert loader.login(uploader, PASSWORD).status_code == 200
    r = loader.post(f"/upload/{n}", files=files, timeout=BOUND)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert message in r.json()["detail"]
    assert_nothing_published(stack, loader, n, ["models", "modelsevil-bucket"])
