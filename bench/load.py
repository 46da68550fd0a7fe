"""/load throughput through the running loader against `aws s3 cp` of the same big part, in one run.

    .venv/bin/python bench/load.py [--size-mib 1024] [--runs 2]

Starts SeaweedFS and the reference Resource API (devstack), publishes a random model, starts the loader
as `python main.py`, then measures: a cold /load (cache empty: CDN -> decrypt -> HTTP), a warm /load
(verified cache), both with curl to /dev/null, and `aws s3 cp s3://models/<name>.big -` to /dev/null
with the downloader identity.
The loader's peak RSS is its VmHWM. The last line is the RESULT line.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.stack import Stack  # noqa: E402
from tests.support.loader import LoaderProcess  # noqa: E402

MIB = 1024 * 1024


def timed_load(loader, name, expected):
    """One /load with curl writing to /dev/null, the loader's counterpart of `aws s3 cp ... -` to
    /dev/null: a native client, so the Python of a client does not take the CPU the loader needs."""
    start = time.perf_counter()
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            os.devnull,
            "-w",
            "%{http_code} %{size_download}",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"folder": "models"}',
            f"{loader.url}/load/{name}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    elapsed = time.perf_counter() - start
    assert out == f"200 {expected}", f"curl: {out}, expected 200 and {expected} bytes"
    return expected / elapsed / MIB


def timed_awscli(stack, name, big_size):
    ident = stack.s3.credentials["downloader"]
    key, secret = ident["access_key"], ident["secret_key"]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    aws = str(Path(sys.executable).parent / "aws")
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        subprocess.run(
            [aws, "s3", "cp", "--endpoint-url", stack.s3_endpoint, f"s3://models/{name}.big", "-"],
            env=env,
            stdout=sink,
            check=True,
        )
    return big_size / (time.perf_counter() - start) / MIB


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        with Stack(work / "stack") as stack:
            stack.add_user("bench@azaion.local", "bench-Pa55", ["Operator"])
            model = work / "model.bin"
            with open(model, "wb") as f:
                for _ in range(args.size_mib):
                    f.write(os.urandom(MIB))
            published = stack.publish("models", "bench.bin", model)
            model.unlink()
            big_size = stack.s3_admin_client().head_object(Bucket="models", Key="bench.bin.big")[
                "ContentLength"
            ]
            print(f"model {args.size_mib} MiB published (big part {big_size} bytes): {published}")
            with LoaderProcess(work / "loader", RESOURCE_API_URL=stack.api_url) as loader:
                print(f"loader answered /health {loader.started_in:.2f} s after its start (target < 1.5 s)")
                loader.login("bench@azaion.local", "bench-Pa55").raise_for_status()
                cache = Path(loader.env["MODEL_CACHE_DIR"])
                cold, warm, aws = [], [], []
                for _ in range(args.runs):
                    shutil.rmtree(cache / "models", ignore_errors=True)
                    cold.append(timed_load(loader, "bench.bin", size))
                    # The load ends with its last byte and the big part's hash and commit follow: wait for
                    # them, so the warm load reads the verified cache and nothing overlaps the next run.
                    loader.cached_big_part("models", "bench.bin", timeout=300)
                    warm.append(timed_load(loader, "bench.bin", size))
                    aws.append(timed_awscli(stack, "bench.bin", big_size))
                rss = loader.peak_rss_mb()
        best_cold, best_warm, best_aws = max(cold), max(warm), max(aws)
        print(
            f"/load cold (CDN -> decrypt -> HTTP): {best_cold:8.1f} MiB/s  runs: "
            + " ".join(f"{v:.1f}" for v in cold)
        )
        print(
            f"/load warm (verified cache):         {best_warm:8.1f} MiB/s  runs: "
            + " ".join(f"{v:.1f}" for v in warm)
        )
        print(
            f"aws s3 cp <big part> - > /dev/null:  {best_aws:8.1f} MiB/s  runs: "
            + " ".join(f"{v:.1f}" for v in aws)
        )
        print(f"warm /load vs aws s3 cp: {best_warm / best_aws:.2f}x; loader peak RSS {rss:.0f} MB")
        print(f"RESULT load_vs_awscli={best_cold / best_aws:.2f} peak_rss_mb={rss:.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
