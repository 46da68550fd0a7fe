"""The Dockerfile builds and runs here: on a base image made from Debian packages (no registry pull), on
the suite's Docker Engine. The running container answers /health from the host, runs as non-root, and
its filesystem holds the compiled extensions but no sources, no compiler and no tests.
"""

import collections
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import docker
import httpx
import pytest

from tests.support.docker_fixtures import unavailable

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "azaion-loader-base:bookworm"
ROOTFS_LABEL = "org.azaion.test.rootfs"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = os.environ.get("AZAION_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBOOTSTRAP_ARGS = ["--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm"]
# Debian point releases and security updates move on; an older tarball is rebuilt.
CACHE_MAX_AGE = 7 * 24 * 3600
BIN_DIRS = {"bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "opt/venv/bin"}
# gcc, gcc-12, x86_64-linux-gnu-gcc-12, aarch64-linux-gnu-ld ... and Cython's command-line tools.
COMPILER = re.compile(
    r"^(?:[\w.]+-linux-gnu\w*-)?(?:cc|c\+\+|gcc|g\+\+|cpp|clang|tcc|as|ld|cython|cythonize)(?:-[\d.]+)?$"
)


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
        stale.unlink(missing_ok=True)
    for abandoned in cache.glob(".debootstrap-*"):
        # Left by a killed session; a live one finishes within debootstrap's 20 min timeout.
        if time.time() - abandoned.stat().st_mtime > 3600:
            _unmount_under(abandoned)
            shutil.rmtree(abandoned, ignore_errors=True)
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
    with contextlib.suppress(docker.errors.ImageNotFound):
        if client.images.get(BASE_IMAGE).labels.get(ROOTFS_LABEL) == tarball.name:
            # A re-import would get a new id and throw away the engine's build cache for nothing.
            _log(f"docker import: {BASE_IMAGE} is already this tarball")
            return BASE_IMAGE
    repository, tag = BASE_IMAGE.split(":")
    started = time.monotonic()
    raw = client.api.import_image(
        src=str(tarball),
        repository=repository,
        tag=tag,
        changes=[f"ENV PIP_CERT={CA_BUNDLE}", f"LABEL {ROOTFS_LABEL}={tarball.name}"],
    )
    assert "error" not in str(raw), raw
    _log(f"docker import {BASE_IMAGE}: {time.monotonic() - started:.0f} s")
    # Left in place on a shared engine: it is deterministic, and another session may be building on it.
    return BASE_IMAGE


def _build(client, tag: str, base_image: str, target: str | None = None) -> float:
    """`docker build --network host` of the repository (the SDK honours .dockerignore); returns seconds."""
    started = time.monotonic()
    output: list[str] = []
    chunks = client.api.build(
        path=str(ROOT),
        tag=tag,
        target=target,
        buildargs={"BASE_IMAGE": base_image},
        network_mode="host",
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
    )
    for chunk in chunks:
        if "stream" in chunk:
            output.append(chunk["stream"])
            if chunk["stream"].startswith("Step "):
                _log(f"{time.monotonic() - started:6.0f} s  {chunk['stream'].strip()[:100]}")
        if "error" in chunk:
            pytest.fail(f"docker build failed: {chunk['error']}\n{''.join(output)[-6000:]}", pytrace=False)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def image(dockerd, base_image):
    """The image the repository's Dockerfile makes on BASE_IMAGE."""
    client = dockerd.client(timeout=1800)
    tag = f"azaion-loader:test-{uuid.uuid4().hex[:8]}"
    seconds = _build(client, tag, base_image)
    built = client.images.get(tag)
    _log(f"docker build: {seconds:.0f} s; image size {built.attrs['Size'] / 1e6:.0f} MB")
    yield built
    # noprune keeps the parent layers: they are the engine's build cache for the next run.
    client.images.remove(built.id, force=True, noprune=True)


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
        running.remove(force=True, v=True)


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


def test_model_cache_volume_is_writable_by_the_service_user(container, image):
    running, _ = container
    cache = dict(item.split("=", 1) for item in image.attrs["Config"]["Env"])["MODEL_CACHE_DIR"]
    result = running.exec_run(["python3", "-c", f"open('{cache}/probe', 'w').write('ok')"])
    assert result.exit_code == 0, result.output.decode(errors="replace")


def test_configuration_for_a_device(image):
    config = image.attrs["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["LOADER_HOST"] == "0.0.0.0"
    assert {env["MODEL_CACHE_DIR"], str(PurePosixPath(env["IMAGES_PATH"]).parent)} <= set(config["Volumes"])


def _export_names(client, image: str) -> dict[str, tarfile.TarInfo]:
    """Every path in `image` (a `docker export` of a created, never started container), read as it streams."""
    created = client.containers.create(image, command=["/none"])
    try:
        stream = io.BufferedReader(_IterStream(created.export()), buffer_size=1 << 20)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            return {member.name.removeprefix("./").rstrip("/"): member for member in tar}
    finally:
        created.remove(force=True, v=True)


@pytest.fixture(scope="module")
def files(dockerd, image) -> dict[str, tarfile.TarInfo]:
    names = _export_names(dockerd.client(timeout=900), image.id)
    top = collections.Counter(name.split("/")[0] for name in names)
    site = sorted({n.split("/")[5] for n in names if n.startswith("opt/venv/lib/") and n.count("/") > 5})
    _log(f"{len(names)} paths; per top-level dir: {dict(sorted(top.items()))}")
    _log(f"/opt/venv site-packages: {site}")
    return names


@pytest.fixture(scope="module")
def added_files(dockerd, base_image, files) -> set[str]:
    """What the Dockerfile put on top of the base (Debian's own docs ship an example .c file)."""
    return set(files) - set(_export_names(dockerd.client(timeout=900), base_image))


class _IterStream(io.RawIOBase):
    """A file object over an iterator of byte chunks."""

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


def test_app_is_main_py_and_every_compiled_module(files):
    modules = sorted(p.stem for p in ROOT.glob("*.pyx"))
    app = sorted(name.removeprefix("app/") for name in files if name.startswith("app/"))
    _log(f"/app: {app}")
    assert "main.py" in app
    for module in modules:
        assert any(f.startswith(f"{module}.cpython-") and f.endswith(".so") for f in app), (module, app)
    assert set(app) == {"main.py"} | {f for f in app if f.endswith(".so")}, "only main.py and .so in /app"


def test_no_source_code_added(added_files):
    _log(f"{len(added_files)} paths added on top of the base image")
    sources = sorted(name for name in added_files if name.endswith((".pyx", ".pxd", ".pxi", ".c", ".h")))
    assert not sources, sources


def _compilers(files: dict[str, tarfile.TarInfo]) -> list[str]:
    found = []
    for name, info in files.items():
        path = PurePosixPath(name)
        if info.isdir():
            continue
        if (str(path.parent) in BIN_DIRS and COMPILER.match(path.name)) or path.name in ("cc1", "cc1plus"):
            found.append(name)
    return sorted(found)


def test_no_compiler_or_build_tools(files):
    assert not _compilers(files)
    build_only = [name for name in files if PurePosixPath(name).name.lower() in ("cython", "python.h")]
    assert not build_only, build_only
    assert not any(name.startswith("opt/build") for name in files), "the build venv stays in the build stage"


def test_compiler_check_finds_the_build_stage_compiler(dockerd, base_image, image):
    """The check above can fail: the build stage (cached by the image build) does hold a compiler."""
    client = dockerd.client(timeout=1800)
    tag = f"azaion-loader-build:test-{uuid.uuid4().hex[:8]}"
    _build(client, tag, base_image, target="build")
    try:
        compilers = _compilers(_export_names(client, tag))
    finally:
        client.images.remove(tag, force=True, noprune=True)
    assert any(name.endswith("bin/gcc") for name in compilers), compilers


def test_no_tests(files):
    assert not [name for name in files if name.split("/")[:2] in (["app", "tests"], ["tests"])]
