"""Unlock against a real Docker Engine (a private dockerd started by the suite when none is reachable)."""

import os
import time

import pytest

from devstack import crypto
from devstack.images import publish_images
from devstack.processes.dockerd import import_image, remove_images
from devstack.processes.loader import LoaderProcess, proc_field
from tests.integration.conftest import PASSWORD

pytestmark = [pytest.mark.integration, pytest.mark.docker]

TAGS = ["azaion/unlock-a:1.0", "azaion/unlock-b:2.1"]


@pytest.fixture(scope="module")
def archive_plain(private_dockerd, tmp_path_factory):
    """Two tiny images saved into one encrypted archive; the images are then removed from the engine."""
    client = private_dockerd.client()
    for i, tag in enumerate(TAGS):
        import_image(client, tag, {f"/data/{i}.txt": f"image {i}\n".encode() * 100})
    path = tmp_path_factory.mktemp("archive") / "images.enc"
    fragment = publish_images(private_dockerd.host, TAGS, path, fragment=os.urandom(32))
    remove_images(client, TAGS)
    return path, fragment


@pytest.fixture
def clean_engine(private_dockerd):
    client = private_dockerd.client()
    remove_images(client, TAGS)
    return client


def unlocker(tmp_path, stack, dockerd, images_path, **env):
    return LoaderProcess(
        tmp_path / "loader",
        RESOURCE_API_URL=stack.api_url,
        DOCKER_HOST=dockerd.host,
        IMAGES_PATH=images_path,
        **env,
    )


def test_two_images_unlock_with_their_tags(
    tmp_path, stack, user, archive_plain, private_dockerd, clean_engine
):
    path, fragment = archive_plain
    stack.set_key_fragment(fragment)
    with unlocker(tmp_path, stack, private_dockerd, path) as loader:
        r = loader.post("/unlock", json={"email": user, "password": PASSWORD})
        assert r.status_code == 202 and r.json()["state"] in (
            "authenticating",
            "downloading_key",
            "decrypting",
            "loading_images",
            "ready",
        )
        status = loader.wait_unlock()
        assert status["state"] == "ready", status
        assert sorted(status["images"]) == sorted(TAGS)
        assert status["bytesDone"] == status["bytesTotal"] == os.path.getsize(path)
        assert status["error"] is None
    present = {t for img in clean_engine.images.list() for t in img.tags}
    assert set(TAGS) <= present


def test_wrong_fragment_is_an_error_then_the_right_one_is_ready(
    tmp_path, stack, user, archive_plain, private_dockerd, clean_engine
):
    path, fragment = archive_plain
    stack.set_key_fragment(b"not the fragment")
    with unlocker(tmp_path, stack, private_dockerd, path) as loader:
        loader.post("/unlock", json={"email": user, "password": PASSWORD})
        status = loader.wait_unlock()
        assert status["state"] == "error" and "wrong key or corrupt archive" in status["error"]
        stack.set_key_fragment(fragment)
        assert loader.post("/unlock", json={"email": user, "password": PASSWORD}).status_code == 202
        assert loader.wait_unlock()["state"] == "ready"


@pytest.mark.parametrize("damage", ["truncated", "middle-byte", "missing"])
def test_corrupt_truncated_or_missing_archive_is_an_error(
    tmp_path, stack, user, archive_plain, private_dockerd, clean_engine, damage
):
    path, fragment = archive_plain
    stack.set_key_fragment(fragment)
    bad = tmp_path / "bad.enc"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "middle-byte":
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(data)
    with unlocker(tmp_path, stack, private_dockerd, bad) as loader:
        loader.post("/unlock", json={"email": user, "password": PASSWORD})
        status = loader.wait_unlock()
    assert status["state"] == "error", status
    assert status["error"] and "Traceback" not in status["error"]
    if damage == "missing":
        assert "missing" in status["error"]


def test_engine_stopped_is_an_error_and_a_retry_after_restart_works(
    tmp_path, stack, user, archive_plain, private_dockerd, clean_engine
):
    path, fragment = archive_plain
    stack.set_key_fragment(fragment)
    with unlocker(tmp_path, stack, private_dockerd, path) as loader:
        private_dockerd.stop()
        try:
            loader.post("/unlock", json={"email": user, "password": PASSWORD})
            status = loader.wait_unlock()
            assert status["state"] == "error" and "Docker Engine" in status["error"]
        finally:
            private_dockerd.start()
        loader.post("/unlock", json={"email": user, "password": PASSWORD})
        assert loader.wait_unlock()["state"] == "ready"


def test_double_post_starts_one_unlock(tmp_path, stack, user, archive_plain, private_dockerd, clean_engine):
    path, fragment = archive_plain
    stack.set_key_fragment(fragment)
    stack.set_fault("GET /binary-split/key-fragment", delay=1.5, count=1)  # keep the first one running
    with unlocker(tmp_path, stack, private_dockerd, path) as loader:
        stack.reset_counters()
        first = loader.post("/unlock", json={"email": user, "password": PASSWORD})
        second = loader.post("/unlock", json={"email": user, "password": PASSWORD})
        assert first.status_code == second.status_code == 202
        assert second.json()["state"] != "idle"
        assert loader.wait_unlock()["state"] == "ready"
        assert stack.counters().get("GET /binary-split/key-fragment") == 1
    stack.clear_faults()


def test_already_loaded_images_need_no_key(
    tmp_path, stack, user, archive_plain, private_dockerd, clean_engine
):
    path, fragment = archive_plain
    stack.set_key_fragment(fragment)
    with unlocker(tmp_path, stack, private_dockerd, path, UNLOCK_IMAGES=" ".join(TAGS)) as loader:
        loader.post("/unlock", json={"email": user, "password": PASSWORD})
        assert loader.wait_unlock()["state"] == "ready"  # loads them the first time
        stack.reset_counters()
        loader.post("/unlock", json={"email": user, "password": PASSWORD})
        status = loader.wait_unlock()
        assert status["state"] == "ready" and sorted(status["images"]) == sorted(TAGS)
        assert stack.counters().get("GET /binary-split/key-fragment", 0) == 0


def test_archive_encrypted_by_openssl_unlocks(
    tmp_path, stack, user, archive_plain, private_dockerd, clean_engine, openssl
):
    path, fragment = archive_plain
    key = crypto.archive_key(fragment)
    plain = crypto.decrypt(key, path.read_bytes())
    iv = os.urandom(16)
    cipher = openssl.encrypt(key, iv, plain)
    archive = tmp_path / "openssl.enc"
    archive.write_bytes(iv + cipher)
    stack.set_key_fragment(fragment)
    with unlocker(tmp_path, stack, private_dockerd, archive) as loader:
        loader.post("/unlock", json={"email": user, "password": PASSWORD})
        assert loader.wait_unlock()["state"] == "ready"


def test_large_archive_writes_no_plaintext_and_stays_small(
    tmp_path, stack, user, private_dockerd, clean_engine
):
    client = clean_engine
    tag = "azaion/unlock-large:1"
    remove_images(client, [tag])
    import_image(client, tag, {"/blob.bin": os.urandom(1024 * 1024 * 1024)})
    path = tmp_path / "large.enc"
    fragment = publish_images(private_dockerd.host, [tag], path)
    remove_images(client, [tag])
    stack.set_key_fragment(fragment)
    with unlocker(tmp_path, stack, private_dockerd, path) as loader:
        before = proc_field(loader.pid, "write_bytes", "io")
        loader.post("/unlock", json={"email": user, "password": PASSWORD})
        health = []

        def ended_or_probe(status):
            """Whether the unlock has ended; until it has, each call probes /health (its time is kept)."""
            if status["state"] in ("ready", "error"):
                return True
            start = time.perf_counter()
            assert loader.get("/health").status_code == 200
            health.append(time.perf_counter() - start)
            return False

        status = loader.wait_unlock(done=ended_or_probe, every=0.05)
        written = proc_field(loader.pid, "write_bytes", "io") - before
        peak_mb = loader.peak_rss_mb()
    assert status["state"] == "ready" and status["images"] == [tag], status
    assert written < 16 * 1024 * 1024, f"the loader wrote {written} bytes during a 1 GiB unlock"
    assert peak_mb < 250, f"peak RSS {peak_mb:.0f} MB"
    assert health, "the unlock finished before /health could be probed"
    remove_images(client, [tag])


def test_an_unlock_with_other_credentials_leaves_the_login_session_alone(
    tmp_path, stack, user, uploader, archive_plain, private_dockerd, clean_engine
):
    path, fragment = archive_plain
    stack.set_key_fragment(fragment)
    with unlocker(tmp_path, stack, private_dockerd, path) as loader:
        assert loader.login(user, PASSWORD).status_code == 200  # an Operator: may not upload
        r = loader.post("/unlock", json={"email": uploader, "password": PASSWORD})
        assert r.status_code == 202
        assert loader.wait_unlock()["state"] == "ready"
        # The unlock signed in as the uploader on a session of its own: the Operator's session stays.
        r = loader.post("/upload/x.bin", files=[("folder", (None, "models")), ("data", ("x.bin", b"x"))])
        assert r.status_code == 403, r.text
