"""The cache disk fills up: a real ENOSPC from a small tmpfs mounted as MODEL_CACHE_DIR."""

import os

import pytest

from tests.faults.conftest import PASSWORD, MiB, files_under, model_name, start_loader

pytestmark = pytest.mark.integration


def test_disk_full_on_load_is_507_and_leaves_nothing(tmp_path, stack, user, proxy, small_disk):
    """Reliability: cache disk full when a model is loaded | 507 before any byte is streamed (the cache file
    is preallocated); no partial file left; loads work again once there is room"""
    big, small = os.urandom(12 * MiB), os.urandom(1 * MiB)
    big_name, small_name = model_name(), model_name()
    stack.publish("models", big_name, big)
    stack.publish("models", small_name, small)
    # No free space kept beyond the disk's own (the default keeps 1 GiB free: nothing would fit on 8 MiB).
    env = {"MODEL_CACHE_DIR": small_disk.path, "MODEL_CACHE_MIN_FREE_BYTES": 0}
    with start_loader(tmp_path / "loader", stack, **env) as loader:
        assert loader.login(user, PASSWORD).status_code == 200

        r = loader.load(big_name, "models")
        assert r.status_code == 507, (r.status_code, r.text[:200])
        assert "no room" in r.json()["detail"]
        assert files_under(small_disk.path) == []
        assert small_disk.used() < MiB

        # A model that fits still loads: the full disk did not wedge the cache.
        r = loader.load(small_name, "models")
        assert r.status_code == 200 and r.content == small

        small_disk.resize("64m")
        r = loader.load(big_name, "models")
        assert r.status_code == 200 and r.content == big
        loader.cached_big_part("models", big_name)
        assert not [f for f in files_under(small_disk.path) if f.endswith(".part")]


def test_disk_full_on_upload_is_507_and_leaves_nothing(tmp_path, stack, uploader, proxy, small_disk):
    """Reliability: cache disk full while an upload is staged | 507; the staging file is removed, nothing
    reaches the CDN or the API"""
    data = os.urandom(12 * MiB)
    n = model_name()
    # No free-space floor: the disk is full for real here, and the budget of the default 1 GiB floor would
    # keep the upload's part out of the 64 MiB cache afterwards (a 507 of its own, tested elsewhere).
    env = {"MODEL_CACHE_DIR": small_disk.path, "MODEL_CACHE_MIN_FREE_BYTES": 0}
    with start_loader(tmp_path / "loader", stack, **env) as loader:
        assert loader.login(uploader, PASSWORD).status_code == 200
        r = loader.post(f"/upload/{n}", files={"data": (n, data)}, data={"folder": "models"})
        assert r.status_code == 507, (r.status_code, r.text[:200])
        assert "no room" in r.json()["detail"]
        assert files_under(small_disk.path) == []
        assert stack.admin.get_file("models", n + ".small") is None
        assert proxy.count("PUT", f"/models/{n}.big") == 0

        small_disk.resize("64m")
        r = loader.post(f"/upload/{n}", files={"data": (n, data)}, data={"folder": "models"})
        assert r.status_code == 200 and r.json()["size"] == len(data)
        assert loader.load(n, "models").content == data
