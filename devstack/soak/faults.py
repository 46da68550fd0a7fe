"""The soak's faults (devstack.soak): how each is thrown in, what work it brings along, how it is healed.

One fault per channel at a time: the CDN (the fault proxy in front of SeaweedFS), the Resource API (its
/_devstack/ faults), dockerd; a loader kill and an altered cache file are instant. A fault lasts a number
of operations drawn with it, so a seed replays the same faults at the same points of the run.

    kind                       what happens                                              healed by
    cdn_cut                    GETs of the soak's objects cut after 0 B..5 MiB (FIN/RST)   clearing the proxy
    cdn_503_burst              the next 2-8 CDN requests answered 503                      clearing the proxy
    cdn_truncate               GETs send the full Content-Length but half the body         clearing the proxy
    cdn_trickle                GETs trickle at 1-4 KiB/s (below CDN_SPEED_LIMIT)           clearing the proxy
    api_slow                   1-3 calls (resources or login) answered API_TIMEOUT+1 s late clearing the API
    api_failing                calls answered 500/502/503                                  clearing the API
    api_garbage                calls answered 200 with garbage (HTML, not a JWT...)        clearing the API
    api_trickle                calls' answers trickle at 4-16 B/s (past API_DEADLINE)      clearing the API
    upload_small_refused       every upload POST of a small part answered 500              clearing the API
    upload_manifest_refused    one POST goes through, then 500: the manifest is refused    clearing the API
    cache_altered              a bit of a cached big part flipped on disk                  the loader itself
    loader_kill                SIGKILL during an upload and loads, and a prefetch held     restart, login
                               after its first block (it must resume after the login)
    dockerd_stop               dockerd stopped (SIGTERM) during an unlock                  starting it again
    client_stall               1-4 /load clients read the head, then nothing               the loader itself

After a heal of the CDN, the API or a kill, and once stalled clients are let go, a recovery check runs on a
thread of its own: /health, then a load of a model nothing else touches (the probe model; the stall model
after a stall), again until one succeeds, within the loader's deadline for what the fault held and a margin
(``Liveness.bound``; judged by rules.judge_recovery).
"""

import os
import time
from dataclasses import dataclass

from devstack.api.faults import GARBAGE
from devstack.soak.client import BLOCK, FOLDER, KiB, MiB
from devstack.soak.rules import (
    RESUME_SETTLE,
    RUNNING_STATES,
    Busy,
    Episode,
    judge_let_go,
    judge_load,
    judge_recovery,
    judge_resumed,
)

FAULTS = {  # relative frequencies
    "cdn_cut": 3,
    "cdn_503_burst": 3,
    "cdn_truncate": 2,
    "cdn_trickle": 2,
    "api_slow": 1.5,
    "api_failing": 2,
    "api_garbage": 2,
    "api_trickle": 1.5,
    "upload_small_refused": 1.5,
    "upload_manifest_refused": 1.5,
    "cache_altered": 2,
    "loader_kill": 2,
    "dockerd_stop": 1,
    "client_stall": 2,
}
CHANNEL = {
    "cdn_cut": "cdn",
    "cdn_503_burst": "cdn",
    "cdn_truncate": "cdn",
    "cdn_trickle": "cdn",
    "api_slow": "api",
    "api_failing": "api",
    "api_garbage": "api",
    "api_trickle": "api",
    "upload_small_refused": "api",
    "upload_manifest_refused": "api",
    "cache_altered": "disk",
    "loader_kill": "kill",
    "dockerd_stop": "docker",
    "client_stall": "client",
}
# What runs right after a heal, to measure the recovery.
PROBE = {"cdn": "load_cold", "api": "load_warm", "docker": "unlock"}
# The recovery check after a heal: a load of the probe model, cold after a CDN fault (see Faults._recover).
RECOVERY = {"cdn": "probe_cold", "api": "probe_warm", "kill": "probe_warm"}
# The loader's constants.CDN_RESUMES: a CDN transfer that trickles is dropped and resumed that many times.
CDN_RESUMES = 3
# An interrupted prefetch (see Faults._interrupt_prefetch): the fault proxy holds its GETs at the end of the
# first block this long (the kill comes within seconds); the soak waits this long for its first bytes.
HOLD_SECONDS = 30.0
HOLD_WAIT = 5.0
# How often a download is looked at (GET /downloads) while the soak follows it.
FOLLOW_EVERY = 0.1


@dataclass
class Interrupted:
    """A prefetch a loader kill interrupts: its model (held from eviction until the resumption ends), the
    bytes its download had written when the soak last looked before the kill, and when."""

    model: object  # rules.Model
    busy: Busy
    seen: int = 0
    seen_at: float = 0.0
    killed_at: float = 0.0
    log_lines: int = 0  # the loader's log lines before the kill

    @property
    def due(self) -> int:
        """The bytes the resumed download must hold again (see rules.judge_resumed)."""
        return self.seen if self.killed_at - self.seen_at >= RESUME_SETTLE else 0


@dataclass(frozen=True)
class Liveness:
    """The loader's liveness settings in this soak (its environment's values) and the margin the bounds
    add: what the soak's rules allow the loader to take before it is itself again."""

    api_deadline: float  # API_DEADLINE
    cdn_speed_time: float  # CDN_SPEED_TIME
    client_stall_timeout: float  # CLIENT_STALL_TIMEOUT
    margin: float

    def bound(self, channel: str) -> float:
        """Seconds after a heal of ``channel`` (for "client": after a stalled client's head) within which
        the loader must be itself again: whatever the fault held ends by the loader's deadline for it (a
        Resource API call; a CDN transfer's drops and resumes; a stalled client), then the margin."""
        held = {
            "api": self.api_deadline,
            "kill": self.api_deadline,  # the restarted loader's first calls
            "cdn": (CDN_RESUMES + 1) * self.cdn_speed_time,
            "client": self.client_stall_timeout,
        }
        return held[channel] + self.margin


class Faults:
    """Mixed into devstack.soak.engine.Soak, whose state (the stack, proxy, engine, loader, rng) it uses."""

    def _active(self, channel: str) -> Episode | None:
        with self.lock:
            return next((e for e in self.episodes if e.channel == channel and e.heal is None), None)

    def _begin(self, kind: str, detail: str, ops_left: int = 0) -> Episode:
        episode = Episode(kind, CHANNEL[kind], self.now(), detail, ops_left=ops_left)
        with self.lock:
            self.episodes.append(episode)
        return episode

    def _fault(self, kind: str) -> None:
        channel = CHANNEL[kind]
        if kind == "client_stall":
            # Drawn whether or not the last stall has ended: its end is the loader's doing, not the seed's.
            n = self.rng.randint(1, 4)
            if self._active(channel) is None:
                episode = self._begin(kind, f"{n} /load clients of {self.stall_model.name}")
                self._watch(self._stall_clients, episode, n)
            return
        if self._active(channel) is not None or (kind == "loader_kill" and not self._first_half()):
            return
        rng = self.rng
        lasts = rng.randint(2, 12)
        cdn_path = f"/{FOLDER}/*"
        if kind == "cdn_cut":
            after, n, reset = (
                rng.choice([0, 1000, 64 * KiB, MiB, 5 * MiB]),
                rng.choice([1, 2, 4, None]),
                rng.random() < 0.5,
            )
            self._begin(kind, f"after {after} bytes, {n or 'every'} GET, {'RST' if reset else 'FIN'}", lasts)
            self.proxy.cut_next(after, n, method="GET", path=cdn_path, reset=reset)
            self._dispatch("load_cold")
        elif kind == "cdn_503_burst":
            n = rng.randint(2, 8)
            self._begin(kind, f"{n} requests", lasts)
            self.proxy.fail_next(503, n, path=cdn_path)
            self._dispatch("load_cold")
        elif kind == "cdn_truncate":
            n = rng.choice([1, 2, None])
            self._begin(kind, f"{n or 'every'} GET", lasts)
            self.proxy.truncate_next(n, method="GET", path=cdn_path)
            self._dispatch("load_cold")
        elif kind == "cdn_trickle":
            # Far below CDN_SPEED_LIMIT: each trickling transfer is dropped after CDN_SPEED_TIME and resumed;
            # with every GET trickling, the download fails once its resumes are spent.
            rate, after, n = (
                rng.choice([1, 2, 4]) * KiB,
                rng.choice([0, 64 * KiB, MiB]),
                rng.choice([1, 2, 4, None]),
            )
            self._begin(kind, f"{rate // KiB} KiB/s after {after} bytes, {n or 'every'} GET", lasts)
            self.proxy.trickle_next(rate, after, n, method="GET", path=cdn_path)
            self._dispatch("load_cold")
        elif kind in ("api_slow", "api_failing", "api_garbage", "api_trickle"):
            route = rng.choice(["POST /resources/get*", "POST /login"])
            if kind == "api_slow":
                # A few calls only: every call slow holds every worker for the loader's three tries.
                count, fault = rng.choice([1, 2, 3]), {"delay": self.cfg.api_timeout + 1}
            elif kind == "api_failing":
                count, fault = rng.choice([1, 2, 3, None]), {"status": rng.choice([500, 502, 503])}
            elif kind == "api_trickle":
                # The head at once, then the body at a few bytes a second: no read waits API_TIMEOUT, yet a
                # JWT, a small part or a manifest (hundreds of bytes and more) takes longer than API_DEADLINE.
                count, fault = rng.choice([1, 2, 3, None]), {"trickle": rng.choice([4, 8, 16])}
            else:
                count, fault = (
                    rng.choice([1, 2, 3, None]),
                    {"status": 200, "garbage": rng.choice(sorted(GARBAGE))},
                )
            self._begin(kind, f"{route} {fault} x{count or 'all'}", lasts)
            if kind == "api_trickle":
                self.stack.set_trickle(route, fault["trickle"], count=count)
            else:
                self.stack.set_fault(route, count=count, **fault)
            if route == "POST /login":
                self._dispatch("login")
            else:
                self._dispatch("load_warm")
        elif kind in ("upload_small_refused", "upload_manifest_refused"):
            route = f"POST /resources/{FOLDER}"
            self._begin(kind, route, lasts)
            if kind == "upload_manifest_refused":
                self.stack.set_fault(route, count=1)  # no status: the small part goes through
            self.stack.set_fault(route, status=500, count=None)
            self._dispatch("upload")
        elif kind == "cache_altered":
            self._alter_cache()
        elif kind == "loader_kill":
            self._kill_loader()
        elif kind == "dockerd_stop":
            self._stop_engine(lasts)

    def _alter_cache(self) -> None:
        model, where = self.rng.choice(self.models), self.rng.random()
        path = self._cache_file(model)
        if not self._cache_file(model, ".meta").exists():
            return  # not cached now: no fault this time
        try:
            with open(path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if not size:
                    return
                f.seek(int(where * size))
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0x01]))
        except FileNotFoundError:
            return  # replaced or discarded meanwhile: nothing altered
        episode = self._begin("cache_altered", f"{model.name} at {where:.0%}")
        episode.heal = episode.start
        self._dispatch("load_warm", model)

    def _kill_loader(self) -> None:
        """Kill the loader in the middle of work: an upload replacing a model that loads are reading, and a
        prefetch of another model held after its first block, which the restarted loader must resume after
        its login."""
        interrupted = self._interrupt_prefetch()
        model = self._pick_model(other_than=interrupted.model if interrupted else None)
        self._dispatch("upload", model)
        self._dispatch("load_warm", model)
        self._dispatch("load_cold", model)
        time.sleep(self.rng.uniform(0.1, 1.5))
        if interrupted is not None:
            interrupted = self._still_interrupted(interrupted)
        episode = self._begin("loader_kill", f"during an upload of {model.name}")
        user = self.session.user or self.users["uploader"]
        self.loader.kill()
        killed_at = self.now()
        self.session.lose(killed_at)
        if interrupted is not None:
            self.proxy.clear_faults()  # the hold: no CDN fault was active (see _interrupt_prefetch)
            interrupted.killed_at = killed_at
            interrupted.log_lines = len(self.loader.log().splitlines())
        time.sleep(self.rng.uniform(0.0, 1.0))
        self._start_loader()
        with self.session_lock.alone():
            self._login(user, bad=False, kind="login_after_restart")
        episode.heal = self.now()
        if interrupted is not None:
            self._watch(self._resumed, episode, interrupted)
        self._dispatch("load_warm")
        self._watch(self._recover, episode, RECOVERY["kill"], self.probe_model)

    def _interrupt_prefetch(self) -> Interrupted | None:
        """A cold prefetch of the largest model of several blocks, whose CDN GETs the fault proxy holds at the
        end of its first block; once /downloads lists bytes of it, ``RESUME_SETTLE`` s for them to be named in
        its record. None when a CDN fault is active (its own faults come first, and a heal would clear the
        hold), no model has several blocks, or the prefetch started no download."""
        candidates = [m for m in self.models if self.sizes[m.name] > BLOCK]
        if not candidates or self._active("cdn") is not None:
            return None
        model = max(candidates, key=lambda m: m.size)
        busy = self._hold(model)
        self._uncache(model)
        self.proxy.hold_at(BLOCK, HOLD_SECONDS, path=f"/{FOLDER}/{model.name}.big")
        _, a, verdict = self._prefetch_call(model, "prefetch_interrupted", busy)
        if a.status != 202 or verdict.outcome == "violation":
            self.proxy.clear_faults()
            busy.end = self.now()
            return None
        interrupted = Interrupted(model, busy)
        deadline = self.now() + HOLD_WAIT
        while self.now() < deadline:
            running = [d for d in self._listed(model) or [] if d["state"] in RUNNING_STATES]
            if running and running[-1]["bytesDone"] > 0:
                interrupted.seen, interrupted.seen_at = running[-1]["bytesDone"], self.now()
                break
            time.sleep(0.05)
        time.sleep(RESUME_SETTLE)
        return interrupted

    def _still_interrupted(self, interrupted: Interrupted) -> Interrupted | None:
        """Right before the kill: None when the held download committed after all (nothing to resume)."""
        listed = self._listed(interrupted.model)
        if listed and listed[-1]["state"] == "cached":
            self.proxy.clear_faults()
            interrupted.busy.end = self.now()
            return None
        return interrupted

    def _leftover_news(self, interrupted: Interrupted) -> tuple[bool, bool]:
        """What the loader's log says since the kill of the interrupted download's leftover: (evicted to make
        room for another download, given up: discarded as of another manifest, or its resumption failed)."""
        name = f"{FOLDER}/{interrupted.model.name}"
        lines = self.loader.log().splitlines()[interrupted.log_lines :]
        evicted = any(f"evicted {name}.big " in line and "unfinished download" in line for line in lines)
        gone = any(
            f"could not resume the prefetch of {name}" in line
            or f"discarding the leftover download {interrupted.model.name}.big." in line
            for line in lines
        )
        return evicted, gone

    def _resumed(self, episode: Episode, interrupted: Interrupted) -> None:
        """After the restart (on a watch thread): the first download of the interrupted model /downloads
        lists, followed to its end, judged (rules.judge_resumed); once cached, a load of the model."""
        model = interrupted.model
        login = self.session.login_after(interrupted.killed_at)
        status = None
        incarnation = self.incarnation
        try:
            if login is not None:
                listed_by = self.now() + self.liveness.bound("kill")
                deadline = self.now() + self.cfg.request_timeout
                looked = 0.0
                while self.now() < deadline and self.incarnation == incarnation:
                    listed = self._listed(model)
                    if listed and listed[0]["state"] not in RUNNING_STATES:
                        status = listed[0]
                        break
                    if listed == [] and self.now() > listed_by:
                        break
                    if listed == [] and self.now() - looked > 1.0:  # no wait for what will not come
                        looked = self.now()
                        if any(self._leftover_news(interrupted)):
                            break
                    time.sleep(FOLLOW_EVERY)
            t1 = self.now()
        finally:
            interrupted.busy.end = self.now()
        others = [e for e in self._episodes() if e is not episode]  # the kill itself excuses nothing
        room = self._room(model, interrupted.busy, login or interrupted.killed_at, t1)
        evicted, _ = self._leftover_news(interrupted)
        verdict = judge_resumed(
            model,
            status,
            interrupted.seen,
            interrupted.seen_at,
            interrupted.killed_at,
            login,
            others,
            t1,
            room,
            evicted,
        )
        if status is not None:
            with self.lock:
                self.resumes.append((interrupted.due, status["bytesResumed"]))
        self._record("prefetch_resumed", "download", interrupted.killed_at, t1, None, verdict, model)
        if status is not None and status["state"] == "cached":
            self._load(model, "load_after_resume")

    def _stop_engine(self, lasts: int) -> None:
        """Stop dockerd, if possible during an unlock."""
        self._dispatch("unlock")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            a = self.client.call("GET", "/unlock/status")
            if a.status == 200 and isinstance(a.json, dict) and a.json.get("bytesDone", 0) > 0:
                break
            time.sleep(0.05)
        self._begin("dockerd_stop", "SIGTERM, then started again", lasts)
        self.engine_up_since = None
        self.engine.stop()

    def _heal(self, episode: Episode) -> None:
        if episode.channel == "cdn":
            self.proxy.clear_faults()
        elif episode.channel == "api":
            self.stack.clear_faults()
        elif episode.channel == "docker":
            self.engine.start()
            self.engine_up_since = self.now()
        episode.heal = self.now()
        probe = PROBE.get(episode.channel)
        if probe:
            self._dispatch(probe)
        if episode.channel in RECOVERY:
            self._watch(self._recover, episode, RECOVERY[episode.channel], self.probe_model)

    def _heal_due(self) -> None:
        with self.lock:  # a stalled client is let go by the loader, never by the soak
            due = [e for e in self.episodes if e.heal is None and e.channel != "client"]
        for episode in due:
            episode.ops_left -= 1
            if episode.ops_left <= 0:
                self._heal(episode)

    # --- liveness ---------------------------------------------------------------------------------

    def _recover(self, episode: Episode, kind: str, model) -> None:
        """After ``episode`` healed: /health 200, then a ``kind`` load of ``model``, again every half second
        until one succeeds or the bound has passed (on a watch thread)."""
        bound = self.liveness.bound(episode.channel)
        recovered = None
        while recovered is None and self.now() < episode.heal + bound:
            if self._health().outcome == "ok" and self._load(model, kind).outcome == "ok":
                recovered = self.now()
            else:
                time.sleep(0.5)
        episode.recovered = recovered
        verdict = judge_recovery(episode, "load", recovered, bound, self._episodes())
        self._record("recovery", "recovery", episode.heal, self.now(), None, verdict, model)

    def _stall_clients(self, episode: Episode, n: int) -> None:
        """``n`` /load clients of the stall model that read the head and then nothing (on a watch thread).
        The loader must let them go within CLIENT_STALL_TIMEOUT and a margin of their head, answering
        /health and /status meanwhile; then the model must load again (a recovery check). The model is
        cached first, so the stalled loads read the disk, which no fault reaches."""
        model = self.stall_model
        if not self._cache_file(model, ".meta").exists():
            self._load(model, "load_warm")
        if not self._cache_file(model, ".meta").exists():
            episode.detail += " (not cached: none stalled)"
            episode.heal = self.now()
            return
        bound = self.liveness.bound("client")
        t0 = self.now()
        busy = self._hold(model)  # the stalled loads read the part: no eviction may take it
        clients = [self.client.stalled_load(model.name) for _ in range(n)]
        gone = None
        try:
            heads = [(c.head(), self.now()) for c in clients]
            head = max((t for a, t in heads if a.status == 200), default=None)
            if head is None:
                gone = head = self.now()  # none stalled: nothing to let go
            while gone is None and self.now() < head + bound + 1.0:  # a second past it shows how late
                self._health()
                if self._operations(f"{FOLDER}/{model.name}") == 0:
                    gone = self.now()
                else:
                    time.sleep(0.25)
        finally:
            for c in clients:
                c.close()
            busy.end = self.now()
        t1 = self.now()
        episode.heal = t1 if gone is None else gone
        let_go = judge_let_go(head, gone, bound, self._episodes(), t1)
        for a, t in heads:
            if a.status == 200:
                self._record("load_stalled", "load", t0, t1, a, let_go, model)
            else:
                room = self._room(model, busy, t0, t) if self.budget else None
                verdict = judge_load(model, a, self.session, self._episodes(), t0, t, room)
                self._record("load_stalled", "load", t0, t, a, verdict, model)
        if gone is not None and any(a.status == 200 for a, _ in heads):
            with self.lock:
                self.let_go.append(gone - head)
        self._recover(episode, "probe_warm", model)
