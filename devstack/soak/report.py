"""The soak's figures: operations and faults by kind, latencies, the cache budget's evictions and the
prefetches, the loader's memory and descriptors, the violations, and the RESULT line (see devstack.soak)."""

import re
import statistics
from collections import Counter
from dataclasses import dataclass

from devstack.soak.rules import REACH

KiB, MiB = 1024, 1024 * 1024


def percentile(values: list[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Growth:
    incarnation: int
    checkpoints: int
    rss_first_mb: float = 0.0
    rss_last_mb: float = 0.0
    fds_first: float = 0.0
    fds_last: float = 0.0

    @property
    def rss_mb(self) -> float:
        return self.rss_last_mb - self.rss_first_mb

    @property
    def fds(self) -> float:
        return self.fds_last - self.fds_first


@dataclass
class Report:
    soak: object  # the devstack.soak.engine.Soak that ran
    seconds: float
    fault_kinds: list[str]

    def __post_init__(self):
        s = self.soak
        self.records = [r for r in s.records if not r.final]
        self.final = [r for r in s.records if r.final]
        self.violations = [r for r in s.records if r.verdict.outcome == "violation"]
        self.growth = self._growth()
        ok_loads = [
            (r.end - r.start) * 1000 for r in self.records if r.route == "load" and r.verdict.outcome == "ok"
        ]
        self.p99_load_ms = percentile(ok_loads, 99)

    def _growth(self) -> Growth:
        """Median of the last quarter of the last incarnation's checkpoints minus median of its first."""
        last = self.soak.incarnation
        points = [c for c in self.soak.checkpoints if c.incarnation == last]
        g = Growth(last, len(points))
        if not points:
            return g
        quarter = max(1, len(points) // 4)
        first, tail = points[:quarter], points[-quarter:]
        g.rss_first_mb = statistics.median(p.rss_kb for p in first) / 1024
        g.rss_last_mb = statistics.median(p.rss_kb for p in tail) / 1024
        g.fds_first = statistics.median(p.fds for p in first)
        g.fds_last = statistics.median(p.fds for p in tail)
        return g

    def recoveries(self) -> dict[str, float | None]:
        """Per fault kind, the longest time from a heal to the first success of a route it reaches."""
        out: dict[str, float | None] = {}
        for e in self.soak.episodes:
            if e.heal is None or e.channel == "disk":
                continue
            # A stalled client reaches no route (it must excuse nothing): its recovery is the next load.
            routes = {route for route, reach in REACH.items() if e.channel in reach} or {"load"}
            ends = [
                r.end
                for r in self.soak.records
                if r.route in routes and r.start >= e.heal and r.verdict.outcome == "ok"
            ]
            took = min(ends) - e.heal if ends else None
            best = out.get(e.kind, 0.0)
            out[e.kind] = None if took is None or best is None else max(best, took)
        return out

    def lines(self) -> list[str]:
        s = self.soak
        out = [
            f"soak: seed {s.cfg.seed}, {len(self.records)} operations in {self.seconds / 60:.1f} min, "
            f"{len(s.models)} models of {_size(min(s.cfg.sizes))} to {_size(max(s.cfg.sizes))}, "
            f"up to {s.cfg.concurrency} at once, {s.incarnation} loader incarnations",
            "",
            f"{'operation':<22}{'count':>7}{'ok':>7}{'failed':>8}{'violations':>12}",
        ]
        kinds = Counter(r.kind for r in self.records)
        for kind in sorted(kinds):
            outcomes = Counter(r.verdict.outcome for r in self.records if r.kind == kind)
            out.append(
                f"{kind:<22}{kinds[kind]:>7}{outcomes['ok']:>7}{outcomes['failed']:>8}{outcomes['violation']:>12}"
            )
        out += ["", f"{'fault':<26}{'count':>7}{'longest recovery':>18}"]
        faults = Counter(e.kind for e in s.episodes)
        recoveries = self.recoveries()
        for kind in self.fault_kinds:
            took = recoveries.get(kind)
            shown = "-" if kind not in recoveries else ("none" if took is None else f"{took:.1f} s")
            out.append(f"{kind:<26}{faults[kind]:>7}{shown:>18}")
        out += ["", f"{'route (ok answers)':<22}{'n':>7}{'p50 ms':>10}{'p99 ms':>10}"]
        for route in (r for r in REACH if r != "health"):  # /health is recorded only when it fails
            times = [
                (r.end - r.start) * 1000
                for r in self.records
                if r.route == route and r.verdict.outcome == "ok"
            ]
            out.append(
                f"{route:<22}{len(times):>7}{percentile(times, 50):>10.0f}{percentile(times, 99):>10.0f}"
            )
        out += ["", "failures the faults explain, by reason:"]
        reasons = Counter(_reason(r.verdict.why) for r in self.records if r.verdict.outcome == "failed")
        out += [f"{n:>7}  {reason}" for reason, n in reasons.most_common(20)]
        g = self.growth
        peak = max((x.rss_kb for x in s.samples), default=0) / 1024
        live = s.liveness
        checks = Counter(r.verdict.outcome for r in self.records if r.kind == "recovery")
        out += [
            "",
            f"liveness (API_DEADLINE {live.api_deadline:g} s, CDN_SPEED_TIME {live.cdn_speed_time:g} s, "
            f"CLIENT_STALL_TIMEOUT {live.client_stall_timeout:g} s, margin {live.margin:g} s): /health "
            + ", ".join(
                f"{'no answer' if k is None else k} x{n}" for k, n in sorted(s.health.items(), key=str)
            )
            + f"; recovery checks {sum(checks.values())} ({checks['ok']} ok, {checks['failed']} under "
            f"another fault, {checks['violation']} late); stalled clients let go after at most "
            f"{max(s.let_go, default=0.0):.1f} s of {len(s.let_go)} stalls (bound "
            f"{live.bound('client'):g} s)",
            f"loader: peak RSS {peak:.0f} MB; last incarnation ({g.checkpoints} quiet checkpoints): RSS "
            f"{g.rss_first_mb:.1f} -> {g.rss_last_mb:.1f} MB, open fds {g.fds_first:.0f} -> {g.fds_last:.0f} "
            "(first quarter -> last quarter, medians)",
            self.cache_line(),
            f"after the run: {sum(r.verdict.outcome == 'ok' for r in self.final)}/{len(self.final)} checks "
            "ok "
            "(every model loaded warm and cold, an unlock ready)",
            f"violations: {len(self.violations)}",
        ]
        out += [f"  {r.start:8.1f}s {r.kind} {r.model or ''}: {r.verdict.why}" for r in self.violations[:50]]
        if s.loader_errors:
            out.append(f"the loader's log on them ({len(s.loader_errors)} lines about a 500 or a traceback):")
            out += [f"  {line}" for line in s.loader_errors[:20]]
        out.append(self.result())
        return out

    def cache_line(self) -> str:
        """The cache budget, what the loader evicted to keep to it (its log), the prefetches by answer, how
        the downloads they started ended, and the interrupted prefetches resumed."""
        s = self.soak
        parts = sum(size for name, size in s.sizes.items() if s.oversize is None or name != s.oversize.name)
        evicted = sum(n for _, n, _ in s.evictions)
        leftovers = sum("unfinished" in what for _, _, what in s.evictions)
        answers = ", ".join(
            f"{'no answer' if k is None else k} x{n}" for k, n in sorted(s.prefetches.items(), key=str)
        )
        ended = ", ".join(f"{k} x{n}" for k, n in sorted(s.downloads_ended.items()))
        resumed = ", ".join(f"{_mb(due)} -> {_mb(held)}" for due, held in s.resumes)
        return (
            f"cache: MODEL_CACHE_MAX_BYTES {_mb(s.budget)} for {_mb(parts)} of big parts, peak bytesUsed "
            f"{_mb(s.bytes_used_peak)}; {len(s.evictions)} evictions ({_mb(evicted)}, {leftovers} unfinished "
            f"downloads); {sum(s.prefetches.values())} prefetches ({answers or 'none'}), their downloads "
            f"{ended or 'none'}; interrupted prefetches resumed {len(s.resumes)} (bytes due -> held again: "
            f"{resumed or '-'})"
        )

    def result(self) -> str:
        g = self.growth
        s = self.soak
        return (
            f"RESULT soak_ops={len(self.records)} violations={len(self.violations)} "
            f"rss_growth_mb={g.rss_mb:.1f} fd_growth={g.fds:.0f} p99_load_ms={self.p99_load_ms:.0f} "
            f"evictions={len(s.evictions)} prefetches={sum(s.prefetches.values())}"
        )


def _reason(why: str) -> str:
    """A failure's reason with its numbers and names left out, so alike ones count together."""
    return re.sub(r"soak\d+-\w+\.bin|\d+", "#", why)[:100]


def _mb(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"
