"""What the soak holds every answer to: the state it tracks, and the rules derived from contract section 4.

The soak (devstack.soak) runs work and faults side by side. It cannot know which fault a failing answer
met, so the rules ask a narrower question: was any fault that can reach this route active while the
operation ran? The rules, operation by operation:

- a 500, or a status the contract does not list for the route, is always a violation;
- a 200 ``/load`` that ends whole must be byte-identical to a version of the model that an upload
  committed: the one committed last before the load began, or one of any upload that started before the
  load ended (in flight, or failed: a failed upload may still have landed its manifest). Anything else
  is a violation, faults or not;
- a 200 ``/load`` cut off short of its Content-Length, a 502/504, or no answer at all, is allowed only
  when a fault that reaches the route was active during the operation (its window ends ``GRACE`` seconds
  after the heal: work under way then, such as a download retrying, may still meet it), or, for a cut-off
  or a 502, when an upload of that model overlapped it or left it unsettled (the contract: loads are
  refused, never spliced, until an upload commits); else a violation ("unexplained");
- no answer at all needs the loader killed during the operation (the other faults get an answer);
- a 401 needs a moment without a session (the loader restarted and not yet logged in again), or bad
  credentials at ``/login``; a 403 needs a role that may not upload.

Liveness (contract section "Liveness"): no fault may hang the loader.

- ``/health`` answers 200 under every fault; a 503 (every worker of a pool held past its deadline) is a
  violation whatever is active: the soak's faults all end within the loader's deadlines;
- a ``/load`` client that reads nothing is let go (its load gone from ``/status``'s operations) within
  ``CLIENT_STALL_TIMEOUT`` and a margin of the moment it got its answer's head;
- after a fault heals, ``/health`` answers 200 and a probe (a load of a model nothing else changes)
  succeeds within a bound (the loader's deadline for what the fault held, and a margin), unless another
  fault that reaches the probe was active meanwhile.

The cache budget and staging (contract sections 4 and 8): the loader runs with a MODEL_CACHE_MAX_BYTES that
holds only part of the models, so parts are evicted as others are fetched.

- ``POST /prefetch`` answers 200 with a download status in state ``cached``, or 202 with one in state
  ``fetching`` or ``verifying``, of the model asked for and its big part's size; else a 401 without a session,
  a 502/504 as for a load, no answer only while the loader was killed;
- a 507 (of a prefetch or a load) only when the part cannot fit: its bytes, and the bytes of the parts no
  eviction may remove while the operation ran (``Room``: every model being read, downloaded or uploaded
  then), together exceed the budget. A part larger than the budget is always a 507, never a 200 or 202;
- a download a prefetch started ends ``cached`` (``failed`` only as a load may fail), and a load after it is
  byte-identical to a committed version, as every load (an eviction never breaks a load in progress: a 200
  delivers its bytes whole);
- ``GET /downloads`` is always 200 with the contract's shape: every status's keys and state, ``bytesResumed
  <= bytesDone <= bytesTotal``, the part's size as ``bytesTotal``, ``bytesDone == bytesTotal`` once cached, an
  ``error`` exactly when failed; ``bytesMax`` the budget, ``bytesFree <= bytesMax - bytesUsed``, and
  ``bytesUsed <= bytesMax``: the budget is enforced before a download reserves its part's full size, so
  committed parts and the parts of downloads in flight stay within it together. Only what the budget does not
  govern may stand above it: the staging files of uploads in flight, and the few hundred bytes of sidecar
  and record a download writes after its reservation (``CacheView.slack``). At rest the parts on disk
  (committed and partial, the staging folder left out) are within the budget, byte for byte;
- a prefetch interrupted by a killed loader resumes after the next login, unasked: a download of the model
  appears, ends cached, and holds again (``bytesResumed``) at least the bytes the soak saw written
  ``RESUME_SETTLE`` seconds before the kill (the record names a block once it is on disk; the loader does so
  every half second).
"""

import re
import threading
from dataclasses import dataclass, field

# Seconds after a heal during which a fault still excuses a failure of work that had already begun.
GRACE = 2.0

# The faults each route can meet: CDN faults reach loads and uploads, Resource API faults every call the
# loader makes upstream, a killed loader every route, a stopped Docker Engine only unlock. "disk" (a
# cached file altered) excuses nothing: the loader must mend it by fetching the part again.
REACH = {
    "load": frozenset({"cdn", "api", "kill"}),
    "upload": frozenset({"cdn", "api", "kill"}),
    "login": frozenset({"api", "kill"}),
    "unlock": frozenset({"api", "docker", "kill"}),
    "status": frozenset({"kill"}),
    "metrics": frozenset({"kill"}),
    "health": frozenset({"kill"}),
    "prefetch": frozenset({"cdn", "api", "kill"}),
    "downloads": frozenset({"kill"}),
}
UPSTREAM_FAILURES = (502, 504)
# The download status (contract section 4) and the cache's usage of GET /downloads.
STATUS_KEYS = frozenset({"folder", "name", "state", "bytesDone", "bytesTotal", "bytesResumed", "error"})
STATES = ("fetching", "verifying", "cached", "failed")
RUNNING_STATES = ("fetching", "verifying")
CACHE_KEYS = frozenset({"bytesUsed", "bytesMax", "bytesFree"})
# Seconds after the soak saw a download's bytes written by which they must be on disk and named in its record:
# a prefetch interrupted later must resume with at least those bytes.
RESUME_SETTLE = 1.5
UPLOAD_ROLES = frozenset({"Admin", "ResourceUploader", "ApiAdmin"})


@dataclass
class Version:
    """One version of a model: what an upload sent (or the seed published), and how the upload ended."""

    number: int
    digest: str  # SHA-256 of the plaintext, hex
    size: int
    start: float
    end: float | None = None
    ok: bool | None = None  # None while the upload runs; True only for a 200 with the right size


@dataclass
class Model:
    index: int
    name: str
    size: int
    versions: list[Version] = field(default_factory=list)
    upload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    next_version: int = 1

    def _since_commit(self, t0: float) -> tuple[Version, list[Version]]:
        """The version committed last before ``t0``, and every version that came after it."""
        last = 0
        for i, v in enumerate(self.versions):
            if v.ok and v.end is not None and v.end < t0:
                last = i
        return self.versions[last], self.versions[last + 1 :]

    def allowed(self, t0: float, t1: float) -> set[str]:
        """Digests a whole 200 load that ran from ``t0`` to ``t1`` may carry."""
        committed, later = self._since_commit(t0)
        return {committed.digest} | {v.digest for v in later if v.start < t1}

    def unsettled(self, t0: float, t1: float) -> bool:
        """An upload ran during the load, or one before it failed and none has committed since."""
        _, later = self._since_commit(t0)
        return any(v.start < t1 for v in later)

    def latest(self) -> Version:
        return self.versions[-1]


@dataclass(frozen=True)
class User:
    email: str
    password: str
    role: str

    @property
    def can_upload(self) -> bool:
        return self.role in UPLOAD_ROLES


class Session:
    """Who the loader's /login session belongs to, and the spans when it had none (a restarted loader
    before its next login)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.user: User | None = None
        self._none: list[list[float | None]] = []
        self._logins: list[float] = []

    def lose(self, t: float) -> None:
        with self._lock:
            if self.user is not None or not self._none or self._none[-1][1] is not None:
                self._none.append([t, None])
            self.user = None

    def log_in(self, user: User, t: float) -> None:
        with self._lock:
            if self._none and self._none[-1][1] is None:
                self._none[-1][1] = t
            self.user = user
            self._logins.append(t)

    def login_after(self, t: float) -> float | None:
        """When the first login after ``t`` succeeded (None: none yet)."""
        with self._lock:
            return next((at for at in self._logins if at > t), None)

    def maybe_none(self, t0: float, t1: float) -> bool:
        with self._lock:
            return any(start <= t1 and (end is None or end >= t0) for start, end in self._none)


@dataclass
class Episode:
    """One fault, from its injection to its heal."""

    kind: str
    channel: str  # cdn | api | kill | docker | disk | client
    start: float
    detail: str = ""
    heal: float | None = None
    ops_left: int = 0
    recovered: float | None = None  # end of the first success of a reached route after the heal

    def overlaps(self, t0: float, t1: float) -> bool:
        return self.start <= t1 and (self.heal is None or self.heal + GRACE >= t0)


@dataclass
class Answer:
    """What a client saw of one request."""

    status: int | None = None  # None: no answer (refused, reset, timed out)
    error: str | None = None  # the client's exception, when the request or its body broke
    detail: str | None = None  # the JSON detail of an error answer
    length: int | None = None  # Content-Length of a 200 load
    got: int = 0  # body bytes received
    digest: str | None = None
    json: object = None

    @property
    def cut_off(self) -> bool:
        return self.status == 200 and self.length is not None and self.got != self.length


@dataclass
class Verdict:
    outcome: str  # ok | failed (allowed under the faults) | violation
    why: str = ""


OK = Verdict("ok")


def violation(why: str) -> Verdict:
    return Verdict("violation", why)


def failed(why: str) -> Verdict:
    return Verdict("failed", why)


@dataclass
class Busy:
    """An operation that keeps a model's part from eviction while it runs: a load or prefetch reads or
    downloads it ("read"), an upload stages it ("upload"). ``end`` None: still running."""

    name: str
    size: int  # the big part's bytes
    kind: str  # read | upload
    start: float
    end: float | None = None

    def overlaps(self, t0: float, t1: float) -> bool:
        # A download commits after its last byte is sent, and its part stays busy that long: GRACE covers it.
        return self.start <= t1 and (self.end is None or self.end + GRACE >= t0)


def pinned(busy: list[Busy], own: Busy | None, t0: float, t1: float) -> int:
    """Bytes no eviction could remove while an operation ran from ``t0`` to ``t1``: each model read,
    downloaded or uploaded by another operation meanwhile, once as a part read or downloaded, once as an
    upload's staging, and once more when both (the old version read, or its download going on, while the
    new one is staged). The operation's own model counts when another operation held it."""
    kinds: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    for b in busy:
        if b is not own and b.overlaps(t0, t1):
            kinds.setdefault(b.name, set()).add(b.kind)
            sizes[b.name] = b.size
    return sum(sizes[name] * (len(k) + (len(k) > 1)) for name, k in kinds.items())


@dataclass(frozen=True)
class Room:
    """What a download of a part needed from the cache budget: ``needed`` bytes (the big part), ``budget``
    (MODEL_CACHE_MAX_BYTES; 0: no cap), ``pinned`` bytes no eviction could free meanwhile (see ``pinned``),
    ``slack`` the sidecars and records, which the budget counts but the parts' sizes do not."""

    needed: int
    budget: int
    pinned: int = 0
    slack: int = 0

    @property
    def never(self) -> bool:
        """The part is larger than the budget: it can never fit."""
        return self.budget > 0 and self.needed > self.budget

    @property
    def tight(self) -> bool:
        """The part may not have fit beside the parts no eviction could remove."""
        return self.budget > 0 and self.needed + self.pinned + self.slack > self.budget


def judge_no_room(a: Answer, room: Room) -> Verdict:
    """A 507 (contract section 8): only when no eviction can make room, naming the bytes needed and the
    bytes available."""
    if len(re.findall(r"\d+", a.detail or "")) < 2:
        return violation(f"507 without the bytes needed and available: {a.detail!r}")
    if room.never:
        return failed(f"507: the part's {room.needed} bytes exceed the budget of {room.budget}")
    if room.tight:
        return failed(
            f"507: {room.needed} bytes beside {room.pinned} held by other operations, budget {room.budget}"
        )
    return violation(
        f"507 for {room.needed} bytes with only {room.pinned} held by other operations of a budget of "
        f"{room.budget}: eviction could have made room ({a.detail})"
    )


@dataclass(frozen=True)
class CacheView:
    """What the soak knows of the cache when it reads GET /downloads: the budget, each model's big-part size
    by name, the bytes of uploads staging while it read (outside the budget), and ``slack`` (see Room)."""

    budget: int
    sizes: dict
    staging: int = 0
    slack: int = 0


def _count(value) -> bool:
    return type(value) is int and value >= 0


def status_problem(status, sizes: dict, folder: str) -> str | None:
    """What is wrong with a download status (contract section 4), or None. ``sizes``: big-part bytes by the
    names the soak published."""
    if not isinstance(status, dict) or set(status) != STATUS_KEYS:
        keys = sorted(status) if isinstance(status, dict) else type(status).__name__
        return f"a download status with {keys}, not {sorted(STATUS_KEYS)}"
    name, state = status["name"], status["state"]
    if status["folder"] != folder or name not in sizes:
        return f"a download of {status['folder']!r}/{name!r}, which the soak never asked for"
    if state not in STATES:
        return f"{name}: state {state!r}"
    done, total, resumed = status["bytesDone"], status["bytesTotal"], status["bytesResumed"]
    if not (_count(done) and _count(total) and _count(resumed)):
        return f"{name}: byte counts {done!r}, {total!r}, {resumed!r}"
    if total != sizes[name]:
        return f"{name}: bytesTotal {total}, not its big part's {sizes[name]} bytes"
    if not resumed <= done <= total:
        return f"{name}: bytesResumed {resumed}, bytesDone {done}, bytesTotal {total} out of order"
    if state == "cached" and done != total:
        return f"{name}: cached with {done} of {total} bytes"
    error = status["error"]
    if (state == "failed") != (isinstance(error, str) and error != ""):
        return f"{name}: state {state} with error {error!r}"
    return None


def judge_downloads(
    a: Answer, view: CacheView, folder: str, episodes: list[Episode], t0: float, t1: float
) -> Verdict:
    """GET /downloads: always 200 ``{"downloads": [<download status>...], "cache": {"bytesUsed", "bytesMax",
    "bytesFree"}}``; see the module's docstring for the cache's numbers."""
    if a.status != 200:
        if a.status is None:
            return _common("downloads", a, episodes, t0, t1)
        return violation(f"{a.status} from /downloads: {a.detail}")
    body = a.json
    if (
        not isinstance(body, dict)
        or set(body) != {"downloads", "cache"}
        or not isinstance(body["downloads"], list)
    ):
        return violation(f"/downloads answered {str(body)[:200]}")
    for status in body["downloads"]:
        problem = status_problem(status, view.sizes, folder)
        if problem:
            return violation(f"/downloads: {problem}")
    cache = body["cache"]
    if not isinstance(cache, dict) or set(cache) != CACHE_KEYS or not all(_count(v) for v in cache.values()):
        return violation(f"/downloads: cache {cache!r}")
    used, most, free = cache["bytesUsed"], cache["bytesMax"], cache["bytesFree"]
    if most != view.budget:
        return violation(f"/downloads: bytesMax {most}, not MODEL_CACHE_MAX_BYTES {view.budget}")
    if most:
        if free > max(0, most - used):
            return violation(f"/downloads: bytesFree {free} with {used} of {most} bytes used")
        if used > most + view.staging + view.slack:
            return violation(
                f"/downloads: bytesUsed {used} over bytesMax {most} (uploads staging {view.staging} bytes, "
                f"sidecars and records up to {view.slack})"
            )
    return OK


def judge_prefetch(
    model: Model,
    a: Answer,
    session: Session,
    episodes: list[Episode],
    t0: float,
    t1: float,
    room: Room,
    folder: str,
) -> Verdict:
    """POST /prefetch: 200 cached or 202 fetching/verifying, of this model's big part; a 507 only without
    room (``judge_no_room``); the other failures as a load's."""
    if a.status in (200, 202):
        problem = status_problem(a.json, {model.name: room.needed}, folder)
        if problem:
            return violation(f"{a.status}: {problem}")
        state = a.json["state"]
        if a.status == 200 and state != "cached":
            return violation(f"200 with state {state}, not cached")
        if a.status == 202 and state not in RUNNING_STATES:
            return violation(f"202 with state {state}, not fetching or verifying")
        if room.never:
            return violation(
                f"{a.status} for a part of {room.needed} bytes, larger than the budget of {room.budget}"
            )
        return OK
    if a.status == 507:
        return judge_no_room(a, room)
    verdict = _common("prefetch", a, episodes, t0, t1)
    if verdict is not None:
        return verdict
    return _otherwise("prefetch", a, model.unsettled(t0, t1), session, t0, t1)


def judge_download_end(
    model: Model, status: dict | str | None, episodes: list[Episode], t0: float, t1: float
) -> Verdict:
    """How a download the soak followed (from its prefetch at ``t0`` to ``t1``) ended: ``status`` its last
    download status, None when /downloads no longer listed it, or a string when it ran on past the soak's
    patience. Cached is due; failed only as a load may fail (a fault that reaches it, an upload that changed
    the model); gone only with the loader killed."""
    if isinstance(status, str):
        return violation(status)
    if status is None:
        if killed(episodes, t0, t1):
            return failed("the loader was killed during the download")
        return violation("the download vanished from /downloads before it ended")
    if status["state"] == "cached":
        return OK
    fault = excused("prefetch", episodes, t0, t1)
    if fault:
        return failed(f"the download failed under {fault}: {status['error']}")
    if model.unsettled(t0, t1):
        return failed(f"the download failed while an upload changed the model: {status['error']}")
    return violation(f"the download failed with no fault active: {status['error']}")


def judge_resumed(
    model: Model,
    status: dict | None,
    seen: int,
    seen_at: float,
    killed_at: float,
    login: float | None,
    episodes: list[Episode],
    t1: float,
    room: Room,
    evicted: bool = False,
) -> Verdict:
    """A prefetch the loader was killed in (at ``killed_at``) resumes after the next login (at ``login``;
    None: none by ``t1``), unasked: ``status`` is the first download of the model /downloads listed after
    the restart, as it ended (None: none was listed by ``t1``). It must end cached, and hold again at least
    the ``seen`` bytes the soak saw written at ``seen_at``, when that was ``RESUME_SETTLE`` s before the kill.

    Excuses: a fault that reaches a prefetch (the resumption asks the Resource API and the CDN), an upload
    that changed the model (its leftover belongs to the old manifest), the leftover evicted to make room for
    another download (``evicted``: the loader said so), or no room for it (``room``)."""
    if login is None:
        if excused("login", episodes, killed_at, t1):
            return failed("no login succeeded after the restart, under a fault")
        return violation(f"no login succeeded in the {t1 - killed_at:.0f} s after the restart")
    fault = excused("prefetch", episodes, killed_at, t1)
    unsettled = model.unsettled(killed_at, t1)
    due = seen if killed_at - seen_at >= RESUME_SETTLE else 0
    if status is not None and status["state"] == "cached":
        if status["bytesResumed"] >= due:
            return OK
        if evicted or unsettled:
            return failed(
                f"fetched afresh: the leftover {'was evicted' if evicted else 'is of another version'}"
            )
        return violation(
            f"resumed with {status['bytesResumed']} bytes held, though {due} were written "
            f"{RESUME_SETTLE:g} s before the kill"
        )
    why = "was not resumed after the login" if status is None else f"failed: {status['error']}"
    if fault:
        return failed(f"the interrupted prefetch {why}, under {fault}")
    if unsettled:
        return failed(f"the interrupted prefetch {why}, while an upload changed the model")
    if status is None and evicted:
        return failed("the interrupted prefetch's leftover was evicted to make room")
    if room.tight:
        return failed(f"the interrupted prefetch {why}: no room beside {room.pinned} bytes held")
    return violation(f"the interrupted prefetch {why}")


def judge_cache_disk(parts: int, budget: int) -> Verdict:
    """At rest (every operation finished): the parts on disk, committed and partial (the uploads' staging left
    out), are within the budget, byte for byte."""
    if budget and parts > budget:
        return violation(f"{parts} bytes of parts on disk at rest, over MODEL_CACHE_MAX_BYTES {budget}")
    return OK


def excused(route: str, episodes: list[Episode], t0: float, t1: float) -> str | None:
    """The kinds of the faults that reach ``route`` and were active between ``t0`` and ``t1``, or None."""
    kinds = sorted({e.kind for e in episodes if e.channel in REACH[route] and e.overlaps(t0, t1)})
    return " + ".join(kinds) or None


def killed(episodes: list[Episode], t0: float, t1: float) -> bool:
    return any(e.channel == "kill" and e.overlaps(t0, t1) for e in episodes)


def _common(route: str, a: Answer, episodes: list[Episode], t0: float, t1: float) -> Verdict | None:
    """The rules every route shares: a 500, no answer, an upstream failure."""
    if a.status is None:
        if killed(episodes, t0, t1):
            return failed(f"no answer ({a.error}) while the loader was killed")
        return violation(f"no answer ({a.error}) and the loader was not killed")
    if a.status >= 500 and a.status not in UPSTREAM_FAILURES:
        return violation(f"{a.status} {a.detail or ''}".strip())
    if a.status in UPSTREAM_FAILURES:
        fault = excused(route, episodes, t0, t1)
        if fault:
            return failed(f"{a.status} under {fault}")
        return None  # the caller may know another excuse
    return None


def judge_load(
    model: Model,
    a: Answer,
    session: Session,
    episodes: list[Episode],
    t0: float,
    t1: float,
    room: Room | None = None,
) -> Verdict:
    """``room``: what a download of the model needed of the cache budget (None: no budget, a 507 is a
    violation)."""
    if a.status == 200 and not a.cut_off and a.error is None:
        if a.digest in model.allowed(t0, t1):
            return OK
        return violation(f"200 with {a.got} bytes that are no committed version of {model.name}")
    settled = not model.unsettled(t0, t1)
    if a.status == 200:
        fault = excused("load", episodes, t0, t1)
        if fault:
            return failed(f"cut off after {a.got} of {a.length} bytes under {fault}")
        if not settled:
            return failed(f"cut off after {a.got} of {a.length} bytes while an upload changed the model")
        return violation(f"cut off after {a.got} of {a.length} bytes ({a.error}) with no fault active")
    if a.status == 507 and room is not None:
        return judge_no_room(a, room)
    verdict = _common("load", a, episodes, t0, t1)
    if verdict is not None:
        return verdict
    return _otherwise("load", a, not settled, session, t0, t1)


def _otherwise(kind: str, a: Answer, unsettled: bool, session, t0: float, t1: float) -> Verdict:
    """The last rules of a load's or a prefetch's answer, once the faults in play explained nothing: a 502
    while an upload changed the model, a 401 while a restarted loader had no session."""
    if a.status == 502 and unsettled:
        return failed(f"502 while an upload changed the model: {a.detail}")
    if a.status in UPSTREAM_FAILURES:
        return violation(f"unexplained {a.status}: {a.detail}")
    if a.status == 401 and session.maybe_none(t0, t1):
        return failed("401 while the restarted loader had no session")
    return violation(f"{a.status} is not an answer a {kind} may give here: {a.detail}")


def judge_upload(
    a: Answer, user: User | None, size: int, episodes: list[Episode], t0: float, t1: float
) -> Verdict:
    """``user``: the session's user for the whole upload (logins wait for uploads), None for no session."""
    expected = 200 if user is not None and user.can_upload else (401 if user is None else 403)
    if a.status == expected:
        if expected == 200 and a.json != {"status": "ok", "size": size}:
            return violation(f"200 with {a.json!r}, not the size {size}")
        return OK if expected == 200 else failed(f"{expected} as the session requires")
    verdict = _common("upload", a, episodes, t0, t1)
    if verdict is not None:
        return verdict
    if a.status == 401 and killed(episodes, t0, t1):
        return failed("401 from the restarted loader")
    if a.status in UPSTREAM_FAILURES:
        return violation(f"unexplained {a.status}: {a.detail}")
    return violation(f"{a.status} where {expected} was due: {a.detail}")


def judge_login(a: Answer, user: User, bad: bool, episodes: list[Episode], t0: float, t1: float) -> Verdict:
    if bad:
        if a.status == 401:
            return failed("401 for a wrong password, as due")
        if a.status == 200:
            return violation("200 for a wrong password")
    elif a.status == 200:
        got = (a.json or {}).get("user", {}) if isinstance(a.json, dict) else {}
        if got.get("email") != user.email:
            return violation(f"200 for {user.email} named another user: {got!r}")
        return OK
    verdict = _common("login", a, episodes, t0, t1)
    if verdict is not None:
        return verdict
    if a.status in UPSTREAM_FAILURES:
        return violation(f"unexplained {a.status}: {a.detail}")
    return violation(f"{a.status} for {'a wrong' if bad else 'the right'} password: {a.detail}")


def judge_simple(route: str, a: Answer, episodes: list[Episode], t0: float, t1: float) -> Verdict:
    """``/status`` and ``/metrics`` (and ``POST /unlock``'s 202): 200, or no answer while the loader was
    killed."""
    if a.status == 200:
        return OK
    if a.status is None:
        return _common(route, a, episodes, t0, t1)
    return violation(f"{a.status} from /{route}: {a.detail}")


def judge_health(a: Answer, episodes: list[Episode], t0: float, t1: float) -> Verdict:
    """``/health``: 200 ``{"status": "healthy"}``, whatever fault is active. A 503 says a pool's every
    worker is held past its deadline: no fault the soak throws lasts past the loader's deadlines (a Resource
    API call ends within API_DEADLINE, a CDN transfer that trickles is dropped after CDN_SPEED_TIME, a
    stalled client is let go after CLIENT_STALL_TIMEOUT), so it is a violation under any of them. No answer
    needs a kill, as for every route."""
    if a.status == 200:
        if a.json == {"status": "healthy"}:
            return OK
        return violation(f"/health 200 with {a.json!r}")
    if a.status == 503:
        reason = a.json.get("reason") if isinstance(a.json, dict) else a.json
        return violation(f"/health 503, the loader stuck past its deadlines: {reason}")
    if a.status is None:
        return _common("health", a, episodes, t0, t1)
    return violation(f"{a.status} from /health: {a.detail}")


def judge_let_go(
    head: float, gone: float | None, bound: float, episodes: list[Episode], t1: float
) -> Verdict:
    """Clients that read a load's head (the last at ``head``) and then nothing must be let go within
    ``bound`` seconds (CLIENT_STALL_TIMEOUT and a margin): ``gone`` is when ``/status`` first listed none of
    their loads (None: not until ``t1``, the end of the watch). No fault excuses a late let-go (a stalled
    client's load reads a cached part, and no fault reaches the cache); a loader killed meanwhile lets
    every client go, but may leave ``/status`` unanswered to the end of the watch."""
    if gone is not None and gone - head <= bound:
        return OK
    if killed(episodes, head, t1):
        return failed("the loader was killed while clients were stalled")
    if gone is None:
        return violation(f"stalled clients not let go {t1 - head:.1f} s after their head (bound {bound:g} s)")
    return violation(f"stalled clients let go {gone - head:.1f} s after their head, past {bound:g} s")


def judge_recovery(
    episode: Episode, route: str, recovered: float | None, bound: float, episodes: list[Episode]
) -> Verdict:
    """After ``episode`` healed, ``/health`` answers 200 and a probe of ``route`` succeeds within ``bound``
    seconds: ``recovered`` is the end of the first probe that did (None: none did). Only another fault that
    reaches ``route`` and was active in that time excuses a late recovery: the healed one itself does not,
    nor a fault that cannot reach the route."""
    end = episode.heal + bound
    if recovered is not None and recovered <= end:
        return OK
    others = sorted(
        {
            e.kind
            for e in episodes
            if e is not episode and e.channel in REACH[route] and e.overlaps(episode.heal, end)
        }
    )
    took = (
        "no probe succeeded"
        if recovered is None
        else f"the first probe succeeded {recovered - episode.heal:.1f} s after"
    )
    if others:
        return failed(f"{episode.kind} healed: {took}, under {' + '.join(others)}")
    return violation(f"{episode.kind} healed: {took} (bound {bound:g} s)")
