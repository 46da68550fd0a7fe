"""disk_budget: the cache's disk budget (contract section 8.3): parts are evicted least recently loaded first
until a download fits MODEL_CACHE_MAX_BYTES and MODEL_CACHE_MIN_FREE_BYTES; a busy part, the uploads' staging
and whatever lies behind a symbolic link are never touched; when no eviction can make room, nothing is evicted
and the error says why. Real files in tmp_path; the filesystem's free space is a fake statvfs."""

import logging
import os
from types import SimpleNamespace

import pytest

import disk_budget
import download
import errors
import model_cache
from disk_budget import DiskBudget

NOW = 1_700_000_000.0
MIB = 1 << 20
PLENTY = 1 << 50  # free bytes when free space is not what a test is about


class FakeStatvfs:
    """statvfs that reports ``free`` bytes available, whatever is on the disk (of a path that exists)."""

    def __init__(self, free=PLENTY):
        self.free = free

    def __call__(self, path):
        os.stat(path)
        return SimpleNamespace(f_bavail=self.free, f_frsize=1)


def budget(root, max_bytes=0, min_free=0, free=PLENTY):
    return DiskBudget(
        root, max_bytes=max_bytes, min_free=min_free, statvfs=FakeStatvfs(free), clock=lambda: NOW
    )


def part(root, key, size, age, bucket="models"):
    """A committed part ``bucket/key`` of ``size`` bytes with its 2-byte sidecar, last loaded ``age`` seconds
    before NOW; its data path."""
    folder = root / bucket
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / key
    data.write_bytes(os.urandom(size))
    (folder / (key + ".meta")).write_text("{}")
    os.utime(data, (NOW - age, NOW - age))
    return data


def leftover(root, key, size, age, bucket="models", record=True):
    """A download's ``.part`` of ``size`` bytes, preallocated as a download does, and its 2-byte record, last
    written ``age`` seconds before NOW; the .part's path."""
    folder = root / bucket
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{key}.{os.urandom(16).hex()}"
    path = stem.with_name(stem.name + ".part")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    if record:
        stem.with_name(stem.name + ".record").write_text("[]")
    os.utime(path, (NOW - age, NOW - age))
    return path


def names(root, bucket="models"):
    return sorted(os.listdir(root / bucket))


def test_the_module_under_test_is_the_compiled_one():
    assert disk_budget.__file__.endswith(".so"), disk_budget.__file__


def test_its_file_names_are_the_caches():
    assert disk_budget.PART_SUFFIX == download.PART_SUFFIX
    assert disk_budget.META_SUFFIX == model_cache.META_SUFFIX


@pytest.mark.parametrize("setting", ["max_bytes", "min_free"])
@pytest.mark.parametrize("value", [-1, 1.5, "1", True, None])
def test_settings_are_whole_numbers_of_bytes(tmp_path, setting, value):
    with pytest.raises(ValueError):
        DiskBudget(tmp_path, **{setting: value})


def test_usage_counts_every_regular_file_and_a_preallocated_part_in_full(tmp_path):
    part(tmp_path, "a.big", 1000, 10)
    leftover(tmp_path, "b.big", 3 * MIB, 10)  # nothing written yet: its full size all the same
    (tmp_path / ".staging").mkdir()
    (tmp_path / ".staging" / "up.big.0123.part").write_bytes(b"x" * 300)
    (tmp_path / "stray").write_bytes(b"x" * 7)
    assert budget(tmp_path).usage() == 1000 + 2 + 3 * MIB + 2 + 300 + 7


def test_a_cache_not_made_yet_holds_nothing_and_its_parent_tells_the_free_space(tmp_path):
    fs = FakeStatvfs(5000)
    seen = []
    b = DiskBudget(tmp_path / "not" / "yet", min_free=0, statvfs=lambda p: seen.append(p) or fs(p))
    assert b.room() == {"bytesUsed": 0, "bytesMax": 0, "bytesFree": 5000}
    b.make_room(5000, set(), "models/m.big")
    assert seen[0] == str(tmp_path / "not" / "yet")
    assert str(tmp_path) in seen


def test_parts_go_least_recently_loaded_first(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="loader.cdn")
    old = part(tmp_path, "old.big", 1000, 30)
    part(tmp_path, "mid.big", 1000, 20)
    part(tmp_path, "new.big", 1000, 10)
    b = budget(tmp_path, max_bytes=3 * 1002 + 500)
    b.make_room(1000, set(), "models/x.big")  # one part must go, and one is enough
    assert names(tmp_path) == ["mid.big", "mid.big.meta", "new.big", "new.big.meta"]
    assert not old.exists()
    assert (b.evictions, b.evicted_bytes) == (1, 1002)
    assert "models/old.big" in caplog.text and "1002 bytes" in caplog.text


def test_a_load_makes_a_part_the_most_recently_loaded(tmp_path):
    old = part(tmp_path, "old.big", 1000, 30)
    part(tmp_path, "mid.big", 1000, 20)
    part(tmp_path, "new.big", 1000, 10)
    b = budget(tmp_path, max_bytes=3 * 1002 + 500)
    b.touch(str(old))
    assert os.stat(old).st_mtime == NOW  # on the disk: the order survives a restart
    b.make_room(1000, set(), "models/x.big")
    assert names(tmp_path) == ["new.big", "new.big.meta", "old.big", "old.big.meta"]


def test_touch_ignores_a_part_that_is_gone(tmp_path):
    budget(tmp_path).touch(str(tmp_path / "models" / "gone.big"))


def test_a_busy_part_is_never_evicted(tmp_path):
    reading = part(tmp_path, "reading.big", 1000, 40)
    downloading = leftover(tmp_path, "fetching.big", 1000, 30)
    part(tmp_path, "idle.big", 1000, 20)
    part(tmp_path, "fresh.big", 1000, 10)
    b = budget(tmp_path, max_bytes=4 * 1002 + 500)
    b.make_room(1000, {str(reading), str(downloading)}, "models/x.big")
    assert reading.exists() and downloading.exists()
    assert not (tmp_path / "models" / "idle.big").exists()
    assert (tmp_path / "models" / "fresh.big").exists()


def test_a_download_s_leftover_is_evicted_with_its_record(tmp_path):
    gone = leftover(tmp_path, "crashed.big", 2000, 30)
    orphan = tmp_path / "models" / f"lost.big.{'ab' * 16}.record"  # its .part is gone already
    orphan.write_text("[]")
    os.utime(orphan, (NOW - 40, NOW - 40))
    committing = tmp_path / "models" / f"c.big.meta.{'cd' * 16}.part"  # a sidecar a commit is writing
    committing.write_text("{}")
    os.utime(committing, (NOW - 50, NOW - 50))
    part(tmp_path, "kept.big", 1000, 10)
    b = budget(tmp_path, max_bytes=2 + 2002 + 2 + 1002 + 500)
    b.make_room(1500, set(), "models/x.big")
    assert not gone.exists() and not orphan.exists()
    assert names(tmp_path) == [committing.name, "kept.big", "kept.big.meta"]
    assert (b.evictions, b.evicted_bytes) == (2, 2 + 2002)


def test_the_staging_folder_is_never_touched(tmp_path):
    staging = tmp_path / ".staging"
    staging.mkdir()
    upload = staging / "up.big.0123.part"
    upload.write_bytes(b"x" * 4000)
    os.utime(upload, (0, 0))  # older than anything
    part(tmp_path, "a.big", 1000, 10)
    b = budget(tmp_path, max_bytes=5000)
    with pytest.raises(errors.StorageError):
        b.make_room(2000, set(), "models/x.big")  # only evicting the upload would make room
    assert upload.exists() and (tmp_path / "models" / "a.big").exists()
    b.make_room(900, set(), "models/x.big")  # the part is enough
    assert upload.exists() and names(tmp_path) == []


def test_a_part_larger_than_the_budget_evicts_nothing_and_says_why(tmp_path):
    part(tmp_path, "a.big", 1000, 20)
    busy = part(tmp_path, "b.big", 1000, 10)
    before = names(tmp_path)
    b = budget(tmp_path, max_bytes=3000)
    with pytest.raises(errors.StorageError) as raised:
        b.make_room(268435456, {str(busy)}, "models/m.big")
    assert names(tmp_path) == before
    assert b.evictions == 0
    # After every part that may go, the busy part's 1002 bytes stay under the cap of 3000.
    assert raised.value.detail == (
        "no room in the model cache for models/m.big: it needs 268435456 bytes, 1998 are available "
        "(MODEL_CACHE_MAX_BYTES 3000, MODEL_CACHE_MIN_FREE_BYTES 0)"
    )


def test_min_free_is_kept_on_the_filesystem(tmp_path):
    for i, age in enumerate((30, 20, 10)):
        part(tmp_path, f"p{i}.big", MIB, age)
    # 1.5 MiB free, 1 MiB to keep: 2 MiB more needs two parts gone (one leaves 0.5 MiB short).
    b = budget(tmp_path, min_free=MIB, free=3 * MIB // 2)
    assert b.room()["bytesFree"] == MIB // 2
    b.make_room(2 * MIB, set(), "models/x.big")
    assert names(tmp_path) == ["p2.big", "p2.big.meta"]
    with pytest.raises(errors.StorageError) as raised:
        b.make_room(3 * MIB, set(), "models/y.big")  # the fake's free space does not grow: only p2 could go
    assert "MODEL_CACHE_MIN_FREE_BYTES 1048576" in raised.value.detail
    assert "MODEL_CACHE_MAX_BYTES 0 (no cap)" in raised.value.detail
    assert names(tmp_path) == ["p2.big", "p2.big.meta"]


def test_no_cap_when_max_bytes_is_0(tmp_path):
    part(tmp_path, "a.big", 5 * MIB, 10)
    b = budget(tmp_path, max_bytes=0, min_free=1000, free=10 * MIB)
    b.make_room(9 * MIB, set(), "models/x.big")
    assert names(tmp_path) == ["a.big", "a.big.meta"]
    assert b.room() == {"bytesUsed": 5 * MIB + 2, "bytesMax": 0, "bytesFree": 10 * MIB - 1000}


def test_room_is_the_least_of_the_cap_and_the_free_space(tmp_path):
    part(tmp_path, "a.big", 1000, 10)
    assert budget(tmp_path, max_bytes=3000, free=PLENTY).room() == {
        "bytesUsed": 1002,
        "bytesMax": 3000,
        "bytesFree": 1998,
    }
    assert budget(tmp_path, max_bytes=3000, min_free=100, free=600).room()["bytesFree"] == 500
    assert budget(tmp_path, max_bytes=500).room()["bytesFree"] == 0  # over the cap: never below 0


def test_needing_nothing_still_brings_the_cache_under_its_cap(tmp_path):
    part(tmp_path, "a.big", 1000, 20)
    part(tmp_path, "b.big", 1000, 10)
    b = budget(tmp_path, max_bytes=1500)  # lowered since they were cached
    b.make_room(0, set(), "models/x.big")
    assert names(tmp_path) == ["b.big", "b.big.meta"]


def test_symbolic_links_are_neither_followed_nor_counted(tmp_path):
    root, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (outside / "m.big").write_bytes(b"x" * 5000)
    (outside / "m.big.meta").write_text("{}")
    os.utime(outside / "m.big", (0, 0))
    part(root, "a.big", 1000, 10)
    (root / "linked").symlink_to(outside, target_is_directory=True)  # a bucket's folder that is a link
    (root / "models" / "l.big").symlink_to(outside / "m.big")  # a data file that is one
    b = budget(root, max_bytes=2000)
    assert b.usage() == 1002
    with pytest.raises(errors.StorageError):
        b.make_room(5000, set(), "models/x.big")
    b.make_room(1500, set(), "models/x.big")
    assert sorted(os.listdir(outside)) == ["m.big", "m.big.meta"]
    assert (outside / "m.big").stat().st_size == 5000
    assert (root / "linked").is_symlink() and names(root) == ["l.big"]


def test_a_part_that_cannot_be_removed_is_skipped(tmp_path, monkeypatch, caplog):
    part(tmp_path, "stuck.big", 1000, 30)
    part(tmp_path, "b.big", 1000, 20)
    part(tmp_path, "c.big", 1000, 10)
    unlink = os.unlink

    def refuse_stuck(path, *, dir_fd=None):
        if str(path).startswith("stuck.big"):
            raise PermissionError(13, "Permission denied")
        return unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", refuse_stuck)
    b = budget(tmp_path, max_bytes=3 * 1002 + 500)
    b.make_room(1000, set(), "models/x.big")
    assert names(tmp_path) == ["c.big", "c.big.meta", "stuck.big", "stuck.big.meta"]
    assert "could not evict models/stuck.big.meta" in caplog.text
    assert b.evictions == 1


def test_the_sidecar_goes_before_the_data(tmp_path, monkeypatch):
    part(tmp_path, "a.big", 1000, 20)
    leftover(tmp_path, "b.big", 1000, 10)
    order = []
    unlink = os.unlink
    monkeypatch.setattr(
        os, "unlink", lambda path, *, dir_fd=None: order.append(path) or unlink(path, dir_fd=dir_fd)
    )
    budget(tmp_path, max_bytes=1).make_room(0, set(), "models/x.big")
    assert order[:2] == ["a.big.meta", "a.big"]
    assert order[2].endswith(".record") and order[3].endswith(".part") and len(order) == 4
