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
"""

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
}
UPSTREAM_FAILURES = (502, 504)
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
    model: Model, a: Answer, session: Session, episodes: list[Episode], t0: float, t1: float
) -> Verdict:
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
    verdict = _common("load", a, episodes, t0, t1)
    if verdict is not None:
        return verdict
    if a.status == 502 and not settled:
        return failed(f"502 while an upload changed the model: {a.detail}")
    if a.status in UPSTREAM_FAILURES:
        return violation(f"unexplained {a.status}: {a.detail}")
    if a.status == 401 and session.maybe_none(t0, t1):
        return failed("401 while the restarted loader had no session")
    return violation(f"{a.status} is not an answer a load may give here: {a.detail}")


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
