"""Contract section 7, the sealed split (format 2), against the real processes: the devstack (SeaweedFS +
the reference Resource API), the fault proxy in front of the CDN and the loader as ``python main.py``.

What every test here holds the loader to: a byte its manifest does not vouch for never reaches a client.
A mismatch found before the first byte is a 502 saying so; found later, the response is cut off short of
its Content-Length, and what did arrive is a prefix of the model. A load never ends as a whole 200 with
wrong bytes, and once the parts are right again the next load returns the exact model.
"""

import base64
import hashlib
import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from devstack import crypto
from devstack.processes.loader import LoaderProcess
from devstack.wait import until
from tests.faults.conftest import PASSWORD

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BLOCK = 4 * MiB  # the manifest's blockSize: blocks of the big part
MISMATCH = "does not match its manifest"


def model_name():
    return f"s-{os.urandom(4).hex()}.bin"


def big_key(n):
    return n + ".big"


@dataclass
class Attempt:
    """One /load as a client sees it."""

    status: int
    length: int | None  # the announced Content-Length (200 only)
    body: bytes
    detail: str | None  # the JSON detail of an error
    whole: bool  # the body ended cleanly (a 200 not cut off)


def attempt(loader, n, timeout=60):
    """Load ``n`` streaming, and keep whatever arrived before the transfer broke off."""
    with loader.load(n, "models", stream=True, timeout=timeout) as r:
        if r.status_code != 200:
            body = r.content
            try:
                detail = json.loads(body)["detail"]
            except (ValueError, KeyError, TypeError):
                detail = None
            return Attempt(r.status_code, None, body, detail, True)
        length = int(r.headers["content-length"])
        got = bytearray()
        try:
            for chunk in r.iter_content(64 * 1024):
                got += chunk
        except requests.RequestException:
            return Attempt(200, length, bytes(got), None, False)
    return Attempt(200, length, bytes(got), None, True)


def assert_refused(a, data, *, detail=MISMATCH, allow_whole_right=False):
    """Never a whole 200 with wrong bytes: a 502 (with ``detail`` in its text when given), or a 200 cut off
    short of its Content-Length after a prefix of ``data``; ``allow_whole_right``: or the exact ``data``."""
    if a.status == 200:
        assert a.length == len(data), (a.length, len(data))
        if allow_whole_right and a.whole and a.body == data:
            return
        assert not a.whole, f"a whole 200 of {len(a.body)} bytes, {'right' if a.body == data else 'WRONG'}"
        assert len(a.body) < a.length
        assert a.body == data[: len(a.body)], "the bytes that arrived are not a prefix of the model"
    else:
        assert a.status == 502, (a.status, a.body[:500])
        assert isinstance(a.detail, str), a.body[:500]
        if detail is not None:
            assert detail in a.detail, a.detail


def metric(loader, name):
    text = loader.get("/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


def flip_file(path, offset, xor=0x01):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        pos = f.tell()
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ xor]))


def read_or_none(path):
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def upload(loader, n, data):
    return loader.post(f"/upload/{n}", files={"data": (n, data)}, data={"folder": "models"})


# Where a bit is flipped in the big part of a model of 2 whole blocks and a short third one.
SPOTS = {"first": 1000, "middle": BLOCK + 12_345, "last": -1}
THREE_BLOCKS = 9 * MiB + 123


@pytest.mark.parametrize("where", list(SPOTS))
def test_a_bit_flipped_on_the_cdn_is_never_served(loader, stack, user, where):
    """Reliability: a bit flipped on the CDN in the first, a middle or the last block of a big part | the
    first or last block: 502 "does not match its manifest" before any byte; a middle block: cut off after
    the blocks before it (one warning in the log says why); never cached; loads again once the bit is back"""
    data = os.urandom(THREE_BLOCKS)
    n = model_name()
    published = stack.publish("models", n, data)
    assert len(published.manifest["blocks"]) == 3
    assert loader.login(user, PASSWORD).status_code == 200
    stack.tamper_cdn("models", big_key(n), SPOTS[where], xor=0x01)
    a = attempt(loader, n)
    if where == "first":
        # the first block is checked before the answer starts
        assert a.status == 502, (a.status, a.length, len(a.body))
        assert MISMATCH in a.detail
    else:
        assert_refused(a, data)
    stack.tamper_cdn("models", big_key(n), SPOTS[where], xor=0x01)  # the bit back
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    # Refused up front an error status, cut off one warning that says why: nothing unhandled either way.
    assert "Traceback" not in loader.log() and "unhandled" not in loader.log()
    if where == "middle":
        assert f"POST /load/{n} cut off after its answer began: " in loader.log()


def test_a_bit_flipped_in_the_small_part_is_502(loader, stack, user):
    """Reliability: a bit flipped in the small part on the Resource API | 502 "does not match its manifest"
    before any byte"""
    data = os.urandom(MiB + 77)
    n = model_name()
    stack.publish("models", n, data)
    small = stack.admin.get_file("models", n + ".small")
    tampered = bytearray(small)
    tampered[100] ^= 0x01
    stack.put_file("models", n + ".small", bytes(tampered))
    assert loader.login(user, PASSWORD).status_code == 200
    a = attempt(loader, n)
    assert a.status == 502 and MISMATCH in a.detail, (a.status, a.detail)
    stack.put_file("models", n + ".small", small)
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data


@pytest.mark.parametrize("where", list(SPOTS))
def test_a_block_altered_in_the_cache_is_fetched_again(loader, stack, user, proxy, where):
    """Reliability: a block of the cached big part altered on the device's disk (first, middle or last) |
    the load still returns the right bytes: the part is discarded and fetched again from the CDN
    (loader_cache_refetches_total)"""
    data = os.urandom(THREE_BLOCKS)
    n = model_name()
    published = stack.publish("models", n, data)
    assert loader.login(user, PASSWORD).status_code == 200
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    path = loader.cached_big_part("models", n)
    assert path.stat().st_size == published.big_size
    gets = proxy.count("GET", f"/models/{big_key(n)}")
    refetches = metric(loader, "loader_cache_refetches_total")
    flip_file(path, SPOTS[where])
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    assert proxy.count("GET", f"/models/{big_key(n)}") > gets  # the part came from the CDN again
    assert metric(loader, "loader_cache_refetches_total") >= max(1, refetches + 1)
    # and the cache holds the right part again
    right = stack.read_cdn("models", big_key(n))
    until(lambda: read_or_none(loader.cached_big_part("models", n)) == right, 15, "the cache was not mended")


@pytest.mark.parametrize("after", ["continue", "cut"])
def test_the_cdn_object_replaced_mid_transfer_is_refused(loader, stack, user, proxy, after):
    """Reliability: the CDN object replaced mid-transfer by another of the same length | the resumed GET is
    pinned to the ETag (412) and the load is cut off, never spliced, never cached; the next load works once
    the object is right"""
    data = os.urandom(10 * MiB + 5)
    n = model_name()
    stack.publish("models", n, data)
    old = stack.read_cdn("models", big_key(n))
    replaced = old[:BLOCK] + os.urandom(len(old) - BLOCK)
    assert loader.login(user, PASSWORD).status_code == 200
    path = f"/models/{big_key(n)}"
    proxy.stall_next(6 * MiB, 4.0, method="GET", path=path, starts=range(1))
    result = {}

    def load():
        try:
            result["attempt"] = attempt(loader, n)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=load)
    thread.start()
    until(proxy.stalls, 20, "the load's transfer of the object's start never reached its stall")
    stack.replace_cdn("models", big_key(n), replaced)
    if after == "cut":
        proxy.stop()  # every exchange in flight is cut; the proxy comes back on its port
        proxy.start()
    thread.join(60)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    # Held and let go, the CDN may still finish the old object: that is the model, whole and right. Cut,
    # the rest can only come from the new object, which the manifest does not vouch for.
    assert_refused(result["attempt"], data, detail=None, allow_whole_right=after == "continue")
    # no file under the cache's final name ever holds the replaced bytes
    final = read_or_none(Path(loader.env["MODEL_CACHE_DIR"]) / "models" / big_key(n))
    assert final is None or final == old
    stack.replace_cdn("models", big_key(n), old)
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data


@pytest.mark.parametrize("refused", ["small", "manifest"])
def test_an_upload_that_fails_before_its_manifest_is_refused_then_mended(
    loader, stack, api_faults, uploader, refused
):
    """Reliability: the small-part POST, or the manifest POST, refused while an upload replaces a model | the
    upload answers 502; loads of that name get 502 "does not match its manifest" (never the two versions
    spliced) until a new upload mends it"""
    n = model_name()
    v1, v2, v3 = (os.urandom(5 * MiB + 11) for _ in range(3))
    assert loader.login(uploader, PASSWORD).status_code == 200
    r = upload(loader, n, v1)
    assert r.status_code == 200, r.text
    old_small = stack.admin.get_file("models", n + ".small")
    old_manifest = stack.manifest("models", n)
    assert old_manifest is not None and old_manifest["format"] == 2
    assert loader.load(n, "models").content == v1

    route = "POST /resources/models"
    if refused == "manifest":
        stack.set_fault(route, count=1)  # no status: the first POST (the small part) goes through
    stack.set_fault(route, status=500, count=None)
    stack.reset_counters()
    r = upload(loader, n, v2)
    assert r.status_code == 502, r.text
    assert isinstance(r.json()["detail"], str)
    # big part, small part, manifest: nothing is posted after a refusal
    assert stack.counters().get(route, 0) == (1 if refused == "small" else 2)
    stack.clear_faults()
    assert stack.manifest("models", n) == old_manifest
    if refused == "small":
        assert stack.admin.get_file("models", n + ".small") == old_small
    else:
        assert stack.admin.get_file("models", n + ".small") != old_small

    # The new parts are in place under the old manifest: refused, never spliced.
    a = attempt(loader, n)
    assert a.status == 502, (a.status, a.length, len(a.body))
    assert MISMATCH in a.detail, a.detail

    r = upload(loader, n, v3)
    assert r.status_code == 200, r.text
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == v3
    assert "Traceback" not in loader.log()


def test_the_big_part_alone_does_not_hold_the_model_and_openssl_reads_the_whole(
    loader, stack, uploader, openssl, tmp_path
):
    """Reliability: the CDN's big part of an upload, decrypted alone under the compiled-in resource key |
    holds no 64-byte window of the model (it is under the upload's own data key); openssl decrypts small
    and big under the manifest's key to the exact model"""
    data = os.urandom(5 * MiB + 7)
    n = model_name()
    assert loader.login(uploader, PASSWORD).status_code == 200
    r = upload(loader, n, data)
    assert r.status_code == 200 and r.json() == {"status": "ok", "size": len(data)}
    small = stack.admin.get_file("models", n + ".small")
    big = stack.read_cdn("models", big_key(n))

    def windows_found(big):
        """Model windows in ``big`` decrypted alone under the compiled-in resource key (as anyone holding a
        loader and the CDN's object could)."""
        body = big[: len(big) // 16 * 16]
        decryptor = Cipher(algorithms.AES(crypto.resource_key()), modes.CBC(body[:16])).decryptor()
        alone = decryptor.update(body[16:]) + decryptor.finalize()
        return sum(data[i : i + 64] in alone for i in range(0, len(data) - 64, 4096))

    assert windows_found(big) == 0
    # the same check finds the model in a format-1 big part: it can fail
    control = model_name()
    stack.publish("models", control, data, format=1)
    assert windows_found(stack.read_cdn("models", big_key(control))) > 1000

    manifest = stack.manifest("models", n)
    assert manifest is not None
    blob = small + big
    blocks = [hashlib.sha256(big[i : i + BLOCK]).hexdigest() for i in range(0, len(big), BLOCK)]
    assert manifest["format"] == 2 and manifest["size"] == len(data)
    assert manifest["blobSize"] == len(blob) == crypto.encrypted_size(len(data))
    assert len(small) == min(3072, len(blob) * 3 // 10)
    assert manifest["small"] == hashlib.sha256(small).hexdigest()
    assert manifest["big"] == hashlib.sha256(big).hexdigest()
    assert manifest["blockSize"] == BLOCK and manifest["blocks"] == blocks and len(blocks) == 2
    key = base64.b64decode(manifest["key"], validate=True)
    assert len(key) == 32 and key != crypto.resource_key()

    encrypted, plain = tmp_path / "blob.enc", tmp_path / "blob.out"
    encrypted.write_bytes(blob[16:])
    subprocess.run(
        [openssl.path, "enc", "-d", "-aes-256-cbc", "-K", key.hex(), "-iv", blob[:16].hex()]
        + ["-in", str(encrypted), "-out", str(plain)],
        check=True,
        capture_output=True,
    )
    assert plain.read_bytes() == data


def test_format1_loads_with_a_warning_and_require_manifest_refuses_it(loader, stack, user, tmp_path):
    """Reliability: a model uploaded before format 2 (no manifest) | loads, with a warning in the log and
    loader_format1_loads_total in /metrics; with REQUIRE_MANIFEST=true, 502 naming the missing manifest"""
    data = os.urandom(2 * MiB + 9)
    n = model_name()
    stack.publish("models", n, data, format=1)
    assert stack.manifest("models", n) is None
    assert loader.login(user, PASSWORD).status_code == 200
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
    warnings = [line for line in loader.log().splitlines() if "WARNING" in line and f"models/{n}" in line]
    assert any("no manifest" in line for line in warnings), loader.log()[-2000:]
    assert metric(loader, "loader_format1_loads_total") >= 1

    sealed = model_name()
    stack.publish("models", sealed, data)
    with LoaderProcess(
        tmp_path / "strict", RESOURCE_API_URL=stack.api_url, API_TIMEOUT=5, REQUIRE_MANIFEST="true"
    ) as strict:
        assert strict.login(user, PASSWORD).status_code == 200
        a = attempt(strict, n)
        assert a.status == 502, (a.status, a.length)
        assert "no manifest" in a.detail, a.detail
        assert metric(strict, "loader_format1_loads_total") == 0
        r = strict.load(sealed, "models")  # format 2 is what it still loads
        assert r.status_code == 200 and r.content == data
        assert "Traceback" not in strict.log()


def _without_key(m):
    return {k: v for k, v in m.items() if k != "key"}


def _one_block_short(m):
    return {**m, "blocks": m["blocks"][:-1]}


def _one_block_more(m):
    return {**m, "blocks": m["blocks"] + [m["blocks"][0]]}


BROKEN = {
    "not-json": lambda m: b"{this is not json",
    "not-utf8": lambda m: b'{"format": 2, "key": "\xff\xfe"}',
    "missing-key": _without_key,
    "one-block-short": _one_block_short,
    "one-block-more": _one_block_more,
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_manifest_is_a_clear_502(loader, stack, user, broken):
    """Reliability: a manifest that is not JSON, not UTF-8, lacks "key", or lists a block too few or too many
    | 502 "the manifest of <folder>/<name> is not valid: <why>", never a 500, no traceback"""
    data = os.urandom(5 * MiB + 3)
    n = model_name()
    published = stack.publish("models", n, data)
    assert len(published.manifest["blocks"]) == 2
    stack.put_manifest("models", n, BROKEN[broken](published.manifest))
    assert loader.login(user, PASSWORD).status_code == 200
    a = attempt(loader, n)
    assert a.status == 502, (a.status, a.body[:300])
    assert a.detail.startswith(f"the manifest of models/{n} is not valid: "), a.detail
    assert "Traceback" not in loader.log()
    stack.put_manifest("models", n, published.manifest)
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data


def test_parallel_loads_of_a_flipped_middle_block_all_refuse(loader, stack, user):
    """Reliability: four parallel loads of a model whose middle block was flipped on the CDN | every one is
    refused (cut off after the first block), none ends whole"""
    data = os.urandom(THREE_BLOCKS)
    n = model_name()
    stack.publish("models", n, data)
    assert loader.login(user, PASSWORD).status_code == 200
    stack.tamper_cdn("models", big_key(n), SPOTS["middle"])
    results, gate = [None] * 4, threading.Barrier(4)

    def fetch(i):
        gate.wait()
        try:
            results[i] = attempt(loader, n)
        except Exception as exc:  # reported by the assertions below
            results[i] = exc

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(90) for t in threads]
    for result in results:
        assert isinstance(result, Attempt), result
        assert_refused(result, data)
    stack.tamper_cdn("models", big_key(n), SPOTS["middle"])
    r = loader.load(n, "models")
    assert r.status_code == 200 and r.content == data
