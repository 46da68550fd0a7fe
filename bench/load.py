"""/load throughput through the running loader against `aws s3 cp` and `rclone cat` of the same big part.

    .venv/bin/python bench/load.py [--size-mib 1024] [--runs 2]

Starts SeaweedFS and the reference Resource API (devstack), publishes a random model, starts the loader
as `python main.py`, then measures in each run: a cold /load (cache empty: CDN -> decrypt -> HTTP), a
warm /load (verified cache), both with curl to /dev/null, and two native S3 clients reading the big part
`s3://models/<name>.big` with the downloader identity to /dev/null: `aws s3 cp ... -` and `rclone cat`
(configured only by environment variables, no config file). Throughputs are the best of the runs; the
warm load's time to first byte is curl's `time_starttransfer`, the median over the runs.
The loader's peak RSS is its VmHWM. The last line is the RESULT line:

    RESULT load_vs_awscli=<r> load_vs_rclone=<r> warm_vs_awscli=<r> warm_ttfb_ms=<n> peak_rss_mb=<n>
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import MIB, arguments, awscli, curl_argv, random_file, runs  # noqa: E402

from devstack.processes.loader import LoaderProcess  # noqa: E402
from devstack.stack import Stack  # noqa: E402

NAME = "bench.bin"


def timed_load(loader, name, expected):
    """One /load with curl writing to /dev/null, the loader's counterpart of `aws s3 cp ... -` to
    /dev/null: a native client, so the Python of a client does not take the CPU the loader needs.
    Returns (MiB/s, time to the first byte in ms)."""
    start = time.perf_counter()
    out = subprocess.run(
        curl_argv(loader.url, name),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    elapsed = time.perf_counter() - start
    status, size, ttfb = out.split()
    assert (status, size) == ("200", str(expected)), f"curl: {out}, expected 200 and {expected} bytes"
    return expected / elapsed / MIB, float(ttfb) * 1000


def handed_over(loader):
    """The loader's loader_blocks_handed_over_total: blocks of a download a cold load took from memory."""
    text = requests.get(f"{loader.url}/metrics", timeout=10).text
    return next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("loader_blocks_handed_over_total ")
    )


def timed_awscli(stack, name, big_size):
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        awscli(stack, "downloader", "cp", f"s3://models/{name}.big", "-", stdout=sink)
    return big_size / (time.perf_counter() - start) / MIB


def timed_rclone(stack, name, big_size):
    """`rclone cat` of the big part to /dev/null with the downloader identity. The remote `bench` is
    defined by RCLONE_CONFIG_BENCH_* variables only (path-style, as SeaweedFS needs); an empty
    RCLONE_CONFIG keeps rclone's config in memory, so no rclone.conf is read or written. AWS_* variables
    are left out: the AWS SDK inside rclone would read them, and AWS_CA_BUNDLE makes it fail."""
    ident = stack.s3.credentials["downloader"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "RCLONE_CONFIG": "",
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
        "RCLONE_CONFIG_BENCH_ENV_AUTH": "false",
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ident["access_key"],
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": ident["secret_key"],
        "RCLONE_CONFIG_BENCH_ENDPOINT": stack.s3_endpoint,
        "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
    }
    rclone = shutil.which("rclone")
    assert rclone, "rclone is missing: run scripts/system-deps as root (or apt-get install rclone)"
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        subprocess.run([rclone, "cat", f"bench:models/{name}.big"], env=env, stdout=sink, check=True)
    return big_size / (time.perf_counter() - start) / MIB


def main():
    args = arguments(__doc__.splitlines()[0])
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        with Stack(work / "stack") as stack:
            stack.add_user("bench@azaion.local", "bench-Pa55", ["Operator"])
            model = work / "model.bin"
            random_file(model, args.size_mib)
            published = stack.publish("models", NAME, model)
            model.unlink()
            big_size = stack.s3_admin_client().head_object(Bucket="models", Key=NAME + ".big")[
                "ContentLength"
            ]
            fmt = "format 2" if stack.admin.get_file("models", NAME + ".manifest") is not None else "format 1"
            print(
                f"model {args.size_mib} MiB published as {published.folder}/{published.name}"
                f" (big part {big_size} bytes, ETag {published.etag})"
            )
            with LoaderProcess(work / "loader", RESOURCE_API_URL=stack.api_url) as loader:
                print(f"loader answered /health {loader.started_in:.2f} s after its start (target < 1.5 s)")
                loader.login("bench@azaion.local", "bench-Pa55").raise_for_status()
                cache = Path(loader.env["MODEL_CACHE_DIR"])
                cold, warm, ttfb, aws, rclone = [], [], [], [], []
                try:
                    for _ in range(args.runs):
                        shutil.rmtree(cache / "models", ignore_errors=True)
                        cold.append(timed_load(loader, NAME, size)[0])
                        # The load ends with its last byte and the big part's hash and commit follow: wait for
                        # them, so the warm load reads the verified cache and nothing overlaps the next run.
                        loader.cached_big_part("models", NAME, timeout=300)
                        speed, first_byte_ms = timed_load(loader, NAME, size)
                        warm.append(speed)
                        ttfb.append(first_byte_ms)
                        aws.append(timed_awscli(stack, NAME, big_size))
                        rclone.append(timed_rclone(stack, NAME, big_size))
                except BaseException:
                    print(f"loader log (tail):\n{loader.log()[-3000:]}", file=sys.stderr)
                    raise
                rss = loader.peak_rss_mb()
                handed = handed_over(loader)
        best_cold, best_warm, best_aws, best_rclone = max(cold), max(warm), max(aws), max(rclone)
        warm_ttfb = statistics.median(ttfb)
        print(f"/load cold (CDN -> decrypt -> HTTP): {best_cold:8.1f} MiB/s  runs: {runs(cold)}")
        print(f"/load warm (verified cache):         {best_warm:8.1f} MiB/s  runs: {runs(warm)}")
        print(f"aws s3 cp <big part> - > /dev/null:  {best_aws:8.1f} MiB/s  runs: {runs(aws)}")
        print(f"rclone cat <big part> > /dev/null:   {best_rclone:8.1f} MiB/s  runs: {runs(rclone)}")
        print(f"warm /load time to first byte: {warm_ttfb:.0f} ms (median)  runs: {runs(ttfb)}")
        print(f"loader peak RSS {rss:.0f} MB")
        blocks = -(-big_size // (4 * MIB)) * args.runs
        print(f"blocks the cold loads took from memory, not the disk: {handed:.0f} of {blocks}")
        print(f"model: {fmt}")
        print(
            f"RESULT load_vs_awscli={best_cold / best_aws:.2f} load_vs_rclone={best_cold / best_rclone:.2f}"
            f" warm_vs_awscli={best_warm / best_aws:.2f} warm_ttfb_ms={warm_ttfb:.0f} peak_rss_mb={rss:.0f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
