"""/upload throughput through the running loader against `aws s3 cp` of the same file, in one run.

    .venv/bin/python bench/upload.py [--size-mib 1024] [--runs 2]

Starts SeaweedFS and the reference Resource API (devstack), writes a random file to a temp dir, starts the
loader as `python main.py` logged in as a ResourceUploader, then times, alternating, best of the runs:
`curl -F folder=models -F data=@<file> .../upload/<name>` (plaintext -> encrypt -> CDN + cache + API; it
must answer 200 with the file's size) and `aws s3 cp <file> s3://models/<other key>` with the uploader
identity (the plain upload, no encryption). Both read the same page-cached file.
The loader's peak RSS is its VmHWM. The last line is the RESULT line: ``RESULT upload_vs_awscli=<ratio>``.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import MIB, arguments, awscli, random_file, runs  # noqa: E402

from devstack.processes.loader import LoaderProcess  # noqa: E402
from devstack.stack import Stack  # noqa: E402

NAME = "bench-upload.bin"
AWS_KEY = "bench-awscli.bin"


def timed_upload(loader, name, path, size):
    """One /upload with curl streaming the file from disk: a native client, like `aws s3 cp`."""
    start = time.perf_counter()
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            # The folder first, as the README shows: the loader then sends the big part to the CDN while
            # it still receives and encrypts the file.
            "-F",
            "folder=models",
            "-F",
            f"data=@{path}",
            f"{loader.url}/upload/{name}",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    ).stdout
    elapsed = time.perf_counter() - start
    body, _, status = out.rpartition("\n")
    assert status == "200", f"/upload answered {status}: {body}"
    assert json.loads(body).get("size") == size, f"/upload answered {body}, expected size {size}"
    return size / elapsed / MIB


def timed_awscli(stack, path, key, size):
    start = time.perf_counter()
    awscli(stack, "uploader", "cp", "--only-show-errors", str(path), f"s3://models/{key}")
    elapsed = time.perf_counter() - start
    stored = stack.s3_admin_client().head_object(Bucket="models", Key=key)["ContentLength"]
    assert stored == size, f"aws s3 cp stored {stored} bytes, expected {size}"
    return size / elapsed / MIB


def main():
    args = arguments(__doc__.splitlines()[0])
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    try:
        model = work / "model.bin"
        random_file(model, args.size_mib)
        with Stack(work / "stack") as stack:
            stack.add_user("uploader@azaion.local", "bench-Pa55", ["ResourceUploader"])
            # The uploader identity may not create buckets (as in production): the admin makes "models".
            stack.s3_admin_client().create_bucket(Bucket="models")
            with LoaderProcess(work / "loader", RESOURCE_API_URL=stack.api_url) as loader:
                print(f"loader answered /health {loader.started_in:.2f} s after its start (target < 1.5 s)")
                loader.login("uploader@azaion.local", "bench-Pa55").raise_for_status()
                cache = Path(loader.env["MODEL_CACHE_DIR"])
                up, aws = [], []
                try:
                    for _ in range(args.runs):
                        # Each run starts from an empty cache, so the upload writes its cache file afresh.
                        shutil.rmtree(cache / "models", ignore_errors=True)
                        up.append(timed_upload(loader, NAME, model, size))
                        aws.append(timed_awscli(stack, model, AWS_KEY, size))
                except BaseException:
                    print(f"loader log (tail):\n{loader.log()[-3000:]}", file=sys.stderr)
                    raise
                rss = loader.peak_rss_mb()
            fmt = "format 2" if stack.admin.get_file("models", NAME + ".manifest") is not None else "format 1"
        best_up, best_aws = max(up), max(aws)
        print(f"file {args.size_mib} MiB, {args.runs} run(s); the loader's upload is {fmt}")
        print(f"/upload (curl -F, encrypt -> CDN + cache + API): {best_up:8.1f} MiB/s  runs: {runs(up)}")
        print(f"aws s3 cp <file> s3://models/...:                 {best_aws:8.1f} MiB/s  runs: {runs(aws)}")
        print(f"loader peak RSS {rss:.0f} MB")
        print(f"RESULT upload_vs_awscli={best_up / best_aws:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
