"""Contract section 9, signed manifests, against the real processes: the devstack's reference Resource API
(with its "compromised" mode), SeaweedFS (and a second one, the attacker's), the fault proxy and the loader
as ``python main.py``. The devstack signs with its own reference implementation (devstack/signing.py), so
every accepted load here is also a proof that the two sides agree on DSSE and Ed25519.

What the tests hold the loader to: a manifest no trusted publisher vouches for is a 502 saying so, JSON,
before a byte of the model is fetched or served; with REQUIRE_SIGNATURE an API that hands out a manifest,
a small part and a cdn.yaml of its own choosing is refused, and without it that substitution is served
(with a warning and a counter): the table of docs/threat-model.md says what the setting buys.
"""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import signing
from devstack.wait import until
from tests.faults.conftest import PASSWORD, files_under, model_name, start_loader
from tests.faults.test_tampering import metric

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
REFUSED = "not signed by a trusted publisher"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def compromised(stack):
    """The stack, its API serving the real files again after the test whatever happened."""
    yield stack
    stack.end_compromise()


def logged_in(loader, user):
    r = loader.login(user, PASSWORD)
    assert r.status_code == 200, r.text
    return loader


def loads(loader, name, data):
    r = loader.load(name, "models", timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert r.content == data


def assert_refused(loader, name, why=REFUSED):
    """A 502 in JSON naming the refusal, for the load and the prefetch; the loader's cache and downloads
    are as they were: nothing of the model was fetched."""
    cache = Path(loader.env["MODEL_CACHE_DIR"])

    def settled():
        # An earlier load's download still commits after its answer ended (its sidecar, its record): the
        # snapshot is taken once nothing is in flight.
        busy = [
            d for d in loader.get("/downloads").json()["downloads"] if d["state"] in ("fetching", "verifying")
        ]
        in_flight = [
            p for p in (files_under(cache) if cache.exists() else []) if p.endswith((".part", ".record"))
        ]
        return not busy and not in_flight

    until(settled, 30, "an earlier download never finished committing")
    before = files_under(cache) if cache.exists() else []
    downloads = loader.get("/downloads").json()["downloads"]
    for path in (f"/load/{name}", f"/prefetch/{name}"):
        r = loader.post(path, json={"folder": "models"}, timeout=60)
        assert r.status_code == 502, (path, r.status_code, r.content[:300])
        assert r.headers["content-type"].startswith("application/json")
        assert why in r.json()["detail"], r.json()
    assert (files_under(cache) if cache.exists() else []) == before
    assert loader.get("/downloads").json()["downloads"] == downloads  # none started


def test_a_compromised_api_substitutes_a_model_unless_signatures_are_required(
    tmp_path, stack, user, compromised
):
    """Reliability: the Resource API compromised (its manifest, small part and cdn.yaml point at the
    attacker's S3 server and model) | REQUIRE_SIGNATURE with trusted keys: 502 "not signed by a trusted
    publisher", nothing fetched; without it the substitute is served, with a warning and a counter"""
    name, genuine, attack = model_name("t"), os.urandom(3 * MiB + 7), os.urandom(2 * MiB + 3)
    stack.publish("models", name, genuine, signer=stack.publisher)
    with (
        start_loader(tmp_path / "lax", stack) as lax,
        start_loader(tmp_path / "strict", stack, REQUIRE_SIGNATURE="true") as strict,
    ):
        for loader in (lax, strict):
            loads(logged_in(loader, user), name, genuine)
        stack.compromise("models", name, attack)
        for loader in (lax, strict):
            logged_in(loader, user)  # cdn.yaml is read after a login: now the attacker's
        assert_refused(strict, name, "REQUIRE_SIGNATURE")
        assert metric(strict, "loader_signature_refusals_total") == 2
        # Without REQUIRE_SIGNATURE the API alone decides what the device runs.
        loads(lax, name, attack)
        assert metric(lax, "loader_unsigned_manifest_loads_total") == 1
        assert "not signed by a publisher; loading it because REQUIRE_SIGNATURE is off" in lax.log()
        stack.end_compromise()
        for loader in (lax, strict):
            loads(logged_in(loader, user), name, genuine)


def test_a_substitute_the_attacker_signed_with_a_key_of_its_own_is_refused_by_every_loader(
    tmp_path, stack, user, compromised
):
    """Reliability: the Resource API compromised, its substitute manifest signed by the attacker's own key |
    502 "not signed by a trusted publisher" with or without REQUIRE_SIGNATURE; nothing fetched"""
    name, genuine = model_name("t"), os.urandom(MiB)
    stack.publish("models", name, genuine, signer=stack.publisher)
    stack.compromise("models", name, os.urandom(MiB), signer=signing.Publisher.generate())
    with start_loader(tmp_path / "lax", stack) as lax:
        assert_refused(logged_in(lax, user), name, "no signature verifies under a key in TRUSTED_PUBLISHERS")


def test_a_compromised_api_that_downgrades_a_model_to_format_1_is_refused_under_require_signature(
    tmp_path, stack, user, compromised
):
    """Reliability: the Resource API compromised, withholding the manifest and serving an attacker's
    format-1 model (under the resource key every loader holds) | REQUIRE_SIGNATURE: 502 naming format 1;
    without it the downgrade is served, counted as a format-1 load"""
    name, genuine, attack = model_name("t"), os.urandom(MiB), os.urandom(MiB + 100)
    stack.publish("models", name, genuine, signer=stack.publisher)
    stack.compromise("models", name, attack, format=1)
    with (
        start_loader(tmp_path / "lax", stack) as lax,
        start_loader(tmp_path / "strict", stack, REQUIRE_SIGNATURE="true") as strict,
    ):
        assert_refused(logged_in(strict, user), name, "it has no manifest: format 1")
        loads(logged_in(lax, user), name, attack)
        assert metric(lax, "loader_format1_loads_total") == 1


def envelope_of(stack, name):
    raw = stack.stored_manifest("models", name)
    assert signing.is_envelope(raw)
    return json.loads(raw)


def forged(stack, name, case):
    """The stored envelope of ``name`` (signed by the stack's publisher) changed as ``case`` says."""
    env = envelope_of(stack, name)
    payload = json.loads(base64.b64decode(env["payload"]))
    if case == "payload changed after signing":
        payload["blocks"][0] = "0" * 64
        env["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    elif case == "signed by an untrusted key":
        return signing.Publisher.generate().sign(
            {k: payload[k] for k in payload if k not in ("folder", "name")}, "models", name
        )
    elif case == "signature cut short":
        env["signatures"][0]["sig"] = env["signatures"][0]["sig"][:20]
    elif case == "no signatures":
        env["signatures"] = []
    elif case == "payload not Base64":
        env["payload"] = "not base64 at all!"
    elif case == "another payloadType":
        env["payloadType"] = "application/json"
    elif case == "signatures not a list":
        env["signatures"] = "everyone"
    elif case == "an envelope without a payload":
        del env["payload"]
    return json.dumps(env).encode()


FORGERIES = [
    "payload changed after signing",
    "signed by an untrusted key",
    "signature cut short",
    "no signatures",
    "payload not Base64",
    "another payloadType",
    "signatures not a list",
    "an envelope without a payload",
]


@pytest.fixture(scope="module")
def signed_loader(stack, tmp_path_factory):
    """A loader that trusts the stack's publisher and does not require signatures."""
    with start_loader(tmp_path_factory.mktemp("signed") / "loader", stack) as process:
        yield process


@pytest.mark.parametrize("case", FORGERIES)
def test_a_forged_signed_manifest_is_a_clear_502_and_never_a_byte(stack, user, signed_loader, case):
    """Reliability: a signed manifest forged on the API (payload changed after signing, an untrusted key, a
    malformed envelope) | 502 "not signed by a trusted publisher", never a 500, nothing fetched or served"""
    name, data = model_name("t"), os.urandom(MiB + 5)
    stack.publish("models", name, data, signer=stack.publisher)
    loads(logged_in(signed_loader, user), name, data)
    stack.put_file("models", name + ".manifest", forged(stack, name, case))
    refusals = metric(signed_loader, "loader_signature_refusals_total")
    cache = Path(signed_loader.env["MODEL_CACHE_DIR"]) / "models"
    part = [p for p in files_under(cache) if p.startswith(name)]
    assert_refused(signed_loader, name)
    assert metric(signed_loader, "loader_signature_refusals_total") == refusals + 2
    assert [p for p in files_under(cache) if p.startswith(name)] == part  # the cached part is not touched


def test_a_signed_manifest_copied_to_another_name_is_refused(stack, user, signed_loader):
    """Reliability: a signed manifest, its small part and big part copied to another name | 502 "not signed
    by a trusted publisher for it: it was signed for models/<the first name>"; nothing fetched"""
    name, copy, data = model_name("t"), model_name("copy"), os.urandom(MiB)
    stack.publish("models", name, data, signer=stack.publisher)
    for suffix in (".manifest", ".small"):
        stack.put_file("models", copy + suffix, stack.admin.get_file("models", name + suffix))
    stack.replace_cdn("models", copy + ".big", stack.read_cdn("models", name + ".big"))
    logged_in(signed_loader, user)
    assert_refused(signed_loader, copy, f"it was signed for models/{name}")
    loads(signed_loader, name, data)


def test_rotation_two_trusted_keys_each_verify_and_a_dropped_key_no_longer_does(tmp_path, stack, user):
    """Reliability: a publisher rotates its key (TRUSTED_PUBLISHERS holds the old and the new) | models
    signed by either load; once the old key is dropped from the file, its models are 502"""
    old, new = stack.publisher, signing.Publisher.generate()
    by_old, by_new = (model_name("old"), os.urandom(MiB)), (model_name("new"), os.urandom(MiB))
    stack.publish("models", *by_old, signer=old)
    stack.publish("models", *by_new, signer=new)
    both = signing.write_trusted(tmp_path / "both.pem", [old, new])
    with start_loader(tmp_path / "both", stack, TRUSTED_PUBLISHERS=both, REQUIRE_SIGNATURE="true") as loader:
        logged_in(loader, user)
        for name, data in (by_old, by_new):
            loads(loader, name, data)
        assert metric(loader, "loader_signed_manifest_loads_total") == 2
    only_new = signing.write_trusted(tmp_path / "new.pem", [new])
    with start_loader(tmp_path / "new", stack, TRUSTED_PUBLISHERS=only_new) as loader:
        loads(logged_in(loader, user), *by_new)
        assert_refused(loader, by_old[0], "no signature verifies")


def test_an_upload_through_a_loader_with_a_publisher_key_is_signed_for_its_name(
    tmp_path, stack, uploader, user
):
    """Reliability: PUBLISHER_KEY_FILE set on the uploading loader | the stored manifest is an envelope the
    devstack's own verifier accepts for that folder and name (and refuses under another key); a loader with
    REQUIRE_SIGNATURE loads it"""
    private, public = stack.publisher_key_files
    name, data = model_name("up"), os.urandom(2 * MiB + 11)
    with start_loader(tmp_path / "up", stack, PUBLISHER_KEY_FILE=private) as loader:
        logged_in(loader, uploader)
        r = loader.post(
            f"/upload/{name}", files={"data": (name, data)}, data={"folder": "models"}, timeout=60
        )
        assert r.status_code == 200, r.text
    manifest = stack.open_manifest("models", name)
    assert (manifest["folder"], manifest["name"], manifest["size"]) == ("models", name, len(data))
    with pytest.raises(ValueError):
        stack.open_manifest("models", name, trusted=signing.Publisher.generate())
    with start_loader(
        tmp_path / "strict", stack, TRUSTED_PUBLISHERS=public, REQUIRE_SIGNATURE="true"
    ) as loader:
        loads(logged_in(loader, user), name, data)


def start_fails(tmp_path, **env):
    """``python main.py`` with ``env``: it must stop at once; its output."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        cwd=ROOT,
        env={
            **os.environ,
            "MODEL_CACHE_DIR": str(tmp_path / "cache"),
            "LOADER_PORT": "1",
            **{k: str(v) for k, v in env.items()},
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    return run.stdout + run.stderr


def test_a_bad_trust_configuration_stops_the_loader_at_start_and_never_shows_a_key(tmp_path, stack):
    """Reliability: REQUIRE_SIGNATURE without TRUSTED_PUBLISHERS, or a key file of the wrong kind | the
    loader does not start: "invalid configuration" naming the setting, never the key's bytes"""
    out = start_fails(tmp_path, REQUIRE_SIGNATURE="true")
    assert "invalid configuration" in out and "REQUIRE_SIGNATURE=true needs TRUSTED_PUBLISHERS" in out
    private, public = stack.publisher_key_files
    out = start_fails(tmp_path, TRUSTED_PUBLISHERS=private)  # the private half, by mistake
    assert "TRUSTED_PUBLISHERS" in out and "holds no PEM public key" in out
    out = start_fails(tmp_path, PUBLISHER_KEY_FILE=public)
    assert "PUBLISHER_KEY_FILE" in out and "holds no unencrypted PEM private key" in out
    secret = Path(private).read_text().splitlines()[1]
    assert secret not in out


def test_a_powered_off_device_s_disk_holds_no_data_key_small_part_or_plaintext(
    tmp_path, stack, user, uploader
):
    """Reliability: a stolen device, powered off, after signed loads, a prefetch and an upload | its disk
    (the cache, the loader's files) holds no data key, no small part, no manifest and no 64 bytes of any
    model: the big parts on it are ciphertext under keys that never touch the disk"""
    name, data = model_name("stolen"), os.urandom(3 * MiB + 1)
    staged, staged_data = model_name("staged"), os.urandom(MiB)
    uploaded, uploaded_data = model_name("uploaded"), os.urandom(2 * MiB)
    published = [
        stack.publish("models", n, d, signer=stack.publisher)
        for n, d in ((name, data), (staged, staged_data))
    ]
    private, _ = stack.publisher_key_files
    with start_loader(
        tmp_path / "loader", stack, PUBLISHER_KEY_FILE=private, REQUIRE_SIGNATURE="true"
    ) as loader:
        logged_in(loader, uploader)
        r = loader.post(
            f"/upload/{uploaded}", files={"data": (uploaded, uploaded_data)}, data={"folder": "models"}
        )
        assert r.status_code == 200, r.text
        logged_in(loader, user)
        loads(loader, name, data)
        loads(loader, uploaded, uploaded_data)
        assert loader.post(f"/prefetch/{staged}", json={"folder": "models"}).status_code in (200, 202)
        loader.cached_big_part("models", staged)
    files = sorted(p for p in loader.workdir.rglob("*") if p.is_file())  # the cache is in its workdir
    assert Path(loader.env["MODEL_CACHE_DIR"]).is_relative_to(loader.workdir)
    assert sum(p.name.endswith(".big") for p in files) == 3  # the cache holds the three big parts
    secrets = {}
    uploaded_manifest = stack.open_manifest("models", uploaded)
    keys = [p.data_key for p in published] + [base64.b64decode(uploaded_manifest["key"])]
    for i, key in enumerate(keys):
        secrets[f"data key {i}"] = key
        secrets[f"data key {i} (Base64)"] = base64.b64encode(key)
    for p in published:
        secrets[f"small part of {p.name}"] = stack.admin.get_file("models", p.name + ".small")
        secrets[f"manifest of {p.name}"] = p.envelope
    for label, model in (("loaded", data), ("prefetched", staged_data), ("uploaded", uploaded_data)):
        for offset in range(0, len(model) - 64, len(model) // 16):
            secrets[f"the {label} model at {offset}"] = model[offset : offset + 64]
    for path in files:
        content = path.read_bytes()
        found = [label for label, value in secrets.items() if value in content]
        assert found == [], f"{path} holds {found}"
