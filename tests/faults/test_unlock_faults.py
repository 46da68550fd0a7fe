"""The Docker Engine goes away in the middle of an unlock."""

import os
import signal
import time
from pathlib import Path

import pytest

from devstack.dockerd import import_image, remove_images
from devstack.images import publish_images
from tests.faults.conftest import PASSWORD, MiB, start_loader

pytestmark = [pytest.mark.integration, pytest.mark.docker]

TAG = "azaion/fault-unlock:1"
RUNNING = ("authenticating", "downloading_key", "decrypting", "loading_images")


@pytest.fixture(scope="module")
def large_archive(private_dockerd, tmp_path_factory):
    """A 384 MiB image in an encrypted archive: big enough that stopping dockerd lands mid-transfer."""
    client = private_dockerd.client()
    remove_images(client, [TAG])
    import_image(client, TAG, {"/blob.bin": os.urandom(384 * MiB)})
    path = tmp_path_factory.mktemp("archive") / "images.enc"
    fragment = publish_images(private_dockerd.host, [TAG], path)
    remove_images(client, [TAG])
    return path, fragment


def wait_until(loader, done, timeout=300):
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = loader.get("/unlock/status").json()
        if done(status):
            return status
        time.sleep(0.02)
    raise AssertionError(f"unlock stuck: {status}")


def kill_engine(engine):
    """A crash: SIGKILL dockerd with the transfer in flight, then the containerd it ran (a managed
    containerd outlives a killed dockerd and would block the next start)."""
    pidfile = engine.root / "exec" / "containerd" / "containerd.pid"
    containerd = Path(f"/proc/{pidfile.read_text().strip()}") if pidfile.exists() else None
    os.kill(engine.pid, signal.SIGKILL)
    engine.stop()  # only reaps the dead process
    if (
        containerd is None
        or not containerd.exists()
        or (containerd / "comm").read_text().strip() != "containerd"
    ):
        return
    os.kill(int(containerd.name), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while containerd.exists() and time.monotonic() < deadline:  # gone, not only signalled, before a restart
        time.sleep(0.05)


def stop_engine(engine, how):
    if how == "kill":
        kill_engine(engine)
    else:
        engine.stop()  # SIGTERM: dockerd shuts down gracefully


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_dockerd_gone_mid_unlock_is_an_error_then_a_retry_works(
    tmp_path, stack, user, private_dockerd, large_archive, how
):
    """Reliability: Docker Engine stopped (SIGTERM) or killed (SIGKILL) in the middle of an unlock | state
    "error" naming the Docker Engine, never stuck in a running state; a new unlock once the engine is back is
    "ready"
    """
    path, fragment = large_archive
    total = os.path.getsize(path)
    stack.set_key_fragment(fragment)
    remove_images(private_dockerd.client(), [TAG])
    env = {"DOCKER_HOST": private_dockerd.host, "IMAGES_PATH": path}
    with start_loader(tmp_path / "loader", stack, **env) as loader:
        try:
            assert loader.post("/unlock", json={"email": user, "password": PASSWORD}).status_code == 202
            moving = wait_until(loader, lambda s: s["state"] not in RUNNING or s["bytesDone"] > 16 * MiB)
            assert moving["state"] == "decrypting" and moving["bytesDone"] < total, moving
            stop_engine(private_dockerd, how)
            status = wait_until(loader, lambda s: s["state"] not in RUNNING, timeout=120)
        finally:
            private_dockerd.start()
        assert status["state"] == "error", status
        assert "Docker Engine" in status["error"] and "Traceback" not in status["error"]
        if how == "kill":
            assert status["bytesDone"] < total, status  # the kill did land mid-transfer

        assert loader.post("/unlock", json={"email": user, "password": PASSWORD}).status_code == 202
        status = wait_until(loader, lambda s: s["state"] not in RUNNING, timeout=600)
        assert status["state"] == "ready" and status["images"] == [TAG], status
    remove_images(private_dockerd.client(), [TAG])
