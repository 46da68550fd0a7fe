"""manifest: parsing refuses anything but a complete, self-consistent manifest; SealedParts builds one."""

import base64
import hashlib
import json
import os

import pytest

from constants import MAX_RESOURCE_BYTES
from errors import IntegrityError, UpstreamError
from manifest import Manifest, ManifestError, SealedParts, blob_size, json_nests_deeper, small_size

KEY = bytes(range(32))


def sealed(data_size=300_000, block=64 * 1024, chunk=7777):
    """A manifest (dict) and its parts for a blob of a plaintext of ``data_size`` bytes (random bytes stand
    in for the blob: the manifest only describes it)."""
    blob = os.urandom(blob_size(data_size))
    k = small_size(len(blob))
    parts = SealedParts(block)
    parts.set_small(blob[:k])
    for i in range(k, len(blob), chunk):
        parts.update_big(blob[i : i + chunk])
    return json.loads(parts.manifest(KEY, data_size)), blob[:k], blob[k:], parts


def test_sealed_parts_hash_the_parts_and_each_block_whatever_the_chunks():
    doc, small, big, parts = sealed()
    assert doc["format"] == 2 and base64.b64decode(doc["key"]) == KEY
    assert (doc["size"], doc["blobSize"], doc["blockSize"]) == (300_000, len(small) + len(big), 64 * 1024)
    assert doc["small"] == hashlib.sha256(small).hexdigest()
    assert doc["big"] == hashlib.sha256(big).hexdigest()
    expected = [hashlib.sha256(big[i : i + 65536]).hexdigest() for i in range(0, len(big), 65536)]
    assert doc["blocks"] == expected and len(expected) == 5  # the last one shorter
    assert parts.identity == "sha256:" + doc["big"]


@pytest.mark.parametrize("chunk", [1, 16, 4096, 4097, 10**6])
def test_block_boundaries_do_not_depend_on_the_chunking(chunk):
    big = os.urandom(3 * 4096 + 5)
    parts = SealedParts(4096)
    for i in range(0, len(big), chunk):
        parts.update_big(big[i : i + chunk])
    doc = json.loads(parts.manifest(KEY, 0))
    assert doc["blocks"] == [hashlib.sha256(big[i : i + 4096]).hexdigest() for i in range(0, len(big), 4096)]


def test_a_valid_manifest_parses_and_checks_its_parts():
    doc, small, big, _ = sealed()
    m = Manifest.parse(json.dumps(doc).encode(), "models/m.bin")
    assert (m.key, m.size, m.block_size, len(m.blocks)) == (KEY, 300_000, 65536, 5)
    assert m.big_size(len(small)) == len(big)
    m.check_small(small, "models/m.bin")
    with pytest.raises(IntegrityError, match="small part of models/m.bin does not match its manifest"):
        m.check_small(bytes([small[0] ^ 1]) + small[1:], "models/m.bin")
    m.check_block(2, hashlib.sha256(big[2 * 65536 : 3 * 65536]).digest(), "x")
    with pytest.raises(IntegrityError, match="block 2 .* does not match its manifest"):
        m.check_block(2, hashlib.sha256(b"other").digest(), "x")


def _broken(change):
    doc, *_ = sealed()
    change(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"{not json", "not UTF-8 JSON"),
        (b"[1, 2]", "not a JSON object"),
        (_broken(lambda d: d.pop("key")), "lacks key"),
        (_broken(lambda d: d.pop("blocks")), "lacks blocks"),
        (_broken(lambda d: d.update(format=1)), "format 1 is not 2"),
        (_broken(lambda d: d.update(format="2")), "format '2' is not 2"),
        (_broken(lambda d: d.update(key="not base64!")), "key is not the Base64 of 32 bytes"),
        (_broken(lambda d: d.update(key=base64.b64encode(b"short").decode())), "key is not the Base64"),
        (_broken(lambda d: d.update(size=d["size"] + 16)), "blobSize does not fit size"),
        (_broken(lambda d: d.update(size=-1)), r"size must be 0\.\.1099511627776"),
        (_broken(lambda d: d.update(size=2**64)), r"size must be 0\.\."),  # was an OverflowError: a 500
        (_broken(lambda d: d.update(size=2**63 - 1)), r"size must be 0\.\."),  # was a negative byte count
        (_broken(lambda d: d.update(size=MAX_RESOURCE_BYTES + 1)), r"size must be 0\.\."),
        (_broken(lambda d: d.update(size=True)), "whole numbers"),
        (_broken(lambda d: d.update(size=1.0)), "whole numbers"),
        (_broken(lambda d: d.update(blobSize=2**64)), r"blobSize must be 0\.\."),
        (_broken(lambda d: d.update(blobSize=-1)), r"blobSize must be 0\.\."),
        (_broken(lambda d: d.update(blobSize=True)), "whole numbers"),
        (_broken(lambda d: d.update(blockSize=2**64)), "blockSize must be"),
        (_broken(lambda d: d.update(blockSize=-(2**63))), "blockSize must be"),
        (_broken(lambda d: d.update(blockSize=True)), "whole numbers"),
        (b'{"format": 2, "key": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested deeper than 32"),
        (b"[" * 33 + b"]" * 33, "JSON nested deeper than 32"),
        (b"[" * 32 + b"]" * 32, "not a JSON object"),  # 32 deep is JSON like any other
        (_broken(lambda d: d.update(blockSize=0)), "blockSize must be"),
        (_broken(lambda d: d.update(blockSize=10**9)), "blockSize must be"),
        (_broken(lambda d: d.update(small="zz" * 32)), "hex SHA-256"),
        (_broken(lambda d: d.update(big="ab")), "hex SHA-256"),
        (_broken(lambda d: d["blocks"].pop()), "lists 4 blocks"),
        (_broken(lambda d: d["blocks"].append("00" * 32)), "lists 6 blocks"),
        (_broken(lambda d: d.update(blocks="00" * 32)), "blocks is not a list"),
        (_broken(lambda d: d["blocks"].__setitem__(0, 7)), "hex SHA-256"),
    ],
)
def test_a_broken_manifest_is_a_clear_upstream_error(raw, reason):
    with pytest.raises(ManifestError, match=reason) as caught:
        Manifest.parse(raw, "models/m.bin")
    assert isinstance(caught.value, UpstreamError)  # a 502, never a 500
    assert caught.value.detail.startswith("the manifest of models/m.bin is not valid: ")
    assert base64.b64encode(KEY).decode() not in caught.value.detail  # the key is never echoed


def test_a_manifest_at_the_largest_size_parses():
    """MAX_RESOURCE_BYTES itself is a size (the manifest's block list then is long, but in range)."""
    doc, *_ = sealed()
    blob = blob_size(MAX_RESOURCE_BYTES)
    block = 64 * 1024 * 1024
    big = blob - small_size(blob)
    doc.update(size=MAX_RESOURCE_BYTES, blobSize=blob, blockSize=block, blocks=["00" * 32] * -(-big // block))
    m = Manifest.parse(json.dumps(doc).encode(), "models/m.bin")
    assert (m.size, m.blob_size) == (MAX_RESOURCE_BYTES, blob)


@pytest.mark.parametrize(
    ("text", "deeper"),
    [
        (b"[" * 32 + b"]" * 32, False),
        (b"[" * 33 + b"]" * 33, True),
        (b'{"a": "' + b"[" * 100 + b'"}', False),  # inside a string: no nesting
        (rb'{"a": "\\", ' + b"[" * 40 + b"]" * 40 + b"}", True),  # an escaped backslash, then the string ends
        (rb'{"a": "\"' + b"[" * 40 + b'"}', False),  # an escaped quote ends no string
        (b"[]" * 10_000, False),  # side by side is not nested
    ],
)
def test_json_nesting_is_counted_outside_strings(text, deeper):
    assert json_nests_deeper(text) is deeper
