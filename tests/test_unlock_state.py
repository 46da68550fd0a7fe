"""unlock_state: the contract's seven states, one unlock at a time (restarted from error); a running state
held past its deadline is an error that a new unlock starts again from, and a run that overran can no longer
change the status of a newer one."""

import time

import pytest

import unlock_state
from unlock_state import AUTHENTICATING, DECRYPTING, DOWNLOADING_KEY, UnlockStatus


def test_a_state_held_past_its_deadline_ends_in_error_and_a_new_unlock_may_start():
    status = UnlockStatus(deadlines={DOWNLOADING_KEY: 1.0})
    run = status.try_begin()
    run.set_state(DOWNLOADING_KEY)
    assert status.try_begin() is None  # one runs
    assert status.snapshot()["state"] == DOWNLOADING_KEY
    time.sleep(1.2)
    snap = status.snapshot()
    assert snap["state"] == "error"
    assert snap["error"] == "the unlock took longer than 1 s in downloading_key"
    assert status.try_begin() is not None
    assert status.state == AUTHENTICATING


def test_each_state_has_its_own_deadline_counted_from_when_it_was_entered():
    status = UnlockStatus(deadlines={AUTHENTICATING: 1.0, DECRYPTING: 5})
    run = status.try_begin()
    time.sleep(0.6)
    run.set_state(DECRYPTING)  # no deadline overran: a new state's clock starts
    time.sleep(0.6)
    assert status.state == DECRYPTING


def test_a_run_that_overran_never_changes_a_newer_run():
    status = UnlockStatus(deadlines={DOWNLOADING_KEY: 0.1})
    old = status.try_begin()
    old.set_state(DOWNLOADING_KEY)
    time.sleep(0.2)
    assert status.state == "error"
    old.succeed(["late:1"])  # the stuck thread wakes up at last
    assert status.snapshot()["state"] == "error" and status.snapshot()["images"] == []
    new = status.try_begin()
    old.fail("late failure")
    old.add_done(10)
    assert status.snapshot() == {
        "state": "authenticating",
        "error": None,
        "bytesDone": 0,
        "bytesTotal": 0,
        "images": [],
    }
    new.succeed(["a:1"])
    assert status.snapshot()["state"] == "ready" and status.snapshot()["images"] == ["a:1"]


def test_without_deadlines_a_state_never_expires():
    status = UnlockStatus()
    status.try_begin().set_state(unlock_state.LOADING_IMAGES)
    time.sleep(0.05)
    assert status.state == unlock_state.LOADING_IMAGES


def test_unlock_states_are_the_contracts_seven():
    assert unlock_state.STATES == (
        "idle",
        "authenticating",
        "downloading_key",
        "decrypting",
        "loading_images",
        "ready",
        "error",
    )


def test_unlock_status_runs_one_at_a_time_and_restarts_from_error():
    s = unlock_state.UnlockStatus()
    assert s.snapshot() == {"state": "idle", "error": None, "bytesDone": 0, "bytesTotal": 0, "images": []}
    assert s.try_begin()
    assert not s.try_begin()
    s.set_state(unlock_state.DECRYPTING)
    s.set_total(100)
    s.add_done(40)
    assert s.snapshot()["bytesDone"] == 40
    s.fail("archive missing")
    assert s.snapshot()["state"] == "error" and s.snapshot()["error"] == "archive missing"
    assert s.try_begin()
    assert s.snapshot() == {
        "state": "authenticating",
        "error": None,
        "bytesDone": 0,
        "bytesTotal": 0,
        "images": [],
    }
    s.succeed(["a:1", "b:2"])
    assert s.snapshot()["images"] == ["a:1", "b:2"] and s.state == "ready"
    with pytest.raises(ValueError):
        s.set_state("bogus")
