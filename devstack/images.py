"""Publisher side of unlock (contract section 5): local images -> the encrypted archive a device holds.

    python -m devstack publish-images --out images.enc [--fragment-file F] IMAGE [IMAGE ...]

`docker save` of the images is streamed through AES-256-CBC under SHA-256(fragment) into the output
file (written to a temporary name, then renamed), so nothing is held whole in memory. The fragment is
random unless given, and is registered with the reference Resource API when an admin client is passed.
"""

import os
import secrets
from pathlib import Path

import docker

from devstack import crypto

CHUNK = 1024 * 1024


def save_stream(client: docker.APIClient, images: list[str]):
    """The `docker save` tar of several images, as the Engine streams it (GET /images/get?names=...)."""
    resp = client._get(client._url("/images/get"), params={"names": images}, stream=True)
    client._raise_for_status(resp)
    yield from resp.iter_content(CHUNK)


def build_archive(docker_host: str | None, images: list[str], out: Path, fragment: bytes) -> int:
    """Writes the archive; returns its size in bytes."""
    client = (
        docker.APIClient(base_url=docker_host, timeout=3600)
        if docker_host
        else docker.APIClient(timeout=3600, **docker.utils.kwargs_from_env())
    )
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for piece in crypto.encrypt_stream(crypto.archive_key(fragment), save_stream(client, images)):
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        client.close()
    return out.stat().st_size


def publish_images(docker_host, images, out, admin=None, fragment: bytes | None = None) -> bytes:
    """Builds the archive and registers its fragment with the Resource API; returns the fragment."""
    fragment = fragment if fragment is not None else secrets.token_bytes(32)
    build_archive(docker_host, list(images), Path(out), fragment)
    if admin is not None:
        admin.set_key_fragment(fragment)
    return fragment
