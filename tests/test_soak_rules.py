"""The soak's rules (devstack.soak_rules): what each answer may be, with and without faults. Each rule is
shown to pass what the contract allows and to fail what it does not, so the soak's "0 violations" means
something."""

import pytest

from devstack.soak_client import content, digest_of
from devstack.soak_rules import (
    GRACE,
    Answer,
    Episode,
    Model,
    Session,
    User,
    Version,
    judge_health,
    judge_let_go,
    judge_load,
    judge_login,
    judge_recovery,
    judge_simple,
    judge_upload,
)

UPLOADER = User("up@x", "pw", "ResourceUploader")
OPERATOR = User("op@x", "pw", "Operator")


def model_with(*versions):
    """A model whose version 0 was published at t=0, then ``versions``: (start, end, ok) of uploads."""
    m = Model(0, "m.bin", 10, [Version(0, "v0", 10, 0.0, 0.0, True)])
    for i, (start, end, ok) in enumerate(versions, 1):
        m.versions.append(Version(i, f"v{i}", 10, start, end, ok))
    return m


def whole(digest, size=10):
    return Answer(status=200, length=size, got=size, digest=digest)


def logged_in():
    session = Session()
    session.log_in(UPLOADER, 0.0)
    return session


def cdn_fault(start, heal):
    return Episode("cdn_cut", "cdn", start, heal=heal)


def outcome(verdict):
    return verdict.outcome


def test_a_whole_load_must_be_a_committed_version():
    m = model_with((10.0, 20.0, True))
    s = logged_in()
    assert outcome(judge_load(m, whole("v0"), s, [], 1.0, 2.0)) == "ok"
    assert outcome(judge_load(m, whole("v1"), s, [], 1.0, 2.0)) == "violation"  # not uploaded yet
    assert outcome(judge_load(m, whole("v1"), s, [], 21.0, 22.0)) == "ok"
    assert outcome(judge_load(m, whole("v0"), s, [], 21.0, 22.0)) == "violation"  # replaced before it began
    assert outcome(judge_load(m, whole("other"), s, [cdn_fault(0.0, None)], 1.0, 2.0)) == "violation"


def test_while_an_upload_runs_the_old_and_the_new_version_are_both_right():
    m = model_with((10.0, 20.0, True))
    s = logged_in()
    for digest in ("v0", "v1"):
        assert outcome(judge_load(m, whole(digest), s, [], 15.0, 16.0)) == "ok"
        assert outcome(judge_load(m, whole(digest), s, [], 5.0, 12.0)) == "ok"  # the upload began meanwhile
    # refused, or cut off, while the upload changes the model: allowed; once it committed: not
    refused = Answer(status=502, detail="does not match its manifest")
    assert outcome(judge_load(m, refused, s, [], 15.0, 16.0)) == "failed"
    assert outcome(judge_load(m, refused, s, [], 21.0, 22.0)) == "violation"
    cut = Answer(status=200, length=10, got=4, error="ChunkedEncodingError")
    assert outcome(judge_load(m, cut, s, [], 15.0, 16.0)) == "failed"
    assert outcome(judge_load(m, cut, s, [], 21.0, 22.0)) == "violation"


def test_a_failed_upload_leaves_the_model_unsettled_until_one_commits():
    m = model_with((10.0, 20.0, False))
    s = logged_in()
    for digest in ("v0", "v1"):  # the manifest may have landed before the failure
        assert outcome(judge_load(m, whole(digest), s, [], 30.0, 31.0)) == "ok"
    assert outcome(judge_load(m, Answer(status=502, detail="x"), s, [], 30.0, 31.0)) == "failed"
    m.versions.append(Version(2, "v2", 10, 40.0, 50.0, True))
    assert outcome(judge_load(m, whole("v1"), s, [], 60.0, 61.0)) == "violation"
    assert outcome(judge_load(m, Answer(status=502, detail="x"), s, [], 60.0, 61.0)) == "violation"


def test_a_cut_off_or_an_upstream_failure_needs_an_active_fault():
    m = model_with()
    s = logged_in()
    cut = Answer(status=200, length=10, got=4, error="ChunkedEncodingError")
    for a in (cut, Answer(status=502, detail="CDN"), Answer(status=504, detail="slow")):
        assert outcome(judge_load(m, a, s, [], 1.0, 2.0)) == "violation"
        assert outcome(judge_load(m, a, s, [cdn_fault(0.0, None)], 1.0, 2.0)) == "failed"
        assert outcome(judge_load(m, a, s, [cdn_fault(0.0, 5.0)], 5.0 + GRACE / 2, 9.0)) == "failed"
        assert outcome(judge_load(m, a, s, [cdn_fault(0.0, 5.0)], 5.0 + GRACE * 2, 9.0)) == "violation"
        # a fault that cannot reach a load excuses nothing
        docker = Episode("dockerd_stop", "docker", 0.0)
        assert outcome(judge_load(m, a, s, [docker], 1.0, 2.0)) == "violation"


def test_a_500_is_always_a_violation_and_no_answer_needs_a_kill():
    m = model_with()
    s = logged_in()
    faults = [cdn_fault(0.0, None), Episode("api_failing", "api", 0.0), Episode("loader_kill", "kill", 0.0)]
    assert (
        outcome(judge_load(m, Answer(status=500, detail="internal error"), s, faults, 1.0, 2.0))
        == "violation"
    )
    gone = Answer(error="ConnectionError")
    assert outcome(judge_load(m, gone, s, faults[:2], 1.0, 2.0)) == "violation"
    assert outcome(judge_load(m, gone, s, faults, 1.0, 2.0)) == "failed"


def test_a_401_needs_a_moment_without_a_session():
    m = model_with()
    s = logged_in()
    assert outcome(judge_load(m, Answer(status=401, detail="x"), s, [], 1.0, 2.0)) == "violation"
    s.lose(3.0)
    s.log_in(UPLOADER, 4.0)
    assert outcome(judge_load(m, Answer(status=401, detail="x"), s, [], 2.5, 3.5)) == "failed"
    assert outcome(judge_load(m, Answer(status=401, detail="x"), s, [], 5.0, 6.0)) == "violation"
    assert outcome(judge_load(m, Answer(status=404, detail="x"), s, [cdn_fault(0.0, None)], 5.0, 6.0)) == (
        "violation"
    )


def test_uploads_by_role():
    ok = Answer(status=200, json={"status": "ok", "size": 10})
    assert outcome(judge_upload(ok, UPLOADER, 10, [], 1.0, 2.0)) == "ok"
    assert outcome(judge_upload(ok, UPLOADER, 11, [], 1.0, 2.0)) == "violation"  # another size
    assert outcome(judge_upload(ok, OPERATOR, 10, [], 1.0, 2.0)) == "violation"
    assert outcome(judge_upload(Answer(status=403), OPERATOR, 10, [], 1.0, 2.0)) == "failed"
    assert outcome(judge_upload(Answer(status=403), UPLOADER, 10, [], 1.0, 2.0)) == "violation"
    assert outcome(judge_upload(Answer(status=401), None, 10, [], 1.0, 2.0)) == "failed"
    api = [Episode("upload_small_refused", "api", 0.0)]
    assert outcome(judge_upload(Answer(status=502), UPLOADER, 10, api, 1.0, 2.0)) == "failed"
    assert outcome(judge_upload(Answer(status=502), UPLOADER, 10, [], 1.0, 2.0)) == "violation"


def test_logins_and_the_simple_routes():
    good = Answer(status=200, json={"status": "ok", "user": {"email": UPLOADER.email}})
    assert outcome(judge_login(good, UPLOADER, False, [], 1.0, 2.0)) == "ok"
    assert outcome(judge_login(good, OPERATOR, False, [], 1.0, 2.0)) == "violation"  # another user
    assert outcome(judge_login(good, UPLOADER, True, [], 1.0, 2.0)) == "violation"  # a wrong password
    assert outcome(judge_login(Answer(status=401), UPLOADER, True, [], 1.0, 2.0)) == "failed"
    assert outcome(judge_login(Answer(status=401), UPLOADER, False, [], 1.0, 2.0)) == "violation"
    api = [Episode("api_garbage", "api", 0.0)]
    assert outcome(judge_login(Answer(status=502), UPLOADER, False, api, 1.0, 2.0)) == "failed"
    assert outcome(judge_simple("status", Answer(status=200), [], 1.0, 2.0)) == "ok"
    assert outcome(judge_simple("metrics", Answer(status=502), api, 1.0, 2.0)) == "violation"


def test_health_is_200_under_every_fault_and_a_503_is_always_a_violation():
    healthy = Answer(status=200, json={"status": "healthy"})
    stuck = Answer(status=503, json={"status": "unhealthy", "reason": "all 64 load workers are held"})
    faults = [
        Episode("api_trickle", "api", 0.0),
        Episode("cdn_trickle", "cdn", 0.0),
        Episode("client_stall", "client", 0.0),
        Episode("loader_kill", "kill", 0.0),
    ]
    assert outcome(judge_health(healthy, [], 1.0, 2.0)) == "ok"
    assert outcome(judge_health(healthy, faults, 1.0, 2.0)) == "ok"
    assert outcome(judge_health(stuck, [], 1.0, 2.0)) == "violation"
    assert outcome(judge_health(stuck, faults, 1.0, 2.0)) == "violation"  # no fault excuses a stuck loader
    assert "all 64 load workers" in judge_health(stuck, faults, 1.0, 2.0).why
    assert outcome(judge_health(Answer(status=200, json={"status": "x"}), [], 1.0, 2.0)) == "violation"
    assert outcome(judge_health(Answer(status=500), faults, 1.0, 2.0)) == "violation"
    gone = Answer(error="ReadTimeout")
    assert outcome(judge_health(gone, faults[:3], 1.0, 2.0)) == "violation"  # only a kill excuses silence
    assert outcome(judge_health(gone, faults, 1.0, 2.0)) == "failed"


def test_stalled_clients_must_be_let_go_within_their_bound_whatever_else_is_active():
    # heads at 10 s, bound 8 s (CLIENT_STALL_TIMEOUT 3 s and a margin of 5 s), watched until 19 s
    assert outcome(judge_let_go(10.0, 13.5, 8.0, [], 19.0)) == "ok"
    assert outcome(judge_let_go(10.0, 18.0, 8.0, [], 19.0)) == "ok"
    assert outcome(judge_let_go(10.0, 18.5, 8.0, [], 19.0)) == "violation"  # let go, but late
    assert outcome(judge_let_go(10.0, None, 8.0, [], 19.0)) == "violation"  # never let go
    upstream = [cdn_fault(0.0, None), Episode("api_trickle", "api", 0.0), Episode("x", "client", 0.0)]
    assert outcome(judge_let_go(10.0, None, 8.0, upstream, 19.0)) == "violation"  # no fault excuses it
    assert outcome(judge_let_go(10.0, 18.5, 8.0, upstream, 19.0)) == "violation"
    # a loader killed meanwhile drops every client, and /status may not answer to the end of the watch
    kill = Episode("loader_kill", "kill", 12.0, heal=14.0)
    assert outcome(judge_let_go(10.0, None, 8.0, [kill], 19.0)) == "failed"
    assert outcome(judge_let_go(10.0, None, 8.0, [Episode("loader_kill", "kill", 1.0, heal=3.0)], 19.0)) == (
        "violation"  # a kill long before the stall excuses nothing
    )


def test_after_a_heal_the_loader_must_recover_within_its_bound():
    healed = Episode("api_trickle", "api", 0.0, heal=10.0)
    assert outcome(judge_recovery(healed, "load", 10.5, 25.0, [healed])) == "ok"
    assert outcome(judge_recovery(healed, "load", 35.0, 25.0, [healed])) == "ok"
    # the healed fault itself excuses nothing (its grace window covers the start of the bound)
    assert outcome(judge_recovery(healed, "load", 35.5, 25.0, [healed])) == "violation"
    assert outcome(judge_recovery(healed, "load", None, 25.0, [healed])) == "violation"
    # another fault reaching the probe while the loader should recover does
    cdn = cdn_fault(20.0, 30.0)
    assert outcome(judge_recovery(healed, "load", None, 25.0, [healed, cdn])) == "failed"
    assert outcome(judge_recovery(healed, "load", 40.0, 25.0, [healed, cdn])) == "failed"
    # ... but not one that ended before the heal, nor one that cannot reach a load, nor a stalled client
    over = cdn_fault(0.0, 10.0 - GRACE - 1)
    docker = Episode("dockerd_stop", "docker", 12.0)
    stall = Episode("client_stall", "client", 12.0, heal=15.0)
    assert outcome(judge_recovery(healed, "load", None, 25.0, [healed, over, docker, stall])) == "violation"
    # a stalled client's own recovery: the next load within the stall bound
    stall.heal = 15.0
    assert outcome(judge_recovery(stall, "load", 16.0, 8.0, [stall])) == "ok"
    assert outcome(judge_recovery(stall, "load", None, 8.0, [stall])) == "violation"


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024, 1024 * 1024 + 3])
def test_content_is_the_same_for_the_same_seed_and_differs_by_version(size):
    first = b"".join(content(7, 1, 2, size))
    assert len(first) == size
    assert b"".join(content(7, 1, 2, size)) == first
    assert digest_of(content(7, 1, 2, size)) == digest_of([first])
    if size:
        assert b"".join(content(7, 1, 3, size)) != first
        assert b"".join(content(8, 1, 2, size)) != first
