"""security: key derivation and the blob format of contract section 1, against openssl and known answers;
any chunking gives the same output, and every failure is one opaque error."""

import base64
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import security
from errors import DecryptionError, LoaderError

KEY = bytes(range(32))
IV = bytes(range(100, 116))
SIZES = [0, 1, 15, 16, 17, 3071, 3072, 1024 * 1024 + 7]


def test_key_from_string_is_sha256_of_utf8():
    assert security.key_from_string("ключ") == hashlib.sha256("ключ".encode()).digest()


def test_hardware_hash_known_answer():
    hw = "CPU: X. GPU: . Memory: 1. DriveSerial: S"
    expected = base64.b64encode(hashlib.sha384(b"Azaion_" + hw.encode() + b"_%$$$)0_").digest()).decode()
    assert security.hardware_hash(hw) == expected
    assert len(expected) == 64


def test_api_key_binds_email_password_and_hardware():
    hw = "CPU: X. GPU: . Memory: 1. DriveSerial: S"
    key_string = "a@b.c-pw-" + security.hardware_hash(hw) + "-#%@AzaionKey@%#---"
    assert security.api_key("a@b.c", "pw", hw) == hashlib.sha256(key_string.encode()).digest()
    assert security.api_key("a@b.c", "pw", hw + " ") != security.api_key("a@b.c", "pw", hw)


def test_resource_and_archive_keys():
    assert security.resource_key() == hashlib.sha256(b"azaion-loader/resource-key/v1").digest()
    assert security.archive_key(b"\x00\x01") == hashlib.sha256(b"\x00\x01").digest()


def test_known_answer_vector():
    # printf hello | openssl enc -aes-256-cbc -K 000102..1f -iv 646566..73 | xxd -p
    blob = security.encrypt(KEY, b"hello", IV)
    assert blob == IV + bytes.fromhex("88fd3f0ce98e36a1bbcd9226fb0b9498")
    assert security.decrypt(KEY, blob) == b"hello"


@pytest.mark.parametrize("size", SIZES)
def test_openssl_decrypts_what_we_encrypt(openssl, size):
    plain = os.urandom(size)
    blob = security.encrypt(KEY, plain)  # random IV, as in real use
    assert openssl.decrypt(KEY, blob[:16], blob[16:]) == plain


@pytest.mark.parametrize("size", SIZES)
def test_we_decrypt_what_openssl_encrypts(openssl, size):
    plain = os.urandom(size)
    iv = os.urandom(16)
    blob = iv + openssl.encrypt(KEY, iv, plain)
    assert security.decrypt(KEY, blob) == plain
    assert (
        b"".join(
            bytes(c)
            for c in security.decrypt_stream(KEY, [blob[i : i + 4096] for i in range(0, len(blob), 4096)])
        )
        == plain
    )


def _split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


@settings(max_examples=200, deadline=None)
@given(plain=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_chunking_gives_the_same_output(plain, cuts):
    whole = security.encrypt(KEY, plain, IV)
    streamed = b"".join(bytes(c) for c in security.encrypt_stream(KEY, _split(plain, cuts), IV))
    assert streamed == whole
    decrypted = b"".join(bytes(c) for c in security.decrypt_stream(KEY, _split(whole, cuts)))
    assert decrypted == plain


def test_random_iv_differs_each_time():
    assert security.encrypt(KEY, b"x")[:16] != security.encrypt(KEY, b"x")[:16]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 1]), id="changed-last-byte"),
        pytest.param(lambda b: b[:-16] + os.urandom(16), id="changed-last-block"),
        pytest.param(lambda b: b[:-16], id="truncated-by-a-block"),
        pytest.param(lambda b: b[:-5], id="not-a-multiple-of-16"),
        pytest.param(lambda b: b[:10], id="missing-iv"),
        pytest.param(lambda b: b[:16], id="iv-only"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_every_failure_is_one_opaque_error(mutate):
    blob = security.encrypt(KEY, b"a" * 100, IV)
    with pytest.raises(DecryptionError) as info:
        security.decrypt(KEY, mutate(blob))
    assert isinstance(info.value, LoaderError)
    assert str(info.value) == str(DecryptionError())


def test_wrong_key_fails_opaquely():
    blob = security.encrypt(KEY, b"secret model" * 10)
    with pytest.raises(DecryptionError):
        security.decrypt(bytes(32), blob)


def test_stream_raises_only_at_the_end_for_a_bad_tail():
    blob = security.encrypt(KEY, os.urandom(100_000))  # a whole block of padding: sixteen 0x10 bytes
    # CBC: flipping a bit of the second-to-last cipher block flips the same bit of the last plaintext
    # block. This turns its last byte from 0x10 into 0x00, never valid padding. (Damaging the last cipher
    # block instead garbles it at random, and about one time in 256 that is valid padding again.)
    bad = blob[:-17] + bytes([blob[-17] ^ 0x10]) + blob[-16:]
    out = []
    with pytest.raises(DecryptionError):
        for chunk in security.decrypt_stream(KEY, [bad[i : i + 1000] for i in range(0, len(bad), 1000)]):
            out.append(bytes(chunk))
    # Everything before the last block was released; the padding-bearing block never was.
    assert sum(map(len, out)) <= len(bad) - 32


@pytest.mark.parametrize("size", [*range(0, 50), 1000, 1_048_576 + 7])
def test_plaintext_size_from_the_last_two_blocks(openssl, size):
    plain = os.urandom(size)
    blob = security.encrypt(KEY, plain)
    assert security.plaintext_size(KEY, len(blob), blob[-32:]) == size
    # the same for a blob openssl wrote
    iv = os.urandom(16)
    out = openssl.encrypt(KEY, iv, plain)
    assert security.plaintext_size(KEY, 16 + len(out), (iv + out)[-32:]) == size


@pytest.mark.parametrize(
    "blob_size, tail",
    [
        pytest.param(64, lambda t: t[:15] + bytes([t[15] ^ 0x55]) + t[16:], id="damaged-padding"),
        pytest.param(31, lambda t: t, id="shorter-than-two-blocks"),
        pytest.param(65, lambda t: t, id="not-a-multiple-of-16"),
        pytest.param(64, lambda t: t[1:], id="short-tail"),
    ],
)
def test_plaintext_size_refuses_a_bad_end(blob_size, tail):
    blob = security.encrypt(KEY, b"b" * 40, IV)
    assert len(blob) == 64
    with pytest.raises(DecryptionError):
        security.plaintext_size(KEY, blob_size, tail(blob[-32:]))


def test_key_must_be_32_bytes():
    with pytest.raises(ValueError):
        security.Encryptor(b"short")
    with pytest.raises(ValueError):
        security.Decryptor(b"x" * 31)
