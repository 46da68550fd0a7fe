"""signing: DSSE envelopes over manifests, Ed25519 (contract section 9) — the encoding, the key files a
publisher makes with openssl, and every way a manifest can fail to be vouched for; then the same through a
ModelStore (moto's S3, the in-memory API): a refused manifest costs no byte of the model."""

import base64
import hashlib
import json
import os
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

import signing
from errors import IntegrityError
from manifest import ManifestError, document
from signing import PAYLOAD_TYPE, Publisher, SignatureError, Trust, keyid, pae
from tests.store_fakes import ended, load, make_store

DOC = {"format": 2, "size": 1, "blocks": []}  # any JSON object: signing does not read the manifest's fields


def pem_public(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem_private(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def envelope(payload, signatures, payload_type=PAYLOAD_TYPE):
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": signatures,
    }


def signature(key, payload, kid=None, payload_type=PAYLOAD_TYPE):
    sig = key.sign(b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload))
    return {"keyid": keyid(key.public_key()) if kid is None else kid, "sig": base64.b64encode(sig).decode()}


def opened(trust, raw, folder="models", name="m.bin"):
    return trust.open(json.loads(raw), folder, name, f"{folder}/{name}", lambda p: document(p, "it"))


@pytest.fixture(scope="module")
def keys():
    return Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def test_the_compiled_module_is_under_test():
    assert signing.__file__.endswith(".so")


def test_pae_is_dsse_s_encoding():
    # The example of the DSSE specification (protocol.md).
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae(PAYLOAD_TYPE, b"") == b"DSSEv1 36 application/vnd.azaion.manifest+json 0 "


def test_keyid_is_the_sha256_of_the_raw_public_key(keys):
    raw = keys[0].public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32 and keyid(keys[0].public_key()) == hashlib.sha256(raw).hexdigest()


def test_a_signed_manifest_is_the_envelope_of_the_contract(keys):
    raw = Publisher(keys[0]).sign(DOC, "models", "m.bin")
    env = json.loads(raw)
    assert set(env) == {"payloadType", "payload", "signatures"} and env["payloadType"] == PAYLOAD_TYPE
    payload = base64.b64decode(env["payload"], validate=True)
    assert json.loads(payload) == {**DOC, "folder": "models", "name": "m.bin"}
    [entry] = env["signatures"]
    assert entry["keyid"] == keyid(keys[0].public_key())
    # Verified here without the module: Ed25519 over PAE(payloadType, the exact payload bytes).
    keys[0].public_key().verify(base64.b64decode(entry["sig"]), pae(PAYLOAD_TYPE, payload))
    assert opened(Trust([keys[0].public_key()]), raw) == {**DOC, "folder": "models", "name": "m.bin"}


def test_openssl_agrees_both_ways(tmp_path):
    """A publisher's key from `openssl genpkey`, its public half from `openssl pkey -pubout`; openssl
    verifies what the loader signs, and the loader accepts what openssl signs."""
    key, pub = tmp_path / "publisher.pem", tmp_path / "publisher.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True)
    env = json.loads(Publisher.from_file(str(key)).sign(DOC, "models", "m.bin"))
    payload = base64.b64decode(env["payload"])
    (tmp_path / "pae.bin").write_bytes(pae(PAYLOAD_TYPE, payload))
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(env["signatures"][0]["sig"]))
    verify = [
        "openssl",
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        pub,
        "-rawin",
        "-in",
        tmp_path / "pae.bin",
        "-sigfile",
        tmp_path / "sig.bin",
    ]
    assert subprocess.run(verify, capture_output=True).returncode == 0
    (tmp_path / "sig.bin").write_bytes(bytes(64))
    assert subprocess.run(verify, capture_output=True).returncode != 0  # the check can fail

    other = json.dumps({**DOC, "folder": "models", "name": "other.bin"}).encode()
    (tmp_path / "pae.bin").write_bytes(pae(PAYLOAD_TYPE, other))
    subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-sign",
            "-inkey",
            key,
            "-rawin",
            "-in",
            tmp_path / "pae.bin",
            "-out",
            tmp_path / "sig.bin",
        ],
        check=True,
    )
    sig = base64.b64encode((tmp_path / "sig.bin").read_bytes()).decode()
    raw = json.dumps(envelope(other, [{"keyid": "", "sig": sig}]))
    assert opened(Trust.from_file(str(pub)), raw, name="other.bin")["name"] == "other.bin"


def test_trusted_publishers_holds_several_keys_and_rotation_accepts_either(tmp_path, keys):
    old, new = keys
    path = tmp_path / "trusted.pem"
    path.write_bytes(b"# the publishers of this fleet\n" + pem_public(old) + b"\n" + pem_public(new))
    trust = Trust.from_file(str(path))
    assert set(trust.keys) == {keyid(old.public_key()), keyid(new.public_key())}
    for key in keys:
        assert opened(trust, Publisher(key).sign(DOC, "models", "m.bin"))["name"] == "m.bin"
    assert trust.signed_loads == 2 and trust.refusals == 0


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "holds no PEM public key"),
        (b"not a key", "holds no PEM public key"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "public key 1 is not valid PEM"),
        ("rsa", "public key 1 is a .*not an Ed25519 key"),
    ],
)
def test_a_trusted_publishers_file_that_is_not_one_is_a_clear_configuration_error(tmp_path, content, reason):
    if content == "rsa":
        content = pem_public(generate_private_key(65537, 2048))
    path = tmp_path / "trusted.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"TRUSTED_PUBLISHERS '{path}'.*{reason}"):
        Trust.from_file(str(path))


def test_a_publisher_key_file_that_is_not_one_is_a_clear_error_that_never_shows_the_key(tmp_path, keys):
    path = tmp_path / "key.pem"
    with pytest.raises(ValueError, match="cannot be read"):
        Publisher.from_file(str(path))
    path.write_bytes(pem_public(keys[0]))  # the public half, by mistake
    with pytest.raises(ValueError, match="holds no unencrypted PEM private key"):
        Publisher.from_file(str(path))
    locked = keys[0].private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path.write_bytes(locked)
    with pytest.raises(ValueError, match="holds no unencrypted PEM private key") as caught:
        Publisher.from_file(str(path))
    assert locked.decode().splitlines()[1] not in str(caught.value)
    path.write_bytes(pem_private(generate_private_key(65537, 2048)))
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        Publisher.from_file(str(path))
    path.write_bytes(pem_private(keys[0]))
    assert Publisher.from_file(str(path)).keyid == keyid(keys[0].public_key())


def _refusals(keys):
    """(name, envelope JSON) of each way an envelope fails; all but the last are signed for models/m.bin."""
    trusted, stranger = keys
    payload = json.dumps({**DOC, "folder": "models", "name": "m.bin"}).encode()
    good = signature(trusted, payload)
    changed = payload.replace(b'"size": 1', b'"size": 2')
    return [
        ("payload changed after signing", envelope(changed, [good])),
        ("signed by an untrusted key", envelope(payload, [signature(stranger, payload)])),
        (
            "an untrusted key named by a trusted key's keyid",
            envelope(payload, [signature(stranger, payload, kid=keyid(trusted.public_key()))]),
        ),
        (
            "a trusted key's signature under another keyid",
            envelope(payload, [signature(trusted, payload, "ab" * 32)]),
        ),
        (
            "another payloadType",
            envelope(
                payload, [signature(trusted, payload, payload_type="text/plain")], payload_type="text/plain"
            ),
        ),
        (
            "a signature over another payloadType",
            envelope(payload, [signature(trusted, payload, payload_type="text/plain")]),
        ),
        ("no signatures", envelope(payload, [])),
        ("signatures not a list", {**envelope(payload, []), "signatures": good}),
        ("a signature not an object", envelope(payload, ["sig"])),
        ("a signature not Base64", envelope(payload, [{"keyid": good["keyid"], "sig": "!!"}])),
        ("a signature cut short", envelope(payload, [{"keyid": good["keyid"], "sig": good["sig"][:40]}])),
        ("the payload not Base64", {**envelope(payload, [good]), "payload": "%%%"}),
        ("the payload missing", {k: v for k, v in envelope(payload, [good]).items() if k != "payload"}),
        ("too many signatures", envelope(payload, [good] * 17)),
        (
            "signed for another name",
            envelope(
                json.dumps({**DOC, "folder": "models", "name": "x.bin"}).encode(),
                [signature(trusted, json.dumps({**DOC, "folder": "models", "name": "x.bin"}).encode())],
            ),
        ),
    ]


@pytest.mark.parametrize("case", range(15))
def test_every_way_an_envelope_fails_is_a_refusal_that_says_so(keys, case):
    name, env = _refusals(keys)[case]
    trust = Trust([keys[0].public_key()])
    with pytest.raises(
        SignatureError, match="the manifest of models/m.bin is not signed by a trusted publisher"
    ):
        opened(trust, json.dumps(env))
    assert trust.refusals == 1 and trust.signed_loads == 0, name


def test_one_good_signature_among_bad_ones_is_enough_and_url_safe_base64_is_read(keys):
    trusted, stranger = keys
    payload = json.dumps({**DOC, "folder": "models", "name": "m.bin"}).encode()
    good = signature(trusted, payload)
    env = envelope(payload, [signature(stranger, payload), {"sig": "AAAA"}, good])
    env["payload"] = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    assert opened(Trust([trusted.public_key()]), json.dumps(env))["name"] == "m.bin"


def test_a_device_that_trusts_no_publisher_refuses_a_signed_manifest(keys):
    with pytest.raises(SignatureError, match="trusts no publisher"):
        opened(Trust(), Publisher(keys[0]).sign(DOC, "models", "m.bin"))


def test_unsigned_is_counted_and_refused_only_when_signatures_are_required():
    lax, strict = Trust(), Trust(require=True)
    lax.unsigned("models/m.bin")
    assert lax.unsigned_loads == 1 and lax.refusals == 0
    with pytest.raises(SignatureError, match="not signed by a trusted publisher .*REQUIRE_SIGNATURE"):
        strict.unsigned("models/m.bin")
    assert strict.unsigned_loads == 0 and strict.refusals == 1


# --- through a ModelStore ---------------------------------------------------------------------------------


def upload(store, data, name="m.bin", folder="models"):
    up = store.begin_upload(name)
    up.write(data)
    return up.finish(folder)


@pytest.fixture
def signed(tmp_path, s3, keys):
    """A store whose uploads are signed by ``keys[0]`` and whose loads trust it, with one model uploaded."""
    store, api, cache = make_store(
        tmp_path, s3, publisher=Publisher(keys[0]), trust=Trust([keys[0].public_key()])
    )
    data = os.urandom(300_000)
    upload(store, data)
    cache.discard("models", "m.bin.big")
    return store, api, cache, data


def test_an_upload_signs_its_manifest_and_a_load_verifies_it(signed, keys):
    store, api, cache, data = signed
    env = json.loads(api.store[("models", "m.bin.manifest")])
    payload = json.loads(base64.b64decode(env["payload"]))
    assert (payload["folder"], payload["name"], payload["size"]) == ("models", "m.bin", len(data))
    assert load(store) == data and store.trust.signed_loads == 1
    ended(cache)  # the download the load followed is committed: the prefetch finds the part cached
    status, _ = store.prefetch("models", "m.bin")
    assert status == 200 and store.trust.signed_loads == 2


def refused_before_the_cdn(store, cache, match, name="m.bin"):
    """The load and the prefetch are refused, and neither started a download."""
    for call in (store.load, store.prefetch):
        with pytest.raises(IntegrityError, match=match):
            call("models", name)
    assert cache.downloads == 0 and cache.transfers() == []


def test_a_store_that_trusts_another_publisher_refuses_before_any_download(tmp_path, s3, signed, keys):
    _, api, _, _ = signed
    other, _, cache = make_store(tmp_path / "other", s3, api=api, trust=Trust([keys[1].public_key()]))
    refused_before_the_cdn(other, cache, "not signed by a trusted publisher: no signature verifies")
    assert other.trust.refusals == 2


def test_a_signed_manifest_copied_to_another_name_is_refused(signed, s3):
    store, api, cache, _ = signed
    for suffix in (".manifest", ".small"):
        api.store[("models", "copy.bin" + suffix)] = api.store[("models", "m.bin" + suffix)]
    s3.copy_object(Bucket="models", Key="copy.bin.big", CopySource={"Bucket": "models", "Key": "m.bin.big"})
    refused_before_the_cdn(
        store,
        cache,
        "not signed by a trusted publisher for it: it was signed for models/m.bin",
        name="copy.bin",
    )


def test_require_signature_refuses_unsigned_and_format_1_and_loads_what_is_signed(tmp_path, s3, signed, keys):
    from tests.store_fakes import publish

    store, api, _, data = signed
    strict, _, cache = make_store(tmp_path / "strict", s3, api=api, trust=Trust([keys[0].public_key()], True))
    assert load(strict) == data
    unsigned, _, _ = make_store(tmp_path / "unsigned", s3, api=api)
    upload(unsigned, os.urandom(1000), name="plain.bin")
    publish(s3, api, os.urandom(1000), name="old.bin")
    refused = cache.downloads
    for name, why in (
        ("plain.bin", "its manifest is not signed"),
        ("old.bin", "it has no manifest: format 1"),
    ):
        for call in (strict.load, strict.prefetch):
            with pytest.raises(
                SignatureError, match=f"models/{name} is not signed by a trusted publisher \\({why}"
            ):
                call("models", name)
    assert cache.downloads == refused
    # Without REQUIRE_SIGNATURE both load, the unsigned one counted.
    lax, _, _ = make_store(tmp_path / "lax", s3, api=api, trust=Trust([keys[0].public_key()]))
    load(lax, "plain.bin")
    load(lax, "old.bin")
    assert lax.trust.unsigned_loads == 1 and lax.format1_loads == 1


def test_a_signed_manifest_whose_payload_is_no_manifest_is_the_manifest_s_error(signed, keys):
    store, api, _, _ = signed
    api.store[("models", "m.bin.manifest")] = Publisher(keys[0]).sign({"format": 2}, "models", "m.bin")
    with pytest.raises(ManifestError, match="the manifest of models/m.bin is not valid: it lacks key"):
        store.load("models", "m.bin")
