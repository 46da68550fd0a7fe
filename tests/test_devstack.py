"""The dev stack itself: the reference Resource API against contract section 3, the publisher's split
against sections 2 and 7 (format 1 and the sealed format 2) and its signed manifests (section 9), the API's
compromised mode, SeaweedFS's identities, and the fault proxy. One stack serves the whole module (the
compromise test runs a stack of its own)."""

import base64
import hashlib
import io
import json
import time
import tracemalloc
import uuid

import boto3
import jwt
import pytest
import requests
import yaml
from botocore.config import Config
from botocore.exceptions import ClientError, ResponseStreamingError
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from devstack import crypto, signing
from devstack.processes.faultproxy import FaultProxy
from devstack.processes.seaweed import SeaweedFS
from devstack.seed import (
    DEMO_FOLDER,
    DEMO_MODEL,
    DEMO_MODEL_SHA256,
    DEMO_USERS,
    LEGACY_MODEL,
    LEGACY_MODEL_SHA256,
    seed,
)
from devstack.split import MANIFEST_BLOCK_SIZE, Published, publish_resource
from devstack.stack import Stack
from devstack.wait import until

pytestmark = pytest.mark.integration

LONG_ID = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier"
LONG_EMAIL = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name"
LONG_ROLE = "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture
def http():
    session = requests.Session()
    session.trust_env = False
    return session


@pytest.fixture
def account(stack):
    """A fresh account per test, so hardware bindings never leak between tests."""
    email, password = f"{uuid.uuid4().hex[:8]}@test.local", "pa55-" + uuid.uuid4().hex
    stack.add_user(email, password, ["Operator"])
    return email, password


def login(http, stack, email, password) -> str:
    response = http.post(f"{stack.api_url}/login", json={"email": email, "password": password}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["token"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def get_resource(http, stack, token, folder, name, password, hardware):
    url = f"{stack.api_url}/resources/get" + (f"/{folder}" if folder else "")
    body = {"fileName": name, "password": password, "hardware": hardware}
    return http.post(url, json=body, headers=bearer(token), timeout=10)


# --- login -----------------------------------------------------------------------------------------


def test_login_issues_a_jwt_with_the_net_claims(stack, http, account):
    email, password = account
    claims = jwt.decode(login(http, stack, email, password), options={"verify_signature": False})
    assert claims[LONG_EMAIL] == email
    assert claims[LONG_ROLE] == "Operator"
    assert claims[LONG_ID]
    assert claims["exp"] > time.time()


def test_several_roles_are_a_list_and_short_claims_are_a_switch(stack, http):
    stack.add_user("multi@test.local", "pw", ["Operator", "Validator"])
    claims = jwt.decode(login(http, stack, "multi@test.local", "pw"), options={"verify_signature": False})
    assert claims[LONG_ROLE] == ["Operator", "Validator"]
    stack.set_claims_style("short")
    try:
        claims = jwt.decode(login(http, stack, "multi@test.local", "pw"), options={"verify_signature": False})
        assert claims["unique_name"] == "multi@test.local" and claims["role"] == ["Operator", "Validator"]
        assert claims["nameid"]
    finally:
        stack.set_claims_style("long")


@pytest.mark.parametrize(
    "body, status",
    [
        ({"email": "nobody@test.local", "password": "x"}, 401),
        ({"email": "multi@test.local", "password": "wrong"}, 401),
        ({"email": "multi@test.local"}, 422),
    ],
)
def test_login_refusals(stack, http, body, status):
    stack.add_user("multi@test.local", "pw", ["Operator", "Validator"])
    assert http.post(f"{stack.api_url}/login", json=body, timeout=10).status_code == status


def test_an_expired_token_is_401(stack, http, account):
    stack.set_key_fragment(b"fragment")
    stack.set_token_ttl(2)
    try:
        token = login(http, stack, *account)

        def key_fragment():
            return http.get(f"{stack.api_url}/binary-split/key-fragment", headers=bearer(token), timeout=10)

        assert key_fragment().status_code == 200
        until(lambda: key_fragment().status_code == 401, 10, "the token never expired")
    finally:
        stack.set_token_ttl(3600)


# --- resources -------------------------------------------------------------------------------------


def test_resource_get_statuses_and_hardware_binding(stack, http, account):
    email, password = account
    stack.put_file("models", "thing.small", b"the small part")
    token = login(http, stack, email, password)

    assert http.post(f"{stack.api_url}/resources/get/models", json={}, timeout=10).status_code == 401
    assert get_resource(http, stack, token, "models", "thing.small", "wrong", "HW-A").status_code == 403
    ok = get_resource(http, stack, token, "models", "thing.small", password, "HW-A")
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/octet-stream"
    assert crypto.decrypt(crypto.api_key(email, password, "HW-A"), ok.content) == b"the small part"
    assert get_resource(http, stack, token, "models", "thing.small", password, "HW-B").status_code == 409
    assert get_resource(http, stack, token, "models", "missing.small", password, "HW-A").status_code == 404
    assert get_resource(http, stack, token, "models", "..", password, "HW-A").status_code == 400
    assert next(u for u in stack.admin.users() if u["email"] == email)["hardware"] == "HW-A"

    stack.reset_hardware(email)
    assert get_resource(http, stack, token, "models", "thing.small", password, "HW-B").status_code == 200


def test_cdn_yaml_is_a_root_resource(stack, http, account):
    email, password = account
    token = login(http, stack, email, password)
    response = get_resource(http, stack, token, None, "cdn.yaml", password, "HW")
    cdn = yaml.safe_load(crypto.decrypt(crypto.api_key(email, password, "HW"), response.content))
    assert cdn["host"] == stack.s3_endpoint
    assert {
        "downloader_access_key",
        "downloader_access_secret",
        "uploader_access_key",
        "uploader_access_secret",
    } <= set(cdn)


def test_upload_needs_an_uploading_role(stack, http, account):
    token = login(http, stack, *account)
    files = {"data": ("up.small", b"uploaded bytes")}
    assert (
        http.post(
            f"{stack.api_url}/resources/models", files=files, headers=bearer(token), timeout=10
        ).status_code
        == 403
    )

    stack.add_user("uploader@test.local", "pw", ["ResourceUploader"])
    token = login(http, stack, "uploader@test.local", "pw")
    response = http.post(f"{stack.api_url}/resources/models", files=files, headers=bearer(token), timeout=10)
    assert response.status_code == 201
    assert stack.admin.get_file("models", "up.small") == b"uploaded bytes"


def test_key_fragment(stack, http, account):
    token = login(http, stack, *account)
    url = f"{stack.api_url}/binary-split/key-fragment"
    stack.set_key_fragment(None)
    assert http.get(url, headers=bearer(token), timeout=10).status_code == 404
    stack.set_key_fragment(b"\x00fragment\xff")
    response = http.get(url, headers=bearer(token), timeout=10)
    assert response.status_code == 200 and response.content == b"\x00fragment\xff"
    assert http.get(url, timeout=10).status_code == 401


# --- the split -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("size", [0, 1, 15, 16, 1000, 10207, 10208, 3 * 1024 * 1024 + 5])
def test_publish_splits_by_the_k_rule(stack, size, fmt):
    data = hashlib.shake_256(str(size).encode()).digest(size)
    published = stack.publish("splits", f"r{size}-{fmt}.bin", data, format=fmt)
    encrypted = crypto.encrypted_size(size)
    assert published.format == fmt
    assert published.encrypted_size == encrypted
    assert published.small_size == min(3072, int(encrypted * 3 // 10))

    small = stack.admin.get_file("splits", f"r{size}-{fmt}.bin.small")
    big = stack.read_cdn("splits", f"r{size}-{fmt}.bin.big")
    assert (len(small), len(big)) == (published.small_size, encrypted - published.small_size)
    key = crypto.resource_key() if fmt == 1 else published.data_key
    assert crypto.decrypt(key, small + big) == data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_parts(stack, folder: str, name: str) -> tuple[bytes, bytes]:
    return stack.admin.get_file(folder, name + ".small"), stack.read_cdn(folder, name + ".big")


def test_format_2_manifest_matches_what_is_stored(stack, http, account):
    data = hashlib.shake_256(b"sealed").digest(100_000)
    published = stack.publish("sealed", "m.bin", data)
    assert published.format == 2 and len(published.data_key) == 32

    stored = stack.admin.get_file("sealed", "m.bin.manifest")
    manifest = json.loads(stored.decode("utf-8"))  # stored as plain UTF-8 JSON
    assert manifest == stack.manifest("sealed", "m.bin") == published.manifest
    small, big = stored_parts(stack, "sealed", "m.bin")
    assert set(manifest) == {"format", "key", "size", "blobSize", "small", "big", "blockSize", "blocks"}
    assert manifest["format"] == 2
    assert base64.b64decode(manifest["key"], validate=True) == published.data_key
    assert manifest["size"] == len(data)
    assert manifest["blobSize"] == len(small) + len(big) == crypto.encrypted_size(len(data))
    assert manifest["small"] == sha256(small) == published.small_sha256
    assert manifest["big"] == sha256(big) == published.big_sha256
    assert manifest["blockSize"] == MANIFEST_BLOCK_SIZE == 4194304
    assert manifest["blocks"] == [sha256(big)]
    assert crypto.decrypt(published.data_key, small + big) == data

    # The reference API hands the manifest out like every resource: a blob under the API key.
    email, password = account
    response = get_resource(
        http, stack, login(http, stack, email, password), "sealed", "m.bin.manifest", password, "HW"
    )
    assert response.status_code == 200
    assert json.loads(crypto.decrypt(crypto.api_key(email, password, "HW"), response.content)) == manifest


def test_format_2_uses_a_fresh_data_key_for_every_publish(stack):
    first = stack.publish("sealed", "again.bin", b"same bytes" * 2000)
    second = stack.publish("sealed", "again.bin", b"same bytes" * 2000)
    assert first.data_key != second.data_key
    assert stack.manifest("sealed", "again.bin")["key"] == base64.b64encode(second.data_key).decode()
    assert crypto.resource_key() not in (first.data_key, second.data_key)


def test_format_2_blocks_cover_the_big_part_in_4_mib_steps(stack):
    data = hashlib.shake_256(b"three blocks").digest(9 * 1024 * 1024 + 5)
    published = stack.publish("sealed", "blocks.bin", data)
    manifest = stack.manifest("sealed", "blocks.bin")
    small, big = stored_parts(stack, "sealed", "blocks.bin")
    bs = manifest["blockSize"]
    assert len(small) == 3072 and len(big) == crypto.encrypted_size(len(data)) - 3072
    assert len(manifest["blocks"]) == 3 and 0 < len(big) - 2 * bs < bs  # the last block is short
    assert manifest["blocks"] == [sha256(big[i * bs : (i + 1) * bs]) for i in range(3)]
    assert list(published.block_sha256) == manifest["blocks"]
    assert manifest["big"] == sha256(big) and manifest["small"] == sha256(small)
    assert crypto.decrypt(published.data_key, small + big) == data


@pytest.mark.parametrize("size", [1000, 200_000])
def test_format_2_is_what_openssl_decrypts(stack, openssl, size):
    data = hashlib.shake_256(f"openssl {size}".encode()).digest(size)
    published = stack.publish("sealed", f"openssl-{size}.bin", data)
    small, big = stored_parts(stack, "sealed", f"openssl-{size}.bin")
    blob = small + big
    key = base64.b64decode(stack.manifest("sealed", f"openssl-{size}.bin")["key"])
    assert key == published.data_key
    plain = openssl.decrypt(key, blob[:16], blob[16:])
    assert plain == data


def _decrypt_without_padding_check(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    whole = len(ciphertext) // 16 * 16
    return Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor().update(ciphertext[:whole])


def _shares_a_4k_window(resource: bytes, text: bytes) -> bool:
    """Whether ``text`` holds any 4 KiB window of ``resource``: every such window contains a whole
    2 KiB-aligned 2 KiB piece of ``resource``, so looking for those pieces is enough."""
    return any(resource[i : i + 2048] in text for i in range(0, len(resource) - 2047, 2048))


@pytest.mark.parametrize("fmt, leaks", [(1, True), (2, False)])
def test_the_big_part_alone_under_the_resource_key(stack, fmt, leaks):
    """Format 1's big part decrypts to all of the model but its head under the compiled-in key; format 2's
    to noise. Format 1 is the control that shows the check can see a leak."""
    data = hashlib.shake_256(b"leak check").digest(512 * 1024)
    stack.publish("sealed", f"leak-{fmt}.bin", data, format=fmt)
    big = stack.read_cdn("sealed", f"leak-{fmt}.bin.big")
    revealed = _decrypt_without_padding_check(crypto.resource_key(), big[:16], big[16:])
    assert _shares_a_4k_window(data, revealed) is leaks


def test_format_1_over_a_format_2_name_leaves_no_manifest(stack):
    stack.publish("sealed", "downgrade.bin", b"two" * 5000)
    assert stack.manifest("sealed", "downgrade.bin") is not None
    data = b"one" * 6000
    published = stack.publish("sealed", "downgrade.bin", data, format=1)
    assert published.format == 1 and published.data_key is None and published.manifest is None
    assert published.key == crypto.resource_key()
    assert stack.manifest("sealed", "downgrade.bin") is None
    assert stack.admin.get_file("sealed", "downgrade.bin.manifest") is None
    small, big = stored_parts(stack, "sealed", "downgrade.bin")
    assert sha256(small) == published.small_sha256 and sha256(big) == published.big_sha256
    assert crypto.decrypt(crypto.resource_key(), small + big) == data


class _Recorder:
    """Passes every call through to ``target`` and notes which upload it was."""

    def __init__(self, target, log: list, what):
        self._target, self._log, self._what = target, log, what

    def __getattr__(self, attr):
        method = getattr(self._target, attr)

        def call(*args, **kwargs):
            note = self._what(attr, args)
            if note:
                self._log.append(note)
            return method(*args, **kwargs)

        return call


def test_format_2_uploads_big_then_small_then_manifest(stack):
    log: list[str] = []
    api = _Recorder(stack.admin, log, lambda attr, args: f"api {attr} {args[1]}" if "file" in attr else None)
    s3 = _Recorder(
        stack.s3_admin_client(),
        log,
        lambda attr, args: f"s3 {attr} {args[2]}" if attr == "upload_file" else None,
    )
    publish_resource(api, s3, "sealed", "order.bin", b"x" * 50_000, stack.data_dir)
    publish_resource(api, s3, "sealed", "order.bin", b"y" * 50_000, stack.data_dir, format=1)
    assert log == [
        "s3 upload_file order.bin.big",
        "api put_file order.bin.small",
        "api put_file order.bin.manifest",
        "s3 upload_file order.bin.big",
        "api put_file order.bin.small",
        "api delete_file order.bin.manifest",
    ]


def test_publish_refuses_an_unknown_format(stack):
    with pytest.raises(ValueError, match="format"):
        stack.publish("sealed", "nope.bin", b"x", format=3)


def test_a_signed_publish_stores_an_envelope_over_m(stack, http, account):
    data = hashlib.shake_256(b"signed").digest(100_000)
    published = stack.publish("sealed", "signed.bin", data, signer=stack.publisher)
    stored = stack.stored_manifest("sealed", "signed.bin")
    assert published.signed and stored == published.envelope == published.stored_manifest
    envelope = json.loads(stored)
    assert envelope["payloadType"] == signing.PAYLOAD_TYPE
    assert base64.b64decode(envelope["payload"], validate=True) == published.payload
    m = stack.open_manifest("sealed", "signed.bin")
    assert (
        m == json.loads(published.payload) == {**published.manifest, "folder": "sealed", "name": "signed.bin"}
    )
    small, big = stored_parts(stack, "sealed", "signed.bin")
    assert m["small"] == sha256(small) and m["big"] == sha256(big) and m["blocks"] == [sha256(big)]
    assert crypto.decrypt(base64.b64decode(m["key"]), small + big) == data
    with pytest.raises(ValueError, match="trusted"):
        stack.open_manifest("sealed", "signed.bin", trusted=signing.Publisher.generate())
    with pytest.raises(ValueError, match="for"):
        signing.open_envelope(stored, stack.publisher.public_key, "sealed", "other.bin")

    # The API hands the envelope out like every resource.
    email, password = account
    response = get_resource(
        http, stack, login(http, stack, email, password), "sealed", "signed.bin.manifest", password, "HW"
    )
    assert crypto.decrypt(crypto.api_key(email, password, "HW"), response.content) == stored

    unsigned = stack.publish("sealed", "signed.bin", data)  # the default stays unsigned
    assert not unsigned.signed and unsigned.envelope is None and unsigned.payload is None
    assert stack.stored_manifest("sealed", "signed.bin") == unsigned.stored_manifest
    assert not signing.is_envelope(unsigned.stored_manifest)
    with pytest.raises(ValueError):
        stack.open_manifest("sealed", "signed.bin")
    with pytest.raises(ValueError, match="format 2"):
        stack.publish("sealed", "signed.bin", data, format=1, signer=stack.publisher)


def test_stack_helpers_change_what_is_stored(stack):
    published = stack.publish("sealed", "helpers.bin", b"helpers" * 3000)
    big = stack.read_cdn("sealed", "helpers.bin.big")

    etag = stack.tamper_cdn("sealed", "helpers.bin.big", 100)
    tampered = stack.read_cdn("sealed", "helpers.bin.big")
    assert etag != published.etag and len(tampered) == len(big)
    assert [i for i in range(len(big)) if big[i] != tampered[i]] == [100]
    assert tampered[100] == big[100] ^ 0x01
    stack.tamper_cdn("sealed", "helpers.bin.big", -1, xor=0x80)
    assert stack.read_cdn("sealed", "helpers.bin.big")[-1] == big[-1] ^ 0x80

    stack.replace_cdn("sealed", "helpers.bin.big", big)
    assert stack.read_cdn("sealed", "helpers.bin.big") == big

    stack.put_manifest("sealed", "helpers.bin", b"{not json")
    assert stack.admin.get_file("sealed", "helpers.bin.manifest") == b"{not json"
    stack.put_manifest("sealed", "helpers.bin", published.manifest)
    assert stack.manifest("sealed", "helpers.bin") == published.manifest

    assert stack.delete_file("sealed", "helpers.bin.manifest") is True
    assert stack.manifest("sealed", "helpers.bin") is None
    assert stack.delete_file("sealed", "helpers.bin.manifest") is False


# --- S3 identities ---------------------------------------------------------------------------------


def test_downloader_reads_uploader_writes(stack):
    stack.publish("perms", "p.bin", b"x" * 100)
    downloader, uploader = stack.s3_client("downloader"), stack.s3_client("uploader")
    assert downloader.get_object(Bucket="perms", Key="p.bin.big")["Body"].read()
    with pytest.raises(ClientError) as refused:
        downloader.put_object(Bucket="perms", Key="evil", Body=b"no")
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    uploader.put_object(Bucket="perms", Key="fine", Body=b"yes")
    assert downloader.get_object(Bucket="perms", Key="fine")["Body"].read() == b"yes"
    with pytest.raises(ClientError):
        uploader.create_bucket(Bucket="not-for-uploaders")


# --- counters and faults of the API ----------------------------------------------------------------


def test_counters_and_injected_faults(stack, http, account):
    email, password = account
    stack.reset_counters()
    stack.set_fault("POST /login", status=503, count=2)
    statuses = [
        http.post(f"{stack.api_url}/login", json={"email": email, "password": password}).status_code
        for _ in range(3)
    ]
    assert statuses == [503, 503, 200]
    assert stack.counters() == {"POST /login": 3}

    stack.set_fault("POST /login", garbage="not_jwt")
    assert http.post(f"{stack.api_url}/login", json={"email": email, "password": password}).json() == {
        "token": "this-is-not-a-jwt"
    }
    stack.set_fault("POST /resources/get*", status=502, garbage="html", count=None)
    token = login(http, stack, email, password)
    for folder in (None, "models"):
        response = get_resource(http, stack, token, folder, "x", password, "HW")
        assert response.status_code == 502 and response.text.startswith("<html>")
    stack.clear_faults()
    stack.set_fault("GET /binary-split/key-fragment", delay=0.5)
    started = time.monotonic()
    http.get(f"{stack.api_url}/binary-split/key-fragment", headers=bearer(token), timeout=10)
    assert time.monotonic() - started >= 0.5


def test_api_restart_keeps_its_state(stack, http, account):
    email, password = account
    token = login(http, stack, email, password)
    stack.put_file("models", "keep.small", b"kept")
    assert get_resource(http, stack, token, "models", "keep.small", password, "HW-1").status_code == 200
    stack.stop_api()
    with pytest.raises(requests.ConnectionError):
        http.post(f"{stack.api_url}/login", json={"email": email, "password": password}, timeout=2)
    stack.start_api()
    assert get_resource(http, stack, token, "models", "keep.small", password, "HW-1").status_code == 200
    assert get_resource(http, stack, token, "models", "keep.small", password, "HW-2").status_code == 409


def _seeded_model(http, stack, name: str) -> tuple[bytes | None, bytes]:
    """The manifest as served (None: format 1) and the model decrypted under the key of the manifest the
    stack's publisher signed, fetched as an operator would."""
    email, (password, _) = next(iter(DEMO_USERS.items()))
    token = login(http, stack, email, password)
    api_key = crypto.api_key(email, password, "HW")

    def fetch(file_name: str) -> bytes | None:
        response = get_resource(http, stack, token, DEMO_FOLDER, file_name, password, "HW")
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        return crypto.decrypt(api_key, response.content)

    stored = fetch(name + ".manifest")
    small = fetch(name + ".small")
    big = stack.s3_client("downloader").get_object(Bucket=DEMO_FOLDER, Key=name + ".big")["Body"].read()
    if stored is None:
        return None, crypto.decrypt(crypto.resource_key(), small + big)
    manifest = signing.open_envelope(stored, stack.publisher.public_key, DEMO_FOLDER, name)
    assert manifest["small"] == sha256(small) and manifest["big"] == sha256(big)
    return stored, crypto.decrypt(base64.b64decode(manifest["key"]), small + big)


def test_seed_is_repeatable(stack, http):
    first = seed(stack)
    demo_manifest = stack.stored_manifest(DEMO_FOLDER, DEMO_MODEL)
    again = seed(stack)
    assert again.key_fragment == first.key_fragment
    assert stack.stored_manifest(DEMO_FOLDER, DEMO_MODEL) == demo_manifest  # not published again

    manifest, demo = _seeded_model(http, stack, DEMO_MODEL)
    assert manifest == demo_manifest
    assert sha256(demo) == DEMO_MODEL_SHA256 == again.model_sha256
    manifest, legacy = _seeded_model(http, stack, LEGACY_MODEL)
    assert manifest is None
    assert sha256(legacy) == LEGACY_MODEL_SHA256 == again.legacy_model_sha256
    assert len(legacy) == 1024 * 1024 and again.legacy_model == LEGACY_MODEL


def test_the_seeded_demo_model_is_signed_by_the_stack_publisher(stack):
    seed(stack)
    stored = stack.stored_manifest(DEMO_FOLDER, DEMO_MODEL)
    envelope = json.loads(stored)
    assert envelope["payloadType"] == signing.PAYLOAD_TYPE
    assert [s["keyid"] for s in envelope["signatures"]] == [stack.publisher.keyid]
    m = signing.open_envelope(stored, stack.publisher_key_files[1], DEMO_FOLDER, DEMO_MODEL)
    assert m["format"] == 2 and (m["folder"], m["name"]) == (DEMO_FOLDER, DEMO_MODEL)
    assert m["size"] == 5 * 1024 * 1024
    with pytest.raises(ValueError, match="trusted"):
        signing.open_envelope(stored, signing.Publisher.generate().public_key, DEMO_FOLDER, DEMO_MODEL)
    with pytest.raises(ValueError, match="for"):
        signing.open_envelope(stored, stack.publisher.public_key, DEMO_FOLDER, LEGACY_MODEL)


def test_seed_brings_models_of_an_older_stack_to_their_format(stack, http):
    seed(stack)
    # A stack seeded before format 2: the demo model has no manifest. And a stray manifest on the legacy one.
    stack.publish(DEMO_FOLDER, DEMO_MODEL, b"an old demo model", format=1)
    stack.put_manifest(DEMO_FOLDER, LEGACY_MODEL, {"format": 2})
    seed(stack)
    manifest, demo = _seeded_model(http, stack, DEMO_MODEL)
    assert manifest is not None and sha256(demo) == DEMO_MODEL_SHA256
    manifest, legacy = _seeded_model(http, stack, LEGACY_MODEL)
    assert manifest is None and sha256(legacy) == LEGACY_MODEL_SHA256

    # A stack seeded before section 9: an unsigned manifest, or one another key signed.
    for signer in (None, signing.Publisher.generate()):
        stack.publish(DEMO_FOLDER, DEMO_MODEL, b"an unsigned demo model", signer=signer)
        seed(stack)
        manifest, demo = _seeded_model(http, stack, DEMO_MODEL)  # opens under the stack's key
        assert sha256(demo) == DEMO_MODEL_SHA256


def test_the_stack_has_one_publisher_key(stack):
    private, public = stack.publisher_key_files
    assert private.parent == public.parent == stack.data_dir / "publisher"
    assert (
        signing.load_public_keys(public)[0].public_bytes_raw()
        == stack.publisher.public_key.public_bytes_raw()
    )
    assert Stack(stack.data_dir).publisher.keyid == stack.publisher.keyid  # another Stack on the same data


# --- the fault proxy in front of SeaweedFS ---------------------------------------------------------


@pytest.fixture
def proxy(stack):
    with FaultProxy(stack.s3_endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def blob_object(stack):
    data = hashlib.shake_256(b"proxy").digest(2 * 1024 * 1024)
    stack.s3_admin_client().create_bucket(Bucket="proxied")
    stack.s3_admin_client().put_object(Bucket="proxied", Key="o.big", Body=data)
    return data


def proxied_client(stack, proxy, identity="downloader"):
    c = stack.s3.credentials[identity]
    return boto3.client(
        "s3",
        endpoint_url=proxy.url,
        region_name="us-east-1",
        aws_access_key_id=c["access_key"],
        aws_secret_access_key=c["secret_key"],
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )


def test_proxy_forwards_signed_requests_with_range_and_if_match(stack, proxy, blob_object):
    s3 = proxied_client(stack, proxy)
    etag = s3.head_object(Bucket="proxied", Key="o.big")["ETag"]
    part = s3.get_object(Bucket="proxied", Key="o.big", Range="bytes=100-199", IfMatch=etag)["Body"].read()
    assert part == blob_object[100:200]
    assert proxy.count("GET", "/proxied/o.big") == 1 and proxy.count("HEAD", "/proxied/o.big") == 1
    seen = [r for r in proxy.seen() if r.method == "GET"][0]
    assert seen.headers["range"] == "bytes=100-199" and seen.headers["if-match"] == etag


def test_proxy_uploads_multipart_through_expect_continue(stack, proxy):
    data = hashlib.shake_256(b"upload").digest(9 * 1024 * 1024)
    s3 = proxied_client(stack, proxy, "uploader")
    s3.upload_fileobj(io.BytesIO(data), "proxied", "uploaded.big")
    assert stack.s3_admin_client().get_object(Bucket="proxied", Key="uploaded.big")["Body"].read() == data


def test_proxy_cuts_and_truncates_bodies(stack, proxy, blob_object):
    s3 = proxied_client(stack, proxy)
    proxy.cut_next(after_bytes=100_000, path="/proxied/*")
    with pytest.raises(ResponseStreamingError, match=r"IncompleteRead\(100000 bytes read"):
        s3.get_object(Bucket="proxied", Key="o.big")["Body"].read()

    proxy.truncate_next()
    with pytest.raises(ResponseStreamingError, match=rf"IncompleteRead\({len(blob_object) // 2} bytes read"):
        s3.get_object(Bucket="proxied", Key="o.big")["Body"].read()

    proxy.cut_next(after_bytes=1000, reset=True)
    with pytest.raises(ResponseStreamingError, match="reset"):
        s3.get_object(Bucket="proxied", Key="o.big")["Body"].read()

    assert s3.get_object(Bucket="proxied", Key="o.big")["Body"].read() == blob_object


def test_proxy_injects_statuses_delays_and_drops(stack, proxy, blob_object, http):
    s3 = proxied_client(stack, proxy)
    proxy.fail_next(503, n=2, method="GET")
    for _ in range(2):
        with pytest.raises(ClientError) as failed:
            s3.get_object(Bucket="proxied", Key="o.big")
        assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert s3.get_object(Bucket="proxied", Key="o.big")["Body"].read() == blob_object
    assert proxy.count("GET", "/proxied/o.big") == 3

    proxy.delay_next(0.5)
    started = time.monotonic()
    s3.head_object(Bucket="proxied", Key="o.big")
    assert time.monotonic() - started >= 0.5

    url = s3.generate_presigned_url("get_object", Params={"Bucket": "proxied", "Key": "o.big"})
    proxy.stall_next(1000, 2.0)
    with pytest.raises((requests.ConnectionError, requests.Timeout)):  # the read timeout fires in the stall
        http.get(url, timeout=(5, 0.5))
    proxy.reset_counts()
    proxy.stall_next(1000, 0.3)
    assert http.get(url, timeout=5).content == blob_object
    assert proxy.stalls() == 1

    proxy.drop_next()
    with pytest.raises(requests.ConnectionError):
        http.get(f"{proxy.url}/proxied/o.big", timeout=5)

    proxy.stop()
    with pytest.raises(requests.ConnectionError):
        http.get(f"{proxy.url}/proxied/o.big", timeout=5)
    proxy.start()
    assert http.get(f"{proxy.url}/proxied/o.big", timeout=5).status_code == 403  # unsigned, but through


def test_proxy_streams_in_constant_memory(stack, proxy, http):
    size = 64 * 1024 * 1024
    stack.s3_admin_client().upload_fileobj(_Zeros(size), "proxied", "zeros.big")
    url = proxied_client(stack, proxy).generate_presigned_url(
        "get_object", Params={"Bucket": "proxied", "Key": "zeros.big"}, ExpiresIn=600
    )
    tracemalloc.start()
    try:
        received = 0
        with http.get(url, stream=True, timeout=60) as response:
            for chunk in response.iter_content(256 * 1024):
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    assert peak < 8 * 1024 * 1024


class _Zeros:
    """A readable of ``size`` zero bytes that never exists in memory whole."""

    def __init__(self, size):
        self.left = size

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


# --- SeaweedFS on its own --------------------------------------------------------------------------


def test_s3_restarts_on_the_same_ports_and_data(stack, blob_object):
    endpoint = stack.s3_endpoint
    stack.stop_s3()
    assert not stack.s3.is_running
    stack.start_s3()
    assert stack.s3_endpoint == endpoint
    assert (
        stack.s3_client("downloader").get_object(Bucket="proxied", Key="o.big")["Body"].read() == blob_object
    )


def test_a_second_seaweedfs_runs_beside_the_first(stack, tmp_path):
    with SeaweedFS(tmp_path / "second") as second:
        assert second.endpoint != stack.s3_endpoint
        second.client("admin").create_bucket(Bucket="second")
        assert "second" in [b["Name"] for b in second.client("downloader").list_buckets()["Buckets"]]


# --- an attacker who controls the Resource API (contract section 9) --------------------------------------


class _Device:
    """What a device gets from an API: files decrypted with its API key, and the CDN its cdn.yaml names."""

    def __init__(self, http, stack, email, password, hardware="HW-DEVICE"):
        self.http, self.stack, self.password, self.hardware = http, stack, password, hardware
        self.token = login(http, stack, email, password)
        self.key = crypto.api_key(email, password, hardware)

    def file(self, folder, name) -> bytes | None:
        response = get_resource(self.http, self.stack, self.token, folder, name, self.password, self.hardware)
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        return crypto.decrypt(self.key, response.content)

    def cdn(self) -> tuple[str, object]:
        cdn = yaml.safe_load(self.file(None, "cdn.yaml"))
        client = boto3.client(
            "s3",
            endpoint_url=cdn["host"],
            region_name=cdn.get("region", "us-east-1"),
            aws_access_key_id=cdn["downloader_access_key"],
            aws_secret_access_key=cdn["downloader_access_secret"],
            config=Config(s3={"addressing_style": "path"}),
        )
        return cdn["host"], client

    def model(self, folder, name, trusted=None) -> bytes:
        """The model as served, under the key of its manifest (opened under ``trusted`` when signed)."""
        manifest = self.file(folder, name + ".manifest")
        if manifest is None:
            key = crypto.resource_key()
        elif signing.is_envelope(manifest):
            key = base64.b64decode(signing.open_envelope(manifest, trusted, folder, name)["key"])
        else:
            key = base64.b64decode(json.loads(manifest)["key"])
        _, s3 = self.cdn()
        big = s3.get_object(Bucket=folder, Key=name + ".big")["Body"].read()
        return crypto.decrypt(key, self.file(folder, name + ".small") + big)


SUBSTITUTED = {"files": ["_root/cdn.yaml", "models/m.bin.manifest", "models/m.bin.small"], "withheld": []}


def test_a_compromised_api_serves_the_attackers_model_until_the_compromise_ends(tmp_path, http):
    real_data, evil_data = b"the real model" * 5000, b"the attacker's model" * 4000
    with Stack(tmp_path / "victim") as victim:
        victim.add_user("op@victim.local", "pw", ["Operator"])
        real: Published = victim.publish("models", "m.bin", real_data, signer=victim.publisher)
        device = _Device(http, victim, "op@victim.local", "pw")
        assert device.model("models", "m.bin", victim.publisher) == real_data
        assert victim.compromised() == {"files": [], "withheld": []}

        # Unsigned: the attacker has no publisher key.
        evil = victim.compromise("models", "m.bin", evil_data)
        attacker = victim.attacker_s3
        assert attacker.is_running and attacker.endpoint != victim.s3_endpoint
        assert victim.compromised() == SUBSTITUTED
        host, s3 = device.cdn()
        assert host == attacker.endpoint  # with keys valid there: the device reads the attacker's big part
        assert (
            s3.get_object(Bucket="models", Key="m.bin.big")["Body"].read()
            == attacker.client().get_object(Bucket="models", Key="m.bin.big")["Body"].read()
        )
        served = device.file("models", "m.bin.manifest")
        assert served == evil.stored_manifest and not signing.is_envelope(served)
        assert json.loads(served)["key"] == base64.b64encode(evil.data_key).decode()
        assert evil.data_key != real.data_key
        assert device.model("models", "m.bin") == evil_data
        # The real files stay stored, and the admin routes show them.
        assert victim.stored_manifest("models", "m.bin") == real.envelope
        assert victim.admin.get_file(None, "cdn.yaml").decode() == victim.cdn_yaml()

        # Signed with a key of the attacker's own: it opens under that key, never under the publisher's.
        rogue = signing.Publisher.generate()
        victim.compromise("models", "m.bin", evil_data, signer=rogue)
        served = device.file("models", "m.bin.manifest")
        assert signing.open_envelope(served, rogue.public_key, "models", "m.bin")
        with pytest.raises(ValueError, match="trusted"):
            signing.open_envelope(served, victim.publisher.public_key, "models", "m.bin")
        assert device.model("models", "m.bin", rogue) == evil_data

        # Format 1: the manifest is withheld, the model is under the resource key.
        victim.compromise("models", "m.bin", evil_data, format=1)
        assert device.file("models", "m.bin.manifest") is None
        assert victim.compromised()["withheld"] == ["models/m.bin.manifest"]
        assert device.model("models", "m.bin") == evil_data

        victim.end_compromise()
        assert victim.compromised() == {"files": [], "withheld": []}
        assert device.cdn()[0] == victim.s3_endpoint
        assert device.file("models", "m.bin.manifest") == real.envelope
        assert device.model("models", "m.bin", victim.publisher) == real_data
    assert not attacker.is_running  # stopped with the stack


def test_compromise_routes_need_the_admin_secret_and_valid_names(stack, http):
    url = f"{stack.api_url}/_devstack/compromise"
    assert http.get(url, timeout=10).status_code == 403
    assert http.put(f"{url}/files/models/x.small", data=b"x", timeout=10).status_code == 403
    assert http.delete(url, timeout=10).status_code == 403
    secret = {"X-Devstack-Admin": stack.admin_secret}
    assert http.put(f"{url}/files/models/..x", data=b"x", headers=secret, timeout=10).status_code == 400
    assert http.put(f"{url}/withheld/_root/x", headers=secret, timeout=10).status_code == 400
    assert stack.compromised() == {"files": [], "withheld": []}


def test_single_substitutes_and_withheld_files(stack, http, account):
    email, password = account
    device = _Device(http, stack, email, password)
    stack.put_file("models", "one.small", b"real small")
    try:
        stack.substitute("models", "one.small", b"substitute")
        assert device.file("models", "one.small") == b"substitute"
        stack.substitute("models", "never-stored.bin", b"made up")  # a file the API never had
        assert device.file("models", "never-stored.bin") == b"made up"
        stack.withhold("models", "one.small")
        assert device.file("models", "one.small") is None
        assert stack.admin.get_file("models", "one.small") == b"real small"
    finally:
        stack.end_compromise()
    assert device.file("models", "one.small") == b"real small"
    assert device.file("models", "never-stored.bin") is None
