"""The dev stack's own pieces that need no stack running: its crypto and the publisher's split arithmetic
against the contract (sections 2 and 7), its signed manifests (section 9), and the polling helper the stack
and the tests wait with."""

import base64
import hashlib
import json
import stat
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from devstack import crypto, signing
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


# --- signed manifests (contract section 9) ---------------------------------------------------------


def test_pae_is_the_dsse_spec_example():
    assert (
        signing.pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert signing.pae("t", b"") == b"DSSEv1 1 t 0 "
    assert signing.pae("\u00e9", b"x") == b"DSSEv1 2 \xc3\xa9 1 x"  # a length in bytes, not characters


def test_publisher_key_files_are_pkcs8_and_spki_and_made_once(tmp_path):
    private, public = signing.new_publisher_key(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    [trusted] = signing.load_public_keys(public)
    assert signing.raw_public_key(trusted) == signing.raw_public_key(key.public_key())
    again = signing.new_publisher_key(tmp_path / "keys")
    assert again == (private, public) and private.read_bytes() == key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public.unlink()  # a lost public half is made again from the private key
    signing.new_publisher_key(tmp_path / "keys")
    assert signing.load_public_keys(public)[0].public_bytes_raw() == trusted.public_bytes_raw()


def test_keyid_is_the_sha256_of_the_raw_public_key():
    publisher = signing.Publisher.generate()
    raw = signing.raw_public_key(publisher.public_key)
    assert len(raw) == 32
    assert publisher.keyid == signing.keyid(publisher.public_key) == signing.keyid(raw) == sha256(raw)


MANIFEST = {"format": 2, "key": "a2V5", "size": 3, "blobSize": 32, "small": "0" * 64, "big": "1" * 64}


def test_an_envelope_carries_m_and_a_signature_over_its_pae(tmp_path, openssl):
    private, public = signing.new_publisher_key(tmp_path)
    publisher = signing.Publisher(private)
    envelope = json.loads(publisher.sign(MANIFEST, "models", "m.bin"))
    assert set(envelope) == {"payloadType", "payload", "signatures"}
    assert envelope["payloadType"] == signing.PAYLOAD_TYPE == "application/vnd.azaion.manifest+json"
    payload = base64.b64decode(envelope["payload"], validate=True)
    assert payload == signing.payload(MANIFEST, "models", "m.bin")
    assert json.loads(payload) == {**MANIFEST, "folder": "models", "name": "m.bin"}
    [signature] = envelope["signatures"]
    assert signature["keyid"] == publisher.keyid
    # openssl, not this module, checks the signature: Ed25519 over PAE(payloadType, M) under the public PEM.
    (tmp_path / "pae").write_bytes(signing.pae(signing.PAYLOAD_TYPE, payload))
    (tmp_path / "sig").write_bytes(base64.b64decode(signature["sig"], validate=True))
    verify = [openssl.path, "pkeyutl", "-verify", "-pubin", "-inkey", str(public), "-rawin"]
    verify += ["-in", str(tmp_path / "pae"), "-sigfile", str(tmp_path / "sig")]
    assert subprocess.run(verify, capture_output=True).returncode == 0
    (tmp_path / "pae").write_bytes(signing.pae(signing.PAYLOAD_TYPE, payload + b" "))
    assert subprocess.run(verify, capture_output=True).returncode != 0  # the check can fail


def test_open_envelope_returns_m_under_a_trusted_key(tmp_path):
    trusted, other = signing.Publisher.generate(), signing.Publisher.generate()
    raw = trusted.sign(MANIFEST, "models", "m.bin")
    opened = signing.open_envelope(raw, trusted.public_key, "models", "m.bin")
    assert opened == {**MANIFEST, "folder": "models", "name": "m.bin"}
    # A trust file with several PEM blocks, as TRUSTED_PUBLISHERS holds.
    trust_file = signing.write_trusted(tmp_path / "trusted.pem", [other, trusted.public_key])
    assert signing.open_envelope(raw, trust_file, "models", "m.bin") == opened
    assert signing.open_envelope(raw, [other, trusted], "models", "m.bin") == opened
    with pytest.raises(ValueError, match="trusted"):
        signing.open_envelope(raw, other.public_key, "models", "m.bin")
    with pytest.raises(ValueError, match="trusted"):
        signing.open_envelope(raw, [], "models", "m.bin")


def test_one_trusted_signature_among_several_is_enough_and_keyids_are_hints():
    trusted, other = signing.Publisher.generate(), signing.Publisher.generate()
    m = signing.payload(MANIFEST, "models", "m.bin")
    both = signing.envelope(m, [other.signature(m), trusted.signature(m)])
    assert signing.open_envelope(both, trusted.public_key, "models", "m.bin")["name"] == "m.bin"
    misnamed = {**trusted.signature(m), "keyid": other.keyid}
    assert signing.open_envelope(signing.envelope(m, [misnamed]), trusted, "models", "m.bin")
    with pytest.raises(ValueError):
        signing.open_envelope(signing.envelope(m, [other.signature(m)]), trusted, "models", "m.bin")


def _forgeries():
    trusted = signing.Publisher.generate()
    m = signing.payload(MANIFEST, "models", "m.bin")
    good = trusted.signature(m)
    flipped = bytearray(base64.b64decode(good["sig"]))
    flipped[0] ^= 1
    other_type = "application/vnd.in-toto+json"
    return trusted, {
        "not json": b"{not json",
        "a list": b"[]",
        "the plain manifest": json.dumps(MANIFEST).encode(),
        "no signatures": signing.envelope(m, []),
        "signatures not a list": json.dumps(
            {"payloadType": signing.PAYLOAD_TYPE, "payload": "", "signatures": {}}
        ).encode(),
        "another payload type": signing.envelope(m, [trusted.signature(m, other_type)], other_type),
        "signed as another type": signing.envelope(m, [trusted.signature(m, other_type)]),
        "payload changed": signing.envelope(m.replace(b'"size":3', b'"size":4'), [good]),
        "signature changed": signing.envelope(
            m, [{**good, "sig": base64.b64encode(bytes(flipped)).decode()}]
        ),
        "signature not base64": signing.envelope(m, [{**good, "sig": "***"}]),
        "signature not a string": signing.envelope(m, [{**good, "sig": 7}]),
        "signature not an object": signing.envelope(m, ["sig"]),
        "payload not base64": json.dumps(
            {"payloadType": signing.PAYLOAD_TYPE, "payload": "*", "signatures": [good]}
        ).encode(),
        "another name": trusted.sign(MANIFEST, "models", "other.bin"),
        "another folder": trusted.sign(MANIFEST, "other", "m.bin"),
        "no name": signing.envelope(
            json.dumps(MANIFEST).encode(), [trusted.signature(json.dumps(MANIFEST).encode())]
        ),
        "payload not json": signing.envelope(b"\xff", [trusted.signature(b"\xff")]),
    }


TRUSTED, FORGERIES = _forgeries()


@pytest.mark.parametrize("what", sorted(FORGERIES))
def test_open_envelope_refuses(what):
    with pytest.raises(ValueError):
        signing.open_envelope(FORGERIES[what], TRUSTED.public_key, "models", "m.bin")


def test_is_envelope_tells_a_signed_manifest_from_a_plain_one():
    assert signing.is_envelope(TRUSTED.sign(MANIFEST, "models", "m.bin"))
    assert not signing.is_envelope(json.dumps(MANIFEST).encode())
    assert not signing.is_envelope(b"\xff{")


# --- waiting ---------------------------------------------------------------------------------------


def test_until_returns_the_first_true_value():
    answers = iter([None, 0, {"state": "ready"}])
    assert until(lambda: next(answers)) == {"state": "ready"}


def test_until_times_out_naming_what_it_last_saw():
    seen = []
    with pytest.raises(TimeoutError, match=r"^the unlock is still 'decrypting'$"):
        until(lambda: seen.append("decrypting"), 0.05, lambda: f"the unlock is still {seen[-1]!r}")
    assert len(seen) >= 2  # it polled again before it gave up
