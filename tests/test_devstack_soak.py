"""The soak's rules (devstack.soak.rules): what each answer may be, with and without faults. Each rule is
shown to pass what the contract allows and to fail what it does not, so the soak's "0 violations" means
something."""

import pytest

from devstack.soak.client import big_size, content, digest_of
from devstack.soak.rules import (
    GRACE,
    RESUME_SETTLE,
    Answer,
    Busy,
    CacheView,
    Episode,
    Model,
    Room,
    Session,
    User,
    Version,
    judge_cache_disk,
    judge_download_end,
    judge_downloads,
    judge_health,
    judge_let_go,
    judge_load,
    judge_login,
    judge_prefetch,
    judge_recovery,
    judge_resumed,
    judge_simple,
    judge_upload,
    pinned,
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


# --- the cache budget, prefetches and /downloads ------------------------------------------------------------

BIG = 100  # the big part of model_with()'s model in these tests
NO_ROOM = Answer(
    status=507, detail="no room in the model cache for soak/m.bin.big: it needs 100 bytes, 40 are available"
)


def status(state="fetching", done=40, total=BIG, resumed=0, error=None, name="m.bin", folder="soak"):
    return {
        "folder": folder,
        "name": name,
        "state": state,
        "bytesDone": done,
        "bytesTotal": total,
        "bytesResumed": resumed,
        "error": error,
    }


def room(pinned=0, budget=1000, needed=BIG):
    return Room(needed, budget, pinned, slack=10)


def prefetch(a, m=None, s=None, faults=(), r=None, t0=1.0, t1=2.0):
    return outcome(
        judge_prefetch(m or model_with(), a, s or logged_in(), list(faults), t0, t1, r or room(), "soak")
    )


def test_a_prefetch_answers_200_cached_or_202_fetching_or_verifying_with_the_parts_status():
    assert prefetch(Answer(status=200, json=status("cached", BIG))) == "ok"
    assert prefetch(Answer(status=202, json=status("fetching", 0))) == "ok"
    assert prefetch(Answer(status=202, json=status("verifying", BIG))) == "ok"
    assert prefetch(Answer(status=200, json=status("fetching"))) == "violation"  # 200 only when cached
    assert prefetch(Answer(status=202, json=status("cached", BIG))) == "violation"  # 202 only while it runs
    assert prefetch(Answer(status=202, json=status("failed", error="x"))) == "violation"
    assert prefetch(Answer(status=202, json=status(total=BIG + 1, done=0))) == "violation"  # another size
    assert prefetch(Answer(status=202, json=status(name="other.bin"))) == "violation"  # another model
    assert prefetch(Answer(status=202, json=status(folder="models"))) == "violation"
    no_key = status()
    del no_key["bytesResumed"]
    assert prefetch(Answer(status=202, json=no_key)) == "violation"
    assert prefetch(Answer(status=202, json={**status(), "extra": 1})) == "violation"


def test_a_prefetch_fails_only_as_a_load_may():
    s = logged_in()
    assert prefetch(Answer(status=401, detail="x"), s=s) == "violation"
    s.lose(1.5)
    assert prefetch(Answer(status=401, detail="x"), s=s) == "failed"  # the restarted loader had no session
    for code in (502, 504):
        assert prefetch(Answer(status=code, detail="x")) == "violation"
        assert prefetch(Answer(status=code, detail="x"), faults=[cdn_fault(0.0, None)]) == "failed"
        assert (
            prefetch(Answer(status=code, detail="x"), faults=[Episode("api_failing", "api", 0.0)]) == "failed"
        )
        assert prefetch(Answer(status=code, detail="x"), faults=[Episode("dockerd_stop", "docker", 0.0)]) == (
            "violation"
        )
    # a 502 while an upload changes the model (manifest and CDN object disagree for a moment)
    assert prefetch(Answer(status=502, detail="x"), m=model_with((0.5, 3.0, True))) == "failed"
    assert prefetch(Answer(status=502, detail="x"), m=model_with((0.1, 0.5, True))) == "violation"
    for code in (400, 404, 409, 500, 503):
        assert prefetch(Answer(status=code, detail="x"), faults=[cdn_fault(0.0, None)]) == "violation"
    gone = Answer(error="ConnectionError")
    assert prefetch(gone) == "violation"
    assert prefetch(gone, faults=[Episode("loader_kill", "kill", 0.0, heal=1.5)]) == "failed"


def test_a_507_needs_a_part_that_cannot_fit_beside_what_no_eviction_may_take():
    # budget 1000: 100 bytes fit beside 880 held (and 10 of slack), not beside 900
    assert prefetch(NO_ROOM, r=room(pinned=0)) == "violation"  # eviction could have made room
    assert prefetch(NO_ROOM, r=room(pinned=880)) == "violation"
    assert prefetch(NO_ROOM, r=room(pinned=900)) == "failed"
    assert prefetch(NO_ROOM, r=room(needed=1001)) == "failed"  # larger than the budget: never fits
    assert prefetch(Answer(status=507, detail="no room"), r=room(pinned=900)) == "violation"  # no bytes named
    # a part larger than the budget is never admitted
    too_big = room(needed=1001)
    assert prefetch(Answer(status=202, json=status(total=1001)), r=too_big) == "violation"
    # faults excuse no 507: the disk budget is no upstream
    assert prefetch(NO_ROOM, faults=[cdn_fault(0.0, None)], r=room(pinned=0)) == "violation"
    # loads: the same rule, and without a budget a 507 is always a violation
    m, s = model_with(), logged_in()
    assert outcome(judge_load(m, NO_ROOM, s, [], 1.0, 2.0, room(pinned=900))) == "failed"
    assert outcome(judge_load(m, NO_ROOM, s, [], 1.0, 2.0, room(pinned=0))) == "violation"
    assert outcome(judge_load(m, NO_ROOM, s, [], 1.0, 2.0)) == "violation"
    assert outcome(judge_load(m, NO_ROOM, s, [], 1.0, 2.0, Room(BIG, 0, 10**9))) == "violation"  # no cap


def test_what_no_eviction_may_take_is_every_other_operations_model_once_per_kind():
    own = Busy("a", 100, "read", 1.0)
    busy = [
        own,
        Busy("b", 200, "read", 0.0, 3.0),
        Busy("b", 200, "read", 1.5, None),  # the same part twice: held once
        Busy("c", 300, "read", 0.0, 1.0 - GRACE - 0.1),  # ended, and its commit too, before the operation
        Busy("d", 400, "read", 0.0, 1.0 - GRACE / 2),  # its download may still commit
        Busy("e", 500, "read", 2.5, None),  # began after the operation ended
    ]
    assert pinned(busy, own, 1.0, 2.0) == 200 + 400
    # another load of the operation's own model holds its (maybe older) part
    assert pinned([own, Busy("a", 100, "read", 0.5, 1.5)], own, 1.0, 2.0) == 100
    # an upload stages its part; with a read of the same model both versions are held, and a download of it
    assert pinned([Busy("f", 50, "upload", 0.0, None)], own, 1.0, 2.0) == 50
    assert (
        pinned([Busy("f", 50, "upload", 0.0, None), Busy("f", 50, "read", 0.0, None)], own, 1.0, 2.0) == 150
    )


def downloads_answer(*statuses, used=500, most=1000, free=None):
    free = max(0, most - used) if free is None else free
    cache = {"bytesUsed": used, "bytesMax": most, "bytesFree": free}
    return Answer(status=200, json={"downloads": list(statuses), "cache": cache})


VIEW = CacheView(1000, {"m.bin": BIG, "n.bin": 7}, staging=0, slack=10)


def downloads(a, view=VIEW, faults=()):
    return outcome(judge_downloads(a, view, "soak", list(faults), 1.0, 2.0))


def test_downloads_is_always_200_with_the_contracts_shape():
    assert downloads(downloads_answer()) == "ok"
    good = [
        status("fetching", 0),
        status("verifying", BIG, resumed=60),
        status("cached", BIG, resumed=BIG),
        status("failed", 30, error="the CDN failed"),
        status("cached", 7, 7, name="n.bin"),
    ]
    assert downloads(downloads_answer(*good)) == "ok"
    bad = [
        status(done=BIG + 1),  # more done than the part holds
        status(done=30, resumed=40),  # resumed bytes count as done
        status("cached", 90),  # cached with bytes missing
        status("failed", 30),  # failed without an error
        status("fetching", error="x"),  # an error while it runs
        status("paused"),
        status(total=BIG - 1),  # not the part's size
        status(name="unknown.bin"),
        status(folder="other"),
        status(done=-1),
        status(done=1.5),
        {k: v for k, v in status().items() if k != "error"},
    ]
    for one in bad:
        assert downloads(downloads_answer(*good, one)) == "violation", one
    assert downloads(Answer(status=200, json={"downloads": []})) == "violation"
    assert downloads(Answer(status=200, json={"downloads": {}, "cache": {}})) == "violation"
    for code in (500, 503, 507):
        assert downloads(Answer(status=code, detail="x"), faults=[cdn_fault(0.0, None)]) == "violation"
    gone = Answer(error="ConnectionError")
    assert downloads(gone) == "violation"
    assert downloads(gone, faults=[Episode("loader_kill", "kill", 0.0)]) == "failed"


def test_downloads_keeps_to_the_budget_but_for_uploads_staging_and_metadata():
    assert downloads(downloads_answer(used=1000)) == "ok"
    assert downloads(downloads_answer(used=1010)) == "ok"  # a sidecar and a record past the reservation
    assert downloads(downloads_answer(used=1011)) == "violation"
    staging = CacheView(1000, VIEW.sizes, staging=300, slack=10)
    assert downloads(downloads_answer(used=1310), staging) == "ok"  # an upload stages its part meanwhile
    assert downloads(downloads_answer(used=1311), staging) == "violation"
    assert downloads(downloads_answer(most=2000)) == "violation"  # not MODEL_CACHE_MAX_BYTES
    assert downloads(downloads_answer(used=400, free=601)) == "violation"  # more free than the budget leaves
    assert downloads(downloads_answer(used=400, free=100)) == "ok"  # the disk may leave less
    assert downloads(downloads_answer(used=1005, free=0)) == "ok"
    assert downloads(downloads_answer(used=1005, free=1)) == "violation"
    assert downloads(downloads_answer(used=-1)) == "violation"
    # without a cap, only the shape
    assert downloads(downloads_answer(used=10**9, most=0, free=10**6), CacheView(0, VIEW.sizes)) == "ok"


def test_a_prefetched_download_ends_cached_and_fails_only_under_a_fault():
    m = model_with()
    assert outcome(judge_download_end(m, status("cached", BIG), [], 1.0, 2.0)) == "ok"
    broke = status("failed", 30, error="the CDN failed")
    assert outcome(judge_download_end(m, broke, [], 1.0, 2.0)) == "violation"
    assert outcome(judge_download_end(m, broke, [cdn_fault(0.0, None)], 1.0, 2.0)) == "failed"
    assert outcome(judge_download_end(m, broke, [Episode("api_failing", "api", 0.0)], 1.0, 2.0)) == "failed"
    assert (
        outcome(judge_download_end(m, broke, [Episode("dockerd_stop", "docker", 0.0)], 1.0, 2.0))
        == "violation"
    )
    assert outcome(judge_download_end(model_with((0.5, 1.5, True)), broke, [], 1.0, 2.0)) == "failed"
    assert outcome(judge_download_end(m, None, [], 1.0, 2.0)) == "violation"  # vanished
    assert (
        outcome(judge_download_end(m, None, [Episode("loader_kill", "kill", 1.5, heal=1.6)], 1.0, 2.0))
        == "failed"
    )
    assert (
        outcome(judge_download_end(m, "still ran after 180 s", [cdn_fault(0.0, None)], 1.0, 2.0))
        == "violation"
    )


def resumed(st, seen=60, seen_at=5.0, killed_at=10.0, login=11.0, faults=(), m=None, r=None, evicted=False):
    verdict = judge_resumed(
        m or model_with(), st, seen, seen_at, killed_at, login, list(faults), 20.0, r or room(), evicted
    )
    return outcome(verdict)


def test_an_interrupted_prefetch_resumes_after_the_login_with_the_blocks_it_had():
    assert resumed(status("cached", BIG, resumed=60)) == "ok"
    assert resumed(status("cached", BIG, resumed=BIG)) == "ok"
    assert resumed(status("cached", BIG, resumed=40)) == "violation"  # blocks on disk fetched again
    assert resumed(status("cached", BIG, resumed=0)) == "violation"
    # bytes seen too shortly before the kill need not be on disk yet
    late = 10.0 - RESUME_SETTLE / 2
    assert resumed(status("cached", BIG, resumed=0), seen_at=late) == "ok"
    # ... nor those of a leftover evicted for another download, or of a manifest an upload replaced
    assert resumed(status("cached", BIG, resumed=0), evicted=True) == "failed"
    assert resumed(status("cached", BIG, resumed=0), m=model_with((12.0, 14.0, True))) == "failed"


def test_an_interrupted_prefetch_that_does_not_resume_needs_an_excuse():
    assert resumed(None) == "violation"
    assert resumed(status("failed", 60, resumed=60, error="x")) == "violation"
    for fault in (
        cdn_fault(12.0, 13.0),
        Episode("api_failing", "api", 11.0),
        Episode("loader_kill", "kill", 15.0),
    ):
        assert resumed(None, faults=[fault]) == "failed"
        assert resumed(status("failed", 60, resumed=60, error="x"), faults=[fault]) == "failed"
    assert resumed(None, faults=[Episode("dockerd_stop", "docker", 11.0)]) == "violation"
    assert resumed(None, faults=[cdn_fault(1.0, 2.0)]) == "violation"  # healed long before the kill
    assert resumed(None, evicted=True) == "failed"
    assert resumed(None, r=room(pinned=900)) == "failed"  # no room to resume it
    # no login after the restart: only a fault that reaches a login excuses that
    assert resumed(None, login=None) == "violation"
    assert resumed(None, login=None, faults=[Episode("api_trickle", "api", 9.0)]) == "failed"


def test_the_parts_on_disk_at_rest_are_within_the_budget():
    assert outcome(judge_cache_disk(1000, 1000)) == "ok"
    assert outcome(judge_cache_disk(1001, 1000)) == "violation"
    assert outcome(judge_cache_disk(10**12, 0)) == "ok"  # no cap


def test_a_session_knows_its_logins():
    s = Session()
    assert s.login_after(0.0) is None
    s.log_in(UPLOADER, 1.0)
    s.lose(2.0)
    s.log_in(OPERATOR, 3.0)
    assert s.login_after(0.5) == 1.0
    assert s.login_after(2.0) == 3.0
    assert s.login_after(3.0) is None


@pytest.mark.parametrize("size", [1, 1024, 70_000, 4 * 1024 * 1024 + 17, 8 * 1024 * 1024])
def test_the_big_part_is_the_blob_less_its_small_part(size):
    blob = 16 + (size // 16 + 1) * 16  # IV, then PKCS#7
    assert big_size(size) == blob - min(3072, blob * 3 // 10)
