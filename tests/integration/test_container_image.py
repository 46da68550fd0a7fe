"""The Dockerfile builds and runs here: on a base image made from Debian packages (no registry pull), on
the suite's Docker Engine. The running container answers /health from the host, runs as non-root, and
its filesystem holds the compiled extensions but no sources, no compiler and no tests.
"""

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import httpx
import pytest

from tests.support.docker_fixtures import unavailable

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "azaion-loader-base:bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = os.environ.get("AZAION_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBOOTSTRAP_ARGS = ["--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm"]
# Debian point releases and security updates move on; an older tarball is rebuilt.
CACHE_MAX_AGE = 7 * 24 * 3600
COMPILERS = {"gcc", "cc", "c++", "g++", "cpp", "clang", "tcc", "cc1", "as", "ld", "cython", "cythonize"}


def _log(message: str) -> None:
    print(f"[container-image] {message}", flush=True)


def _cache_dir(tmp_path_factory) -> Path:
    """Where the debootstrap tarball outlives the session: $AZAION_TEST_CACHE, else /var/cache."""
    for candidate in (os.environ.get("AZAION_TEST_CACHE"), "/var/cache/azaion-loader-tests"):
        if candidate:
            try:
                Path(candidate).mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(candidate, os.W_OK):
                return Path(candidate)
    return tmp_path_factory.mktemp("debootstrap-cache")


def _unmount_under(root: Path) -> None:
    # An interrupted debootstrap leaves /proc and /sys mounted in the chroot; rmtree would descend into them.
    prefix = str(root.resolve()) + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _bookworm_rootfs(cache: Path) -> Path:
    """A tar of `debootstrap --variant=minbase` bookworm with python3 and venv, carrying the host's CA
    bundle (the package registries' TLS certificates are only trusted by it). Cached between runs."""
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    key = hashlib.sha256(
        json.dumps([DEBOOTSTRAP_ARGS, DEBIAN_MIRROR, arch]).encode() + CA_BUNDLE.read_bytes()
    ).hexdigest()[:16]
    tarball = cache / f"bookworm-minbase-{arch}-{key}.tar"
    if tarball.exists() and time.time() - tarball.stat().st_mtime < CACHE_MAX_AGE:
        _log(f"debootstrap: cached {tarball}")
        return tarball
    for stale in cache.glob("bookworm-minbase-*.tar"):
        stale.unlink()
    # Debootstrap needs a real directory with device nodes; the tmp dir is next to the cache so the
    # finished tarball moves into place atomically and a half-written one is never reused.
    work = Path(tempfile.mkdtemp(prefix=".debootstrap-", dir=cache))
    try:
        started = time.monotonic()
        rootfs = work / "rootfs"
        result = subprocess.run(
            ["debootstrap", *DEBOOTSTRAP_ARGS, str(rootfs), DEBIAN_MIRROR],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(
                f"debootstrap failed ({result.returncode}):\n{result.stdout[-3000:]}"
                f"\n{result.stderr[-3000:]}",
                pytrace=False,
            )
        _log(f"debootstrap: {time.monotonic() - started:.0f} s")
        shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        partial = work / "rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        os.replace(partial, tarball)
    finally:
        _unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    return tarball


@pytest.fixture(scope="module")
def base_image(dockerd, tmp_path_factory) -> str:
    """BASE_IMAGE, imported from the debootstrap tarball: the base the Dockerfile is told to use."""
    if os.geteuid() != 0:
        unavailable("building the Debian base image with debootstrap needs root")
    if shutil.which("debootstrap") is None:
        unavailable("debootstrap is missing (scripts/system-deps installs it)")
    tarball = _bookworm_rootfs(_cache_dir(tmp_path_factory))
    client = dockerd.client(timeout=900)
    repository, tag = BASE_IMAGE.split(":")
    started = time.monotonic()
    raw = client.api.import_image(
        src=str(tarball), repository=repository, tag=tag, changes=[f"ENV PIP_CERT={CA_BUNDLE}"]
    )
    assert "error" not in str(raw), raw
    _log(f"docker import {BASE_IMAGE}: {time.monotonic() - started:.0f} s")
    # Left in place on a shared engine: it is deterministic, and another session may be building on it.
    return BASE_IMAGE


@pytest.fixture(scope="module")
def image(dockerd, base_image):
    """The repository's Dockerfile built from the repository itself (the SDK honours .dockerignore)."""
    client = dockerd.client(timeout=1800)
    tag = f"azaion-loader:test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    output: list[str] = []
    for chunk in client.api.build(
        path=str(ROOT),
        tag=tag,
        buildargs={"BASE_IMAGE": base_image},
        network_mode="host",
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
    ):
        if "stream" in chunk:
            output.append(chunk["stream"])
            if chunk["stream"].startswith("Step "):
                _log(f"{time.monotonic() - started:6.0f} s  {chunk['stream'].strip()[:100]}")
        if "error" in chunk:
            pytest.fail(f"docker build failed: {chunk['error']}\n{''.join(output)[-6000:]}", pytrace=False)
    built = client.images.get(tag)
    _log(f"docker build: {time.monotonic() - started:.0f} s; image size {built.attrs['Size'] / 1e6:.0f} MB")
    yield built
    client.images.remove(built.id, force=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _engine_address(host: str) -> str:
    """Where a host-network container listens, seen from here: this machine, or a tcp engine's host."""
    if host.startswith(("tcp://", "http://", "https://")):
        return urlparse(host).hostname or "127.0.0.1"
    return "127.0.0.1"


@pytest.fixture(scope="module")
def container(dockerd, image):
    client = dockerd.client()
    port = _free_port()
    running = client.containers.run(
        image.id,
        detach=True,
        network_mode="host",
        environment={"LOADER_PORT": str(port)},
        name=f"azaion-loader-test-{uuid.uuid4().hex[:8]}",
    )
    url = f"http://{_engine_address(dockerd.host)}:{port}/health"
    try:
        deadline = time.monotonic() + 60
        while True:
            running.reload()
            logs = running.logs().decode(errors="replace")
            if running.status == "exited":
                pytest.fail(f"the container exited:\n{logs}", pytrace=False)
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url} within 60 s:\n{logs}", pytrace=False)
            time.sleep(0.5)
        yield running, url
    finally:
        running.remove(force=True)


def test_health_answers_from_the_host(container):
    _, url = container
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "healthy"}


def test_healthcheck_command_passes_inside(container, image):
    running, _ = container
    check = image.attrs["Config"]["Healthcheck"]["Test"]
    assert check[0] == "CMD", check
    result = running.exec_run(check[1:])
    assert result.exit_code == 0, result.output.decode(errors="replace")


def test_runs_as_non_root(container, image):
    running, _ = container
    user = image.attrs["Config"]["User"]
    assert user and user.split(":")[0] not in ("0", "root"), f"image user is {user!r}"
    result = running.exec_run(["python3", "-c", "import os; print(os.getuid(), os.getgid())"])
    uid, gid = map(int, result.output.split())
    assert uid != 0 and gid != 0


def test_configuration_for_a_device(image):
    config = image.attrs["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["LOADER_HOST"] == "0.0.0.0"
    assert {env["MODEL_CACHE_DIR"], str(PurePosixPath(env["IMAGES_PATH"]).parent)} <= set(config["Volumes"])


@pytest.fixture(scope="module")
def files(dockerd, image) -> dict[str, tarfile.TarInfo]:
    """Every path in the image's filesystem (a `docker export` of a created, never started container)."""
    client = dockerd.client(timeout=900)
    created = client.containers.create(image.id)
    try:
        stream = io.BufferedReader(_IterStream(created.export()), buffer_size=1 << 20)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            return {member.name.removeprefix("./").rstrip("/"): member for member in tar}
    finally:
        created.remove(force=True)


class _IterStream(io.RawIOBase):
    """A file object over the export's chunks, so the tar is read as it streams, not held whole."""

    def __init__(self, chunks):
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size], self._pending = self._pending[:size], self._pending[size:]
        return size


def test_image_holds_compiled_modules_and_nothing_to_build_them(files, image):
    modules = sorted(p.stem for p in ROOT.glob("*.pyx"))
    app = sorted(name.split("/", 1)[1] for name in files if name.startswith("app/"))
    _log(f"image size {image.attrs['Size'] / 1e6:.0f} MB; /app: {app}")
    assert "app/main.py" in files
    for module in modules:
        assert any(f.startswith(f"{module}.cpython-") and f.endswith(".so") for f in app), (module, app)
    assert set(app) == {"main.py"} | {f for f in app if f.endswith(".so")}, "only main.py and .so in /app"

    sources = [name for name in files if name.endswith((".pyx", ".pxd", ".c"))]
    assert not sources, sources
    compilers = [name for name in files if PurePosixPath(name).name in COMPILERS or "-linux-gnu-gcc" in name]
    assert not compilers, compilers
    assert not any(PurePosixPath(name).name.lower() == "cython" for name in files), "Cython is build-only"
    assert not any(name == "app/tests" or name.startswith(("app/tests/", "tests/")) for name in files)
