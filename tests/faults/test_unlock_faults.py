"""The Docker Engine goes away in the middle of an unlock."""

import os
import signal
from pathlib import Path

import pytest

from devstack.images import publish_images
from devstack.processes.dockerd import import_image, remove_images
from devstack.wait import until
from tests.faults.conftest import PASSWORD, MiB, start_loader

pytestmark = [pytest.mark.integration, pytest.mark.docker]

TAG = "azaion/fault-unlock:1"
RUNNING = ("authenticating", "downloading_key", "decrypting", "loading_images")


def ended(status):
    return status["state"] not in RUNNING


def under_way(status):
    """16 MiB into the transfer (or over already)."""
    return ended(status) or status["bytesDone"] > 16 * MiB


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
    # gone, not only signalled, before a restart
    until(lambda: not containerd.exists(), 30, "the killed containerd did not go away", every=0.05)


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
            moving = loader.wait_unlock(300, done=under_way, every=0.02)
            assert moving["state"] == "decrypting" and moving["bytesDone"] < total, moving
            stop_engine(private_dockerd, how)
            status = loader.wait_unlock(120, done=ended)
        finally:
            private_dockerd.start()
        assert status["state"] == "error", status
        assert "Docker Engine" in status["error"] and "Traceback" not in status["error"]
        if how == "kill":
            assert status["bytesDone"] < total, status  # the kill did land mid-transfer

        assert loader.post("/unlock", json={"email": user, "password": PASSWORD}).status_code == 202
        status = loader.wait_unlock(600, done=ended)
        assert status["state"] == "ready" and status["images"] == [TAG], status
    remove_images(private_dockerd.client(), [TAG])
