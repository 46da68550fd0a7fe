"""`python -m devstack run` (what `make run` calls): the whole local setup in the foreground.

SeaweedFS + the reference Resource API (seeded with demo users, a format-2 demo model signed by the stack's
publisher key, a format-1 legacy model and a key fragment), a Docker Engine (the one DOCKER_HOST or the
default socket names, else a private dockerd), a demo image published as the encrypted archive, and the
loader itself on LOADER_PORT (default 8080), which trusts the stack's publisher key and signs its uploads
with it (contract section 9) — then the curl commands that log in, load, upload and unlock. Ctrl-C stops
everything this command started.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from devstack.images import publish_images
from devstack.processes.dockerd import Dockerd, import_image, running_engine
from devstack.seed import (
    DEMO_FOLDER,
    DEMO_MODEL,
    DEMO_MODEL_SHA256,
    DEMO_USERS,
    LEGACY_MODEL,
    LEGACY_MODEL_SHA256,
    seed,
)
from devstack.stack import REPO_ROOT, Stack

DEMO_IMAGE = "azaion/demo-app:1.0"


def _engine(data_dir: Path):
    host = running_engine()
    if host:
        return host, None
    engine = Dockerd(data_dir / "dockerd").start()
    return engine.host, engine


def _demo_archive(host: str, archive: Path, fragment: bytes) -> None:
    import docker

    client = docker.DockerClient(base_url=host, timeout=300)
    try:
        import_image(
            client,
            DEMO_IMAGE,
            {"/demo/README": b"Azaion demo image, unlocked by the loader.\n"},
            changes=['CMD ["/demo/README"]'],
        )
        publish_images(host, [DEMO_IMAGE], archive, fragment=fragment)
        # The device holds only the archive: unlock is what brings the image back.
        client.images.remove(DEMO_IMAGE, force=True)
    finally:
        client.close()


def curl_examples(url: str) -> str:
    (op, (op_pw, _)), (up, (up_pw, _)) = list(DEMO_USERS.items())[:2]
    operator = json.dumps({"email": op, "password": op_pw}, separators=(",", ":"))
    uploader = json.dumps({"email": up, "password": up_pw}, separators=(",", ":"))
    return f"""
Try it:
  J='Content-Type: application/json'
  curl -s {url}/health
  curl -s -X POST {url}/login -H "$J" -d '{operator}'
  curl -s -X POST {url}/load/{DEMO_MODEL} -H "$J" -d '{{"folder":"{DEMO_FOLDER}"}}' -o {DEMO_MODEL}
  sha256sum {DEMO_MODEL}    # {DEMO_MODEL_SHA256}
  curl -s -X POST {url}/load/{LEGACY_MODEL} -H "$J" -d '{{"folder":"{DEMO_FOLDER}"}}' -o {LEGACY_MODEL}
  sha256sum {LEGACY_MODEL}  # {LEGACY_MODEL_SHA256} (format 1: a warning in the log)
  curl -s -X POST {url}/login -H "$J" -d '{uploader}'
  curl -s -X POST {url}/upload/my-model.bin -F folder={DEMO_FOLDER} -F data=@{DEMO_MODEL}
  curl -s -X POST {url}/unlock -H "$J" -d '{operator}'
  curl -s {url}/unlock/status
  curl -s {url}/metrics
"""


def signature_notes(private_key: Path, public_key: Path) -> str:
    """How the loader started here treats signed manifests, and how to make it refuse unsigned ones."""
    return f"""
Signed manifests (contract section 9):
  the loader trusts   TRUSTED_PUBLISHERS={public_key}
  and signs uploads   PUBLISHER_KEY_FILE={private_key}
  {DEMO_MODEL} and what you upload through it are signed; {LEGACY_MODEL} (format 1) is not.
  To refuse every model no trusted publisher signed, stop (Ctrl-C) and start again with
    REQUIRE_SIGNATURE=true make run
  then {LEGACY_MODEL} is a 502 and {DEMO_MODEL} still loads.
"""


def run(data_dir: Path, port: int) -> int:
    from devstack.__main__ import _wait_for_signal, describe

    data_dir = data_dir.resolve()
    engine = loader = None
    with Stack(data_dir / "stack") as stack:
        try:
            seeded = seed(stack)
            host, engine = _engine(data_dir)
            archive = data_dir / "images.enc"
            _demo_archive(host, archive, seeded.key_fragment)
            private_key, public_key = stack.publisher_key_files
            env = {
                **os.environ,
                "RESOURCE_API_URL": stack.api_url,
                "LOADER_HOST": "127.0.0.1",
                "LOADER_PORT": str(port),
                "MODEL_CACHE_DIR": str(data_dir / "model-cache"),
                "IMAGES_PATH": str(archive),
                "DOCKER_HOST": host,
                "TRUSTED_PUBLISHERS": str(public_key),
                "PUBLISHER_KEY_FILE": str(private_key),
            }
            loader = subprocess.Popen([sys.executable, str(REPO_ROOT / "main.py")], cwd=REPO_ROOT, env=env)
            url = f"http://127.0.0.1:{port}"
            print(describe(stack), flush=True)
            print(
                f"Docker Engine {host}\nloader        {url}  (model cache {env['MODEL_CACHE_DIR']})",
                flush=True,
            )
            print(curl_examples(url), flush=True)
            print(signature_notes(private_key, public_key), flush=True)
            print("Ctrl-C stops everything.", flush=True)
            _wait_for_signal()
        finally:
            if loader is not None:
                loader.terminate()
                loader.wait(10)
            if engine is not None:
                engine.cleanup()
    return 0
