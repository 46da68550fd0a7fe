"""What the benchmark scripts share: their arguments, a random model file, the AWS CLI as a peer."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

MIB = 1024 * 1024


def arguments(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=2)
    return parser.parse_args()


def random_file(path, size_mib):
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB))
    return path


def awscli(stack, identity, *args, **run):
    """``aws s3 <args>`` (the AWS CLI in the venv) against the stack's SeaweedFS as ``identity``."""
    ident = stack.s3.credentials[identity]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ident["access_key"],
        "AWS_SECRET_ACCESS_KEY": ident["secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    aws = str(Path(sys.executable).parent / "aws")
    return subprocess.run([aws, "s3", *args, "--endpoint-url", stack.s3_endpoint], env=env, check=True, **run)


def runs(values):
    return " ".join(f"{v:.1f}" for v in values)


def curl_argv(url, name, folder="models"):
    """The argv of a /load of ``name`` with curl to /dev/null that prints ``status size ttfb``: a native
    client, so the Python of a client does not take the CPU the loader needs."""
    return [
        "curl",
        "-sS",
        "-o",
        os.devnull,
        "-w",
        "%{http_code} %{size_download} %{time_starttransfer}",
        "-H",
        "Content-Type: application/json",
        "-d",
        f'{{"folder": "{folder}"}}',
        f"{url}/load/{name}",
    ]
