"""Field transfers (docs/contract.md "Field transfers"): what a restart mid-download costs on the link, how
close a capped download keeps to its cap, a load right after a prefetch, and memory under concurrent loads.

    .venv/bin/python bench/transfer.py [--restart-mib 512] [--capped-mib 256] [--par-mib 256] [--par 8]

Starts SeaweedFS and the reference Resource API (devstack) with a fault proxy in front of SeaweedFS (it counts
the bytes the CDN sends), then a loader as `python main.py` of its own for each figure:

  restart_refetch             a cold load of a sealed 512 MiB model held by the proxy at the half of its big
                              part until the download's record holds every block before it, the loader
                              SIGKILLed and started again on the same cache, the model loaded again: the bytes
                              the CDN sent after the restart / the big part's size (about 0.5 when only the
                              missing half is fetched again, 1.0 when all of it is)
  capped_rate_vs_cap          a cold 256 MiB load with CDN_MAX_BYTES_PER_S=20000000: the big part's size over
                              the load's wall time, / the cap (1.0: the cap kept exactly)
  prefetch_then_load_ttfb_ms  POST /prefetch of a 256 MiB model, GET /downloads until it is cached, then a
                              /load: its time to the first byte (curl's time_starttransfer)
  par8_peak_rss_mb            eight cold loads at once of eight different 256 MiB models, LOAD_MEMORY_BYTES
                              at its default: the loader's peak RSS (VmHWM)

Loads are curl writing to /dev/null (status and size checked). Figures are printed, never judged; the last
line is the RESULT line (on one line):

    RESULT restart_refetch=<ratio> capped_rate_vs_cap=<ratio> prefetch_then_load_ttfb_ms=<n>
           par8_peak_rss_mb=<n>
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import MIB, curl_argv, random_file  # noqa: E402

from devstack.processes.faultproxy import FaultProxy  # noqa: E402
from devstack.processes.loader import LoaderProcess  # noqa: E402
from devstack.split import ensure_bucket  # noqa: E402
from devstack.stack import Stack  # noqa: E402
from devstack.wait import until  # noqa: E402

EMAIL, PASSWORD = "transfer@azaion.local", "bench-Pa55"
BLOCK = 4 * MIB  # a manifest's blockSize
TAIL = 32  # the bytes at a big part's end a load checks first: their block is fetched first
CAP = 20_000_000  # bytes a second
HOLD = 600.0  # seconds the proxy holds the transfer it stops at the half (the loader is killed before)


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restart-mib", type=int, default=512)
    parser.add_argument("--capped-mib", type=int, default=256)
    parser.add_argument("--par-mib", type=int, default=256)
    parser.add_argument("--par", type=int, default=8)
    return parser.parse_args()


class Bench:
    def __init__(self, work, stack, proxy):
        self.work, self.stack, self.proxy = work, stack, proxy

    def publish(self, name, size_mib):
        """Publish a random model of ``size_mib`` MiB (format 2); ``(big part size, ETag)``."""
        model = random_file(self.work / "model.bin", size_mib)
        self.stack.publish("models", name, model)
        model.unlink()
        head = self.stack.s3_admin_client().head_object(Bucket="models", Key=name + ".big")
        return head["ContentLength"], head["ETag"].strip('"')

    def loader(self, label, **env):
        env.setdefault("RESOURCE_API_URL", self.stack.api_url)
        loader = LoaderProcess(self.work / label, **env).start()
        try:
            loader.login(EMAIL, PASSWORD).raise_for_status()
        except BaseException:
            loader.stop()
            raise
        return loader


def curl_load(loader, name, **popen):
    """A /load with curl to /dev/null, started: a Popen whose stdout will be ``status size ttfb``."""
    return subprocess.Popen(
        curl_argv(loader.url, name),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finished(curl, expected, timeout=1800):
    """Wait for a curl_load; its time to the first byte in ms. Fails unless it got 200 and ``expected``
    bytes."""
    out, err = curl.communicate(timeout=timeout)
    parts = out.split()
    if curl.returncode != 0 or len(parts) != 3 or parts[:2] != ["200", str(expected)]:
        raise RuntimeError(
            f"curl: {out!r} {err.strip()!r} (exit {curl.returncode}); expected 200 and {expected} bytes"
        )
    return float(parts[2]) * 1000


def timed_load(loader, name, expected):
    """``(seconds, time to first byte in ms)`` of one /load."""
    start = time.perf_counter()
    ttfb = finished(curl_load(loader, name), expected)
    return time.perf_counter() - start, ttfb


def recorded_blocks(cache, name):
    """The blocks the record of ``name``'s download claims (``<key>.<32 hex>.record``: a JSON header line,
    then one block index per complete line)."""
    pattern = re.compile(re.escape(name + ".big") + r"\.[0-9a-f]{32}\.record")
    folder = Path(cache) / "models"
    records = [p for p in folder.iterdir() if pattern.fullmatch(p.name)] if folder.is_dir() else []
    if not records:
        return set()
    lines = records[0].read_text().split("\n")[:-1]
    if not lines:
        return set()
    json.loads(lines[0])
    return {int(line) for line in lines[1:] if line.isdigit()}


def download_of(loader, name):
    found = [d for d in loader.get("/downloads").json()["downloads"] if d["name"] == name]
    return found[-1] if found else None


def wait_cached(loader, name, timeout=1800):
    def cached():
        d = download_of(loader, name)
        if d is not None and d["state"] == "failed":
            raise RuntimeError(f"the download of {name} failed: {d}")
        return d if d is not None and d["state"] == "cached" else None

    return until(cached, timeout, f"{name} not cached within {timeout} s", every=0.05)


def restart_refetch(b, size_mib):
    name = "restart.bin"
    size, _ = b.publish(name, size_mib)
    path = f"/models/{name}.big"
    at = size // 2 // BLOCK * BLOCK
    cache = b.work / "restart-cache"
    b.proxy.hold_at(at, HOLD, path=path, until=max(0, size - TAIL) // BLOCK * BLOCK)
    first = b.loader("restart-first", MODEL_CACHE_DIR=cache)
    try:
        curl = curl_load(first, name)
        start = time.perf_counter()
        until(
            lambda: set(range(at // BLOCK)) <= recorded_blocks(cache, name),
            600,
            lambda: f"the record never held the first half; loader log:\n{first.log()[-3000:]}",
            every=0.05,
        )
        held = time.perf_counter() - start
        before = b.proxy.sent("GET", path)
        first.kill()
        curl.communicate(timeout=60)
    finally:
        first.stop()
        b.proxy.stop()
        b.proxy.start()
        b.proxy.clear_faults()
    recorded = recorded_blocks(cache, name)
    b.proxy.reset_counts()
    print(
        f"restart: {size_mib} MiB model, big part {size} bytes; held at {at} bytes after {held:.1f} s, "
        f"the CDN had sent {before} bytes; the record held {len(recorded)} blocks when the loader was killed"
    )
    second = b.loader("restart-second", MODEL_CACHE_DIR=cache)
    try:
        seconds, _ = timed_load(second, name, size_mib * MIB)
        status = wait_cached(second, name)
    finally:
        second.stop()
    sent = b.proxy.sent("GET", path)
    print(
        f"restart: the load after the restart took {seconds:.2f} s; the CDN sent {sent} bytes "
        f"({sent / size:.3f} of the big part); /downloads: bytesResumed {status['bytesResumed']}"
    )
    return sent / size


def capped_rate(b, size_mib):
    name = "capped.bin"
    size, _ = b.publish(name, size_mib)
    loader = b.loader("capped", CDN_MAX_BYTES_PER_S=CAP)
    try:
        seconds, _ = timed_load(loader, name, size_mib * MIB)
    finally:
        loader.stop()
    rate = size / seconds
    print(
        f"capped: a cold {size_mib} MiB load under a {CAP / 1e6:.0f} MB/s cap took {seconds:.2f} s "
        f"(the cap says {size / CAP:.2f} s): {rate / 1e6:.2f} MB/s"
    )
    return rate / CAP


def prefetch_then_load(b, size_mib):
    name = "prefetch.bin"
    b.publish(name, size_mib)
    loader = b.loader("prefetch")
    try:
        start = time.perf_counter()
        r = loader.post(f"/prefetch/{name}", json={"folder": "models"})
        if r.status_code != 202:
            raise RuntimeError(f"POST /prefetch: {r.status_code} {r.text[:300]}")
        wait_cached(loader, name)
        staged = time.perf_counter() - start
        seconds, ttfb = timed_load(loader, name, size_mib * MIB)
    finally:
        loader.stop()
    print(
        f"prefetch: {size_mib} MiB staged in {staged:.2f} s; the load after it took {seconds:.2f} s "
        f"({size_mib / seconds:.0f} MiB/s), first byte after {ttfb:.0f} ms"
    )
    return ttfb


def parallel_rss(b, size_mib, count):
    names = [f"par-{i}.bin" for i in range(count)]
    for name in names:
        b.publish(name, size_mib)
    loader = b.loader("parallel")
    try:
        rss_before = loader.peak_rss_mb()
        start = time.perf_counter()
        curls = [curl_load(loader, name) for name in names]
        for curl in curls:
            finished(curl, size_mib * MIB)
        seconds = time.perf_counter() - start
        peak = loader.peak_rss_mb()
    finally:
        loader.stop()
    print(
        f"parallel: {count} cold {size_mib} MiB loads at once took {seconds:.2f} s "
        f"({count * size_mib / seconds:.0f} MiB/s together); loader peak RSS {peak:.0f} MB "
        f"({rss_before:.0f} MB before them)"
    )
    return peak


def main():
    args = arguments()
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    try:
        with Stack(work / "stack") as stack, FaultProxy(stack.s3_endpoint) as proxy:
            stack.write_cdn_yaml(host=proxy.url)
            ensure_bucket(stack.s3_admin_client(), "models")
            stack.add_user(EMAIL, PASSWORD, ["Operator"])
            b = Bench(work, stack, proxy)
            refetch = restart_refetch(b, args.restart_mib)
            capped = capped_rate(b, args.capped_mib)
            ttfb = prefetch_then_load(b, args.capped_mib)
            rss = parallel_rss(b, args.par_mib, args.par)
        print(
            f"RESULT restart_refetch={refetch:.3f} capped_rate_vs_cap={capped:.3f} "
            f"prefetch_then_load_ttfb_ms={ttfb:.0f} par8_peak_rss_mb={rss:.0f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
