"""The soak: thousands of mixed operations against the real stack, faults thrown in at random between them,
and figures that show nothing was lost. bench/soak.py is its command line, tests/faults/test_soak.py a
short run in ``make test``.

    soak = Soak(SoakConfig(seed=7, ops=150, sizes=SMALL_SIZES), workdir, stack, cdn_proxy, engine)
    report = soak.run()            # sets up, runs, heals, checks every model, stops the loader
    print("\\n".join(report.lines()))

The stack: the loader as a process (devstack.processes.loader), the reference Resource API and SeaweedFS
(devstack.stack) with a FaultProxy in front of SeaweedFS (cdn.yaml names the proxy), and a private
dockerd that unlock loads its images into and that the soak stops and starts.

One thread draws everything from ``random.Random(seed)``: the operations (cold and warm loads, bursts of
loads of one model, uploads of new versions, logins as users of every role and with wrong passwords,
unlocks, prefetches followed through /downloads to their end and a load, reads of /downloads, /status,
/metrics), which model and user each concerns, the faults and their parameters, and how long each lasts; a
pool of ``concurrency`` workers runs the operations. A failing run replays with the
same seed: the same operations and faults in the same order (the interleaving of the workers differs).
A fault often brings the work it is meant to break: a cold load after a CDN fault, an upload after a
refused POST, an unlock just before dockerd stops, an upload and loads just before the loader is killed.
After each heal a probe of the route it broke measures how long recovery takes.

The cache budget: the loader runs with a MODEL_CACHE_MAX_BYTES that holds only part of the models' big parts
(``cache_fraction`` of them all, and at least the largest with room to spare), and MODEL_CACHE_MIN_FREE_BYTES
0 (the disk's free space is no part of the rules), so parts are evicted as others are fetched. One more model,
larger than the budget, is only ever prefetched: a 507 each time. A loader kill comes with a prefetch of a
model of several blocks, held by the fault proxy after its first block: the restarted loader must resume it
after its login, unasked, keeping the blocks it had.

Liveness: the loader runs with small deadlines (API_DEADLINE, CDN_SPEED_TIME, CLIENT_STALL_TIMEOUT), so
trickling upstreams and clients that stop reading are faults like the others. /health is asked every
second (a 503 is a violation: nothing the soak does may hold the loader's workers past their deadlines);
after a heal, and once stalled clients are let go, a recovery check on a thread of its own asks /health
and loads a model nothing else touches until it succeeds, within the loader's deadline and a margin.

Every answer is judged by devstack.soak.rules. Loader kills are drawn in the first half of the run only,
so its last incarnation lives through the whole second half: RSS and open descriptors, sampled at quiet
checkpoints (every operation finished), are compared between that incarnation's first and last quarter.
After the run every fault is healed, a model left refused by a failed upload is mended by one upload (the
contract's remedy), and every model must then load its last committed version, and an unlock be ready. At
every quiet checkpoint the parts on disk are within the budget.
"""

import contextlib
import json
import os
import random
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from devstack.images import publish_images
from devstack.processes.dockerd import import_image, remove_images
from devstack.processes.loader import LoaderProcess, proc_field
from devstack.soak.client import BLOCK, FOLDER, Client, KiB, MiB, big_size, content, digest_of
from devstack.soak.faults import FAULTS, FOLLOW_EVERY, Faults, Liveness
from devstack.soak.report import Report
from devstack.soak.rules import (
    OK,
    RUNNING_STATES,
    Busy,
    CacheView,
    Episode,
    Model,
    Room,
    Session,
    User,
    Verdict,
    Version,
    excused,
    judge_cache_disk,
    judge_download_end,
    judge_downloads,
    judge_health,
    judge_load,
    judge_login,
    judge_prefetch,
    judge_simple,
    judge_upload,
    killed,
    pinned,
    status_problem,
    violation,
)

TAG = "azaion/soak:1"
BENCH_SIZES = (KiB, 64 * KiB, MiB + 3, 5 * MiB, 24 * MiB, 96 * MiB, 256 * MiB)
SMALL_SIZES = (KiB, 70_000, MiB + 3, 4 * MiB + 17, 8 * MiB)
# Two models no operation uploads or deletes: the probe model the recovery checks load, and the one the
# stalled clients ask for (large enough to fill the socket buffers, so the loader's sends wait).
PROBE_SIZE = 256 * KiB + 7
STALL_SIZE = 8 * MiB + 1
# How often /health is asked, and how long it may take to answer (longer: no answer, a violation). Not
# more often: each request puts the idle loader's heap trim off by half a second.
HEALTH_EVERY = 1.0
HEALTH_TIMEOUT = 10.0
COLD = ("load_cold", "probe_cold", "prefetch_cold")  # delete the model's cached big part first
RUNNING = ("authenticating", "downloading_key", "decrypting", "loading_images")
# The loader's log line for a part it evicted (disk_budget), for the figures and the resume rule's excuse.
EVICTED = re.compile(r"evicted (\S+) from the model cache to make room: (\d+) bytes, (.*)$")

# Relative frequencies. A burst is 3-8 loads of one model at once (each counts as an operation). A prefetch
# is followed to its download's end and then loaded; a cold one deletes the cached part first.
OPERATIONS = {
    "load_warm": 31,
    "load_cold": 9,
    "load_burst": 4,
    "upload": 12,
    "login": 9,
    "unlock": 3,
    "prefetch": 4,
    "prefetch_cold": 4,
    "prefetch_oversize": 1,
    "downloads": 5,
    "status": 6,
    "metrics": 6,
}
ROLES = {
    "operator": "Operator",
    "validator": "Validator",
    "companion": "CompanionPC",
    "uploader": "ResourceUploader",
    "admin": "Admin",
    "apiadmin": "ApiAdmin",
}
# Who the login operations sign in as: mostly roles that may upload, so that uploads happen.
LOGIN_WEIGHTS = {"uploader": 5, "admin": 2, "apiadmin": 1, "operator": 2, "validator": 1, "companion": 1}


@dataclass
class SoakConfig:
    seed: int = 1
    ops: int | None = 2000  # operations to dispatch; None: run for ``minutes``
    minutes: float | None = None
    concurrency: int = 8
    sizes: tuple[int, ...] = BENCH_SIZES
    unlock_mib: int = 32  # the image inside the unlock archive
    fault_rate: float = 0.07  # chance of a fault after each operation dispatched
    checkpoint_every: int = 40  # operations between quiet samples of RSS and descriptors
    api_timeout: float = 5.0  # the loader's API_TIMEOUT
    # The loader's liveness settings, small so that a fault's effects end soon: API_DEADLINE (None: three
    # tries of API_TIMEOUT and 5 s, so api_slow still meets the retries), CDN_SPEED_LIMIT (bytes/s) and
    # CDN_SPEED_TIME, CLIENT_STALL_TIMEOUT; the liveness rules' bounds add ``liveness_margin`` seconds.
    api_deadline: float | None = None
    cdn_speed_limit: int = 64 * KiB
    cdn_speed_time: float = 2.0
    client_stall_timeout: float = 3.0
    liveness_margin: float = 5.0
    # MODEL_CACHE_MAX_BYTES: this share of all the soak's big parts, at least the largest and a quarter more
    # (every model fits alone). loader_env may set it (0: no cap; no oversize model then).
    cache_fraction: float = 0.5
    request_timeout: float = 180.0  # the client's read timeout: longer means a hang
    unlock_timeout: float = 240.0  # an unlock still running this long after the Engine is up is stuck
    loader_env: dict = field(default_factory=dict)  # more of the loader's environment


@dataclass
class Record:
    kind: str
    route: str
    start: float
    end: float
    status: int | None
    verdict: Verdict
    model: str | None = None
    final: bool = False  # one of the checks after the run


@dataclass
class Sample:
    t: float
    incarnation: int
    rss_kb: int
    fds: int


class RWLock:
    """Uploads share it, logins take it alone: an upload sees one session from its start to its answer."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Soak(Faults):
    def __init__(self, config: SoakConfig, workdir, stack, cdn_proxy, engine):
        self.cfg = config
        self.workdir = Path(workdir)
        self.stack, self.proxy, self.engine = stack, cdn_proxy, engine
        self.rng = random.Random(config.seed)  # noqa: S311 - a replayable stream of choices, no secret
        self.token = uuid.uuid4().hex[:6]  # names unique on a shared stack; not from the seed
        self.session = Session()
        self.session_lock = RWLock()
        self.lock = threading.Lock()
        self.records: list[Record] = []
        self.episodes: list[Episode] = []
        self.samples: list[Sample] = []
        self.checkpoints: list[Sample] = []
        self.harness_errors: list[BaseException] = []
        self.models: list[Model] = []
        self.users: dict[str, User] = {}
        self.incarnation = 0
        self.dispatched = 0
        self.engine_up_since: float | None = None
        self.loader: LoaderProcess | None = None
        self.loader_errors: list[str] = []  # the loader's log lines about a 500 or a traceback
        self.health: Counter = Counter()  # /health answers by status (None: no answer)
        self.let_go: list[float] = []  # seconds from a stalled client's head until the loader let it go
        self.busy: list[Busy] = []  # operations that keep a model's part from eviction (rules.pinned)
        self.budget = 0  # MODEL_CACHE_MAX_BYTES
        self.sizes: dict[str, int] = {}  # big-part bytes by model name
        self.slack = 0  # sidecars and records (rules.Room)
        self.oversize: Model | None = None
        self.prefetches: Counter = Counter()  # POST /prefetch answers by status (None: no answer)
        self.downloads_ended: Counter = Counter()  # the downloads the prefetches started, by how they ended
        self.resumes: list[tuple[int, int]] = []  # interrupted prefetches: (bytes due, bytes resumed)
        self.bytes_used_peak = 0  # the largest bytesUsed /downloads showed
        self.evictions: list[tuple[str, int, str]] = []  # the loader's log: (part, bytes, what) each
        self._last_look: tuple[str, str] | None = None  # the last verdict of a follow's /downloads
        self._inflight: set = set()
        self._watches: list[threading.Thread] = []
        self._stop_sampling = threading.Event()
        self._quiet = threading.Event()  # a checkpoint samples: /health is not asked
        self._t0 = time.monotonic()

    # --- set-up -----------------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self._t0

    def _setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stack.clear_faults()
        self.proxy.clear_faults()
        self.stack.write_cdn_yaml(host=self.proxy.url)
        for key, role in ROLES.items():
            user = User(f"soak-{key}-{self.token}@azaion.local", f"Soak-{key}-Pa55", role)
            self.stack.add_user(user.email, user.password, [role])
            self.users[key] = user
        for index, size in enumerate(self.cfg.sizes):
            self.models.append(self._publish(index, f"soak{index}-{self.token}.bin", size))
        self.probe_model = self._publish(-2, f"soak-probe-{self.token}.bin", PROBE_SIZE)
        self.stall_model = self._publish(-3, f"soak-stall-{self.token}.bin", STALL_SIZE)
        client = self.engine.client()
        try:
            remove_images(client, [TAG])
            blob = b"".join(content(self.cfg.seed, -1, 0, self.cfg.unlock_mib * MiB))
            import_image(client, TAG, {"/blob.bin": blob})
            self.archive = self.workdir / "images.enc"
            publish_images(self.engine.host, [TAG], self.archive, admin=self.stack.admin)
            remove_images(client, [TAG])
        finally:
            client.close()
        self.engine_up_since = 0.0
        env = {
            "RESOURCE_API_URL": self.stack.api_url,
            "API_TIMEOUT": self.cfg.api_timeout,
            "API_DEADLINE": self.cfg.api_deadline or self.cfg.api_timeout * 3 + 5,
            "CDN_SPEED_LIMIT": self.cfg.cdn_speed_limit,
            "CDN_SPEED_TIME": self.cfg.cdn_speed_time,
            "CLIENT_STALL_TIMEOUT": self.cfg.client_stall_timeout,
            "DOCKER_HOST": self.engine.host,
            "IMAGES_PATH": self.archive,
            "MODEL_CACHE_MAX_BYTES": self._budget(),
            "MODEL_CACHE_MIN_FREE_BYTES": 0,
            **self.cfg.loader_env,
        }
        self.budget = int(env["MODEL_CACHE_MAX_BYTES"])
        if self.budget:  # only ever prefetched: a 507 each time
            self.oversize = self._publish(-4, f"soak-oversize-{self.token}.bin", self.budget + MiB)
        known = [*self.models, self.probe_model, self.stall_model] + (
            [self.oversize] if self.oversize else []
        )
        self.sizes = {m.name: big_size(m.size) for m in known}
        # A sidecar holds ~200 bytes and 68 a block, a download's record ~400 and a few a block.
        self.slack = sum(KiB + 100 * -(-size // BLOCK) for size in self.sizes.values())
        self.liveness = Liveness(
            float(env["API_DEADLINE"]),
            float(env["CDN_SPEED_TIME"]),
            float(env["CLIENT_STALL_TIMEOUT"]),
            self.cfg.liveness_margin,
        )
        self.loader = LoaderProcess(self.workdir / "loader", **env)
        self.client = Client(self.loader.url, self.cfg.request_timeout)
        self.health_client = Client(self.loader.url, HEALTH_TIMEOUT)
        self._start_loader()
        with self.session_lock.alone():
            self._login(self.users["uploader"], bad=False, kind="login")
        for model in (self.probe_model, self.stall_model):  # cached before any fault
            a = self.client.load(model.name)
            if a.status != 200 or a.digest != model.latest().digest:
                raise RuntimeError(f"{model.name} did not load before the run: {a}")
        threading.Thread(target=self._sample_forever, daemon=True, name="soak-sampler").start()
        self._health_watch = threading.Thread(target=self._health_forever, daemon=True, name="soak-health")
        self._health_watch.start()

    def _budget(self) -> int:
        """MODEL_CACHE_MAX_BYTES: ``cache_fraction`` of every big part the soak loads, and at least the
        largest and a quarter of it more."""
        parts = [big_size(m.size) for m in (*self.models, self.probe_model, self.stall_model)]
        return max(int(self.cfg.cache_fraction * sum(parts)), max(parts) * 5 // 4)

    def _publish(self, index: int, name: str, size: int) -> Model:
        with tempfile.TemporaryFile(dir=self.workdir) as f:
            for chunk in content(self.cfg.seed, index, 0, size):
                f.write(chunk)
            f.seek(0)
            self.stack.publish(FOLDER, name, f)
        digest = digest_of(content(self.cfg.seed, index, 0, size))
        return Model(index, name, size, [Version(0, digest, size, 0.0, 0.0, True)])

    def _start_loader(self) -> None:
        self.loader.start()
        self.incarnation += 1

    def _cache_file(self, model: Model, suffix: str = "") -> Path:
        return Path(self.loader.env["MODEL_CACHE_DIR"]) / FOLDER / (model.name + ".big" + suffix)

    # --- operations -------------------------------------------------------------------------------

    def _record(self, kind, route, t0, t1, answer, verdict, model=None, final=False) -> Verdict:
        if final and verdict.outcome != "ok":
            verdict = violation(f"after the run, with every fault healed: {verdict.why}")
        with self.lock:
            self.records.append(
                Record(
                    kind,
                    route,
                    t0,
                    t1,
                    answer.status if answer else None,
                    verdict,
                    model.name if model else None,
                    final,
                )
            )
        return verdict

    def _episodes(self) -> list[Episode]:
        with self.lock:
            return list(self.episodes)

    @contextlib.contextmanager
    def _busy(self, model: Model, kind: str = "read"):
        """While the block runs, ``model``'s part is held from eviction (rules.pinned)."""
        busy = self._hold(model, kind)
        try:
            yield busy
        finally:
            busy.end = self.now()

    def _hold(self, model: Model, kind: str = "read") -> Busy:
        busy = Busy(model.name, self.sizes[model.name], kind, self.now())
        with self.lock:
            self.busy.append(busy)
        return busy

    def _room(self, model: Model, own: Busy | None, t0: float, t1: float) -> Room:
        with self.lock:
            held = pinned(self.busy, own, t0, t1)
        return Room(self.sizes[model.name], self.budget, held, self.slack)

    def _uncache(self, model: Model) -> None:
        for suffix in (".meta", ""):  # the sidecar first: the loader then reads "not cached"
            with contextlib.suppress(FileNotFoundError):
                self._cache_file(model, suffix).unlink()

    def _load(self, model: Model, kind: str, final: bool = False) -> Verdict:
        with self._busy(model) as busy:
            if kind in COLD:
                self._uncache(model)
            t0 = self.now()
            a = self.client.load(model.name)
            t1 = self.now()
        room = self._room(model, busy, t0, t1) if self.budget else None
        verdict = judge_load(model, a, self.session, self._episodes(), t0, t1, room)
        return self._record(kind, "load", t0, t1, a, verdict, model, final)

    # --- prefetches and /downloads ----------------------------------------------------------------

    def _prefetch(self, model: Model, kind: str, final: bool = False) -> Verdict:
        """POST /prefetch, judged; a download it started is followed through /downloads to its end; then the
        model is loaded (byte-identical, as every load). The oversize model holds nothing: no download of it
        may start."""
        holds = model is not self.oversize
        with self._busy(model) if holds else contextlib.nullcontext() as busy:
            if kind in COLD:
                self._uncache(model)
            t0, a, verdict = self._prefetch_call(model, kind, busy, final)
            following = a.status == 202 and verdict.outcome != "violation"
            if following:
                status = self._follow(model)
            t1 = self.now()
        if not following:
            if a.status == 200 and verdict.outcome == "ok" and holds:
                return self._load(model, "load_after_prefetch", final)
            return verdict
        verdict = judge_download_end(model, status, self._episodes(), t0, t1)
        ended = "ran on" if isinstance(status, str) else "gone" if status is None else status["state"]
        with self.lock:
            self.downloads_ended[ended] += 1
        self._record("prefetch_download", "download", t0, t1, None, verdict, model, final)
        if verdict.outcome != "ok":
            return verdict
        return self._load(model, "load_after_prefetch", final)

    def _prefetch_call(self, model: Model, kind: str, busy: Busy | None, final: bool = False):
        """(its start, its answer, its verdict) of one POST /prefetch, judged and recorded."""
        t0 = self.now()
        a = self.client.prefetch(model.name)
        t1 = self.now()
        room = self._room(model, busy, t0, t1)
        verdict = judge_prefetch(model, a, self.session, self._episodes(), t0, t1, room, FOLDER)
        with self.lock:
            self.prefetches[a.status] += 1
        self._record(kind, "prefetch", t0, t1, a, verdict, model, final)
        return t0, a, verdict

    def _follow(self, model: Model):
        """The last status of ``model``'s download once none of it runs (None: /downloads no longer lists
        one, as after a restart; a string: it ran on past ``request_timeout``)."""
        deadline = self.now() + self.cfg.request_timeout
        while True:
            listed = self._listed(model)
            if listed is not None:
                if not listed:
                    return None
                if not any(d["state"] in RUNNING_STATES for d in listed):
                    return listed[-1]
            if self.now() > deadline:
                return f"the download still ran {self.cfg.request_timeout:g} s after its prefetch"
            time.sleep(FOLLOW_EVERY)

    def _listed(self, model: Model) -> list[dict] | None:
        """The download statuses of ``model`` GET /downloads lists, oldest first (None: no answer, or
        statuses out of shape; a cache over its budget is judged, and the list still used)."""
        _, body = self._downloads(record=False)
        downloads = body.get("downloads") if isinstance(body, dict) else None
        if not isinstance(downloads, list) or any(status_problem(d, self.sizes, FOLDER) for d in downloads):
            return None
        return [d for d in downloads if d["name"] == model.name]

    def _downloads(self, record: bool = True, final: bool = False) -> tuple[Verdict, object]:
        """GET /downloads, judged; (verdict, its JSON). Recorded always, or (a follow's look) only when it is
        not ok and says another thing than the last such look recorded: a follow looks ten times a second."""
        t0 = self.now()
        a = self.client.downloads()
        t1 = self.now()
        with self.lock:
            staging = sum(b.size for b in self.busy if b.kind == "upload" and b.overlaps(t0, t1))
        view = CacheView(self.budget, self.sizes, staging, self.slack)
        verdict = judge_downloads(a, view, FOLDER, self._episodes(), t0, t1)
        cache = a.json.get("cache") if a.status == 200 and isinstance(a.json, dict) else None
        with self.lock:
            if isinstance(cache, dict) and type(cache.get("bytesUsed")) is int:
                self.bytes_used_peak = max(self.bytes_used_peak, cache["bytesUsed"])
            if not record:
                said, self._last_look = self._last_look, (verdict.outcome, verdict.why)
                record = verdict.outcome != "ok" and said != self._last_look
        if record:
            self._record("downloads", "downloads", t0, t1, a, verdict, final=final)
        return verdict, a.json

    def _disk(self, final: bool = False) -> Verdict:
        """At rest: the parts on disk (committed ``N.big`` and partial ``N.big.<hex>.part``, the staging
        folder left out) within the budget, recorded."""
        t0 = self.now()
        folder = Path(self.loader.env["MODEL_CACHE_DIR"]) / FOLDER
        parts = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder):
                if entry.name.endswith(".big") or re.fullmatch(r".+\.big\.[0-9a-f]{32}\.part", entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        parts += entry.stat(follow_symlinks=False).st_size
        verdict = judge_cache_disk(parts, self.budget)
        return self._record("cache_disk", "cache_disk", t0, self.now(), None, verdict, final=final)

    def _upload(self, model: Model, number: int, final: bool = False) -> None:
        digest = digest_of(content(self.cfg.seed, model.index, number, model.size))
        with self.session_lock.shared():
            user = self.session.user
            if user is None or not user.can_upload:
                self._refused_upload(user)
                return
            with model.upload_lock:
                version = Version(number, digest, model.size, self.now())
                with self.lock:
                    model.versions.append(version)
                with self._busy(model, "upload"):
                    a = self.client.upload(
                        model.name, content(self.cfg.seed, model.index, number, model.size)
                    )
                t1 = self.now()
                version.end = t1
                version.ok = a.status == 200 and a.json == {"status": "ok", "size": model.size}
                verdict = judge_upload(a, user, model.size, self._episodes(), version.start, t1)
                self._record("upload", "upload", version.start, t1, a, verdict, model, final)
                if version.ok:  # every upload answered 200 loads afterwards
                    self._load(model, "load_after_upload", final)

    def _refused_upload(self, user: User | None) -> None:
        """An upload the session may not make (no session, or a role that may not upload): a small body,
        to a name no load asks for."""
        t0 = self.now()
        a = self.client.upload(f"refused-{self.token}.bin", [b"x" * KiB])
        t1 = self.now()
        verdict = judge_upload(a, user, KiB, self._episodes(), t0, t1)
        self._record("upload_refused", "upload", t0, t1, a, verdict)

    def _login(self, user: User, bad: bool, kind: str, final: bool = False) -> Verdict:
        """Call with the session lock held alone."""
        t0 = self.now()
        password = user.password + "-wrong" if bad else user.password
        a = self.client.call("POST", "/login", json={"email": user.email, "password": password})
        t1 = self.now()
        verdict = judge_login(a, user, bad, self._episodes(), t0, t1)
        if a.status == 200 and not bad:
            self.session.log_in(user, t1)
        return self._record(kind + ("_bad" if bad else ""), "login", t0, t1, a, verdict, final=final)

    def _unlock(self, final: bool = False) -> Verdict:
        user = self.users["companion"]
        t0 = self.now()
        a = self.client.call("POST", "/unlock", json={"email": user.email, "password": user.password})
        if a.status != 202:
            t1 = self.now()
            if a.status is None:
                verdict = judge_simple("unlock", a, self._episodes(), t0, t1)
            else:
                verdict = violation(f"POST /unlock answered {a.status}: {a.detail}")
            return self._record("unlock", "unlock", t0, t1, a, verdict, final=final)
        status = self._wait_unlock(t0)
        t1 = self.now()
        verdict = self._judge_unlock(status, t0, t1)
        return self._record("unlock", "unlock", t0, t1, a, verdict, final=final)

    def _wait_unlock(self, t0: float) -> dict | str:
        """The unlock's end state, or "stuck" when it ran on ``unlock_timeout`` s with the Engine up."""
        silent_since = None
        while True:
            a = self.client.call("GET", "/unlock/status")
            state = a.json.get("state") if a.status == 200 and isinstance(a.json, dict) else None
            if state is not None and state not in RUNNING:
                return a.json
            silent_since = None if state is not None else silent_since or self.now()
            if silent_since is not None and self.now() - silent_since > 60:
                return {"state": "no answer", "error": "/unlock/status did not answer for 60 s"}
            up = self.engine_up_since
            if state is not None and up is not None and self.now() - max(t0, up) > self.cfg.unlock_timeout:
                return "stuck in " + state
            time.sleep(0.25)

    def _judge_unlock(self, status, t0: float, t1: float) -> Verdict:
        if isinstance(status, str):
            return violation(
                f"the unlock stayed {status} with the Engine back for {self.cfg.unlock_timeout} s"
            )
        episodes = self._episodes()
        if status["state"] == "ready":
            return OK if TAG in status["images"] else violation(f"ready without {TAG}: {status['images']}")
        if status["state"] == "idle" and killed(episodes, t0, t1):
            return Verdict("failed", "the loader was killed during the unlock")
        fault = excused("unlock", episodes, t0, t1)
        if status["state"] == "error" and fault:
            return Verdict("failed", f"error under {fault}: {status['error']}")
        return violation(f"unexplained unlock {status['state']}: {status.get('error')}")

    def _simple(self, route: str) -> Verdict:
        t0 = self.now()
        a = self.client.call("GET", "/" + route)
        t1 = self.now()
        verdict = judge_simple(route, a, self._episodes(), t0, t1)
        if route == "status" and a.status == 200 and isinstance(a.json, dict):
            if not a.json.get("authenticated") and not self.session.maybe_none(t0, t1):
                verdict = violation("/status says not authenticated, with a session all along")
        if route == "metrics" and a.status == 200 and "loader_requests_total" not in str(a.json):
            verdict = violation("/metrics without loader_requests_total")
        return self._record(route, route, t0, t1, a, verdict)

    def _health(self) -> Verdict:
        """GET /health, judged; recorded only when it is not ok (it is asked every second)."""
        t0 = self.now()
        a = self.health_client.call("GET", "/health")
        t1 = self.now()
        verdict = judge_health(a, self._episodes(), t0, t1)
        with self.lock:
            self.health[a.status] += 1
        if verdict.outcome != "ok":
            self._record("health", "health", t0, t1, a, verdict)
        return verdict

    def _operations(self, what: str) -> int | None:
        """How many operations on ``what`` /status lists (None: no list), the answer judged; recorded only
        when it is not ok."""
        t0 = self.now()
        a = self.client.call("GET", "/status")
        t1 = self.now()
        verdict = judge_simple("status", a, self._episodes(), t0, t1)
        if verdict.outcome != "ok":
            self._record("status", "status", t0, t1, a, verdict)
        if a.status != 200 or not isinstance(a.json, dict) or not isinstance(a.json.get("operations"), list):
            return None
        return sum(1 for op in a.json["operations"] if isinstance(op, dict) and op.get("what") == what)

    def _health_forever(self) -> None:
        while not self._stop_sampling.wait(HEALTH_EVERY):
            if not self._quiet.is_set():
                self._health()

    # --- dispatch ---------------------------------------------------------------------------------

    def _guarded(self, fn, *args) -> None:
        """``fn(*args)`` on a worker or watch thread; its exception (a bug of the soak itself) is kept for the
        report."""
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - a bug of the soak itself: reported, then raised
            with self.lock:
                self.harness_errors.append(exc)

    def _submit(self, fn, *args) -> None:
        while True:
            with self.lock:
                self._inflight = {f for f in self._inflight if not f.done()}
                if len(self._inflight) < self.cfg.concurrency:
                    break
            wait(list(self._inflight), return_when=FIRST_COMPLETED)
        future = self.pool.submit(self._guarded, fn, *args)
        with self.lock:
            self._inflight.add(future)
        self.dispatched += 1

    def _drain(self) -> None:
        """Wait for every operation, and every watch, to end."""
        with self.lock:
            pending = list(self._inflight)
        wait(pending)
        while True:
            with self.lock:
                watches, self._watches = self._watches, []
            if not watches:
                return
            for thread in watches:
                thread.join()

    def _watch(self, fn, *args) -> None:
        """Run ``fn(*args)`` on a thread of its own, beside the operations and never holding one of their
        workers: the recovery checks and the stalled clients, which must start when their fault says."""
        thread = threading.Thread(target=self._guarded, args=(fn, *args), daemon=True, name="soak-watch")
        with self.lock:
            self._watches.append(thread)
        thread.start()

    def _pick_model(self, other_than: Model | None = None) -> Model:
        weights = [max(1.0, 4.0 - i * 0.5) * (m is not other_than) for i, m in enumerate(self.models)]
        return self.rng.choices(self.models, weights)[0]

    def _dispatch(self, kind: str, model: Model | None = None) -> None:
        model = model or self._pick_model()
        if kind in ("load_warm", "load_cold"):
            self._submit(self._load, model, kind)
        elif kind == "load_burst":
            for _ in range(self.rng.randint(3, 8)):
                self._submit(self._load, model, "load_burst")
        elif kind == "upload":
            number, model.next_version = model.next_version, model.next_version + 1
            self._submit(self._upload, model, number)
        elif kind == "login":
            user = self.users[self.rng.choices(list(LOGIN_WEIGHTS), list(LOGIN_WEIGHTS.values()))[0]]
            bad = self.rng.random() < 0.15
            self._submit(self._login_alone, user, bad)
        elif kind == "unlock":
            self._submit(self._unlock)
        elif kind in ("prefetch", "prefetch_cold"):
            self._submit(self._prefetch, model, kind)
        elif kind == "prefetch_oversize":
            if self.oversize is not None:
                self._submit(self._prefetch, self.oversize, kind)
        elif kind == "downloads":
            self._submit(self._downloads)
        else:
            self._submit(self._simple, kind)

    def _login_alone(self, user: User, bad: bool) -> None:
        with self.session_lock.alone():
            self._login(user, bad, "login")

    def _first_half(self) -> bool:
        if self.cfg.ops is not None:
            return self.dispatched < self.cfg.ops / 2
        return self.now() < self.cfg.minutes * 30

    def _done(self) -> bool:
        if self.cfg.ops is not None:
            return self.dispatched >= self.cfg.ops
        return self.now() >= self.cfg.minutes * 60

    def _loop(self) -> None:
        since_checkpoint = 0
        while not self._done():
            self._heal_due()
            if self.rng.random() < self.cfg.fault_rate:
                self._fault(self.rng.choices(list(FAULTS), list(FAULTS.values()))[0])
            before = self.dispatched
            self._dispatch(self.rng.choices(list(OPERATIONS), list(OPERATIONS.values()))[0])
            since_checkpoint += self.dispatched - before
            if since_checkpoint >= self.cfg.checkpoint_every:
                self._checkpoint()
                since_checkpoint = 0
            with self.lock:
                errors = list(self.harness_errors)
            if errors:
                raise errors[0]
            if self.loader.proc.poll() is not None:
                raise RuntimeError(f"the loader exited on its own:\n{self.loader.log()[-3000:]}")

    # --- the loader's memory and descriptors ------------------------------------------------------

    def _sample(self) -> Sample | None:
        proc = self.loader.proc if self.loader else None
        if proc is None or proc.poll() is not None:
            return None
        try:
            return Sample(
                self.now(),
                self.incarnation,
                proc_field(proc.pid, "VmRSS"),
                len(os.listdir(f"/proc/{proc.pid}/fd")),
            )
        except (OSError, KeyError):
            return None

    def _sample_forever(self) -> None:
        while not self._stop_sampling.wait(0.5):
            sample = self._sample()
            if sample is not None:
                with self.lock:
                    self.samples.append(sample)

    def _checkpoint(self) -> None:
        """One sample of the loader at rest: every operation finished, a second for the last downloads to
        commit and for the idle loader to trim its heap, then RSS and descriptors steady."""
        self._drain()
        self._quiet.set()
        try:
            time.sleep(1.0)
            last = sample = None
            for _ in range(20):
                sample = self._sample()
                steady = last is not None and sample is not None and sample.fds == last.fds
                if steady and abs(sample.rss_kb - last.rss_kb) < 1024:
                    break
                last = sample
                time.sleep(0.3)
        finally:
            self._quiet.clear()
        if sample is not None:
            self.checkpoints.append(sample)
        if self.budget:
            self._disk()

    # --- the run ----------------------------------------------------------------------------------

    def run(self) -> Report:
        started = time.monotonic()
        self._setup()
        try:
            with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="soak") as self.pool:
                try:
                    self._loop()
                finally:
                    self._drain()
                self._final()
            self._write_log(self.workdir / "soak.jsonl")
            if self.harness_errors:
                raise self.harness_errors[0]
        finally:
            self._stop_sampling.set()
            if getattr(self, "_health_watch", None) is not None:
                self._health_watch.join()  # no /health in flight as the loader stops
            self.stack.clear_faults()
            self.proxy.clear_faults()
            if not self.engine.running:
                self.engine.start()
            if self.loader is not None:
                self.loader.stop()
                log = self.loader.log().splitlines()
                self.loader_errors = [line for line in log if "unhandled" in line or "Traceback" in line]
                self.evictions = [
                    (m.group(1), int(m.group(2)), m.group(3))
                    for m in map(EVICTED.search, log)
                    if m is not None
                ]
        return Report(self, time.monotonic() - started, list(FAULTS))

    def _write_log(self, path: Path) -> None:
        """Every operation and fault with its times, one JSON object a line, for a look after the run."""
        with open(path, "w") as f:
            for e in self.episodes:
                f.write(
                    json.dumps({"fault": e.kind, **{k: getattr(e, k) for k in ("start", "heal", "detail")}})
                )
                f.write("\n")
            for c in self.checkpoints:
                f.write(
                    json.dumps(
                        {"checkpoint": c.t, "incarnation": c.incarnation, "rss_kb": c.rss_kb, "fds": c.fds}
                    )
                )
                f.write("\n")
            for r in self.records:
                row = {"op": r.kind, "start": r.start, "end": r.end, "status": r.status, "model": r.model}
                f.write(
                    json.dumps({**row, "outcome": r.verdict.outcome, "why": r.verdict.why, "final": r.final})
                )
                f.write("\n")

    def _final(self) -> None:
        """Heal every fault; mend the models a failed upload left refused; every model must then load its
        last committed version, /downloads answer as due, and an unlock be ready."""
        with self.lock:  # stalled clients are let go by the loader: _drain waits for their watch
            open_episodes = [e for e in self.episodes if e.heal is None and e.channel != "client"]
        for episode in open_episodes:
            self._heal(episode)
        self._drain()
        self._checkpoint()
        time.sleep(2.5)  # past every heal's grace: from here on nothing excuses a failure
        with self.session_lock.alone():
            self._login(self.users["uploader"], bad=False, kind="login", final=True)
        for model in self.models:
            if not model.latest().ok:
                number, model.next_version = model.next_version, model.next_version + 1
                self._upload(model, number, final=True)
        for model in self.models:
            self._load(model, "load_warm", final=True)
            self._load(model, "load_cold", final=True)
        self._downloads(final=True)
        self._unlock(final=True)
