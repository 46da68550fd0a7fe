"""The dev stack's own pieces that need no stack running: its crypto and the publisher's split arithmetic
against the contract (sections 2 and 7), and the polling helper the stack and the tests wait with."""

import base64
import hashlib

import pytest

from devstack import crypto
from devstack.split import BigPartDigests, small_size
from devstack.wait import until


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- crypto ----------------------------------------------------------------------------------------


def test_blob_is_what_openssl_writes(openssl):
    key, iv, plain = crypto.resource_key(), bytes(range(16)), b"azaion" * 1000
    expected = openssl.encrypt(key, iv, plain)
    assert crypto.encrypt(key, plain, iv) == iv + expected
    assert crypto.decrypt(key, iv + expected) == plain
    assert len(iv + expected) == crypto.encrypted_size(len(plain))


def test_key_strings_follow_the_contract():
    digest = hashlib.sha384(b"Azaion_HW_%$$$)0_").digest()
    assert crypto.hardware_hash("HW") == base64.b64encode(digest).decode()
    assert crypto.api_key_string("e", "p", "HW") == f"e-p-{crypto.hardware_hash('HW')}-#%@AzaionKey@%#---"
    assert crypto.resource_key() == hashlib.sha256(b"azaion-loader/resource-key/v1").digest()


# --- the split -------------------------------------------------------------------------------------


def test_small_size_switches_to_the_cap_at_10240():
    assert small_size(10239) == 3071 and small_size(10240) == 3072 and small_size(10**9) == 3072


@pytest.mark.parametrize(
    "pieces, blocks",
    [
        ([], 0),
        ([b"a" * 10], 1),
        ([b"a" * 16], 1),
        ([b"a" * 16, b"b"], 2),
        ([b"a" * 5, b"b" * 20, b"c" * 23], 3),  # 48 bytes: three whole blocks, pieces across the edges
    ],
)
def test_block_digests_do_not_depend_on_how_the_bytes_arrive(pieces, blocks):
    digests = BigPartDigests(block_size=16)
    for piece in pieces:
        digests.update(piece)
    whole = b"".join(pieces)
    assert digests.finish() == (sha256(whole), [sha256(whole[i : i + 16]) for i in range(0, len(whole), 16)])
    assert len(digests.blocks) == blocks


# --- waiting ---------------------------------------------------------------------------------------


def test_until_returns_the_first_true_value():
    answers = iter([None, 0, {"state": "ready"}])
    assert until(lambda: next(answers)) == {"state": "ready"}


def test_until_times_out_naming_what_it_last_saw():
    seen = []
    with pytest.raises(TimeoutError, match=r"^the unlock is still 'decrypting'$"):
        until(lambda: seen.append("decrypting"), 0.05, lambda: f"the unlock is still {seen[-1]!r}")
    assert len(seen) >= 2  # it polled again before it gave up
