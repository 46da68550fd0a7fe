"""Unlock of a large archive through the running loader against `openssl enc -d | docker load`.

    .venv/bin/python bench/unlock.py [--size-mib 1024] [--runs 2]

In one run on one Docker Engine (a private dockerd, vfs storage): builds a one-layer image of random
bytes, publishes it as the encrypted archive (devstack), then times, with the image removed before each:
the loader's unlock (POST /unlock until `ready`, probing /health every 50 ms meanwhile) and
`openssl enc -d -aes-256-cbc ... | docker load` of the same archive. The last line is the RESULT line.
"""

import argparse
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

from devstack import crypto  # noqa: E402
from devstack.images import publish_images  # noqa: E402
from devstack.processes.dockerd import Dockerd, import_image, remove_images  # noqa: E402
from devstack.processes.loader import LoaderProcess  # noqa: E402
from devstack.stack import Stack  # noqa: E402

MIB = 1024 * 1024
TAG = "azaion/bench-unlock:1"


def unlock_through_loader(loader, email, password, probe_every):
    """Time one unlock; meanwhile probe /health (one keep-alive connection) every ``probe_every`` s."""
    health = []
    http = requests.Session()
    start = time.perf_counter()
    http.post(f"{loader.url}/unlock", json={"email": email, "password": password}, timeout=30)
    while True:
        t = time.perf_counter()
        assert http.get(f"{loader.url}/health", timeout=10).status_code == 200
        health.append((time.perf_counter() - t) * 1000)
        state = http.get(f"{loader.url}/unlock/status", timeout=10).json()
        if state["state"] in ("ready", "error"):
            break
        time.sleep(probe_every)
    elapsed = time.perf_counter() - start
    assert state["state"] == "ready", state
    return elapsed, health


def unlock_with_openssl(engine, key, ciphertext, iv):
    docker_cli = shutil.which("docker")
    start = time.perf_counter()
    dec = subprocess.Popen(
        [
            "openssl",
            "enc",
            "-d",
            "-aes-256-cbc",
            "-K",
            key.hex(),
            "-iv",
            iv.hex(),
            "-bufsize",
            str(MIB),
            "-in",
            str(ciphertext),
        ],
        stdout=subprocess.PIPE,
    )
    load = subprocess.run(
        [docker_cli, "-H", engine.host, "load"], stdin=dec.stdout, capture_output=True, check=True
    )
    dec.stdout.close()
    assert dec.wait() == 0 and TAG.encode() in load.stdout, load.stdout
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--probe-ms", type=float, default=50, help="interval of the /health probes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-unlock-"))
    engine = Dockerd(work / "dockerd").start()
    try:
        client = engine.client(timeout=3600)
        remove_images(client, [TAG])
        import_image(client, TAG, {"/model.bin": os.urandom(args.size_mib * MIB)})
        archive = work / "images.enc"
        fragment = publish_images(engine.host, [TAG], archive)
        key = crypto.archive_key(fragment)
        ciphertext = work / "images.cbc"  # the archive without its IV, for openssl -in
        with open(archive, "rb") as src, open(ciphertext, "wb") as dst:
            iv = src.read(16)
            shutil.copyfileobj(src, dst, MIB)
        size = archive.stat().st_size
        print(f"archive: {size / MIB:.0f} MiB")
        with Stack(work / "stack") as stack:
            stack.add_user("bench@azaion.local", "bench-Pa55", ["CompanionPC"])
            stack.set_key_fragment(fragment)
            with LoaderProcess(
                work / "loader", RESOURCE_API_URL=stack.api_url, DOCKER_HOST=engine.host, IMAGES_PATH=archive
            ) as loader:
                ours, theirs, health = [], [], []
                for _ in range(args.runs):
                    remove_images(client, [TAG])
                    elapsed, probes = unlock_through_loader(
                        loader, "bench@azaion.local", "bench-Pa55", args.probe_ms / 1000
                    )
                    ours.append(elapsed)
                    health += probes
                    remove_images(client, [TAG])
                    theirs.append(unlock_with_openssl(engine, key, ciphertext, iv))
                rss = loader.peak_rss_mb()
        best_ours, best_theirs = min(ours), min(theirs)
        p99 = statistics.quantiles(health, n=100)[98] if len(health) >= 2 else health[0]
        print(
            f"loader unlock:              {size / MIB / best_ours:7.1f} MiB/s  runs (s): "
            + " ".join(f"{t:.1f}" for t in ours)
        )
        print(
            f"openssl enc -d | docker load: {size / MIB / best_theirs:5.1f} MiB/s  runs (s): "
            + " ".join(f"{t:.1f}" for t in theirs)
        )
        print(
            f"/health during unlock: {len(health)} probes, median {statistics.median(health):.1f} ms, "
            f"p99 {p99:.1f} ms, max {max(health):.1f} ms"
        )
        print(
            f"RESULT unlock_vs_openssl_docker={best_theirs / best_ours:.2f} peak_rss_mb={rss:.0f} "
            f"health_p99_ms={p99:.1f}"
        )
    finally:
        remove_images(engine.client(), [TAG])
        engine.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
