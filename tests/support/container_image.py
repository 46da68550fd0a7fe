"""Building the loader's image for one architecture on a Debian base made here, without a registry pull.

The pieces tests/integration/test_container_image.py puts together, the same for every architecture:

    arch = ARCHES["arm64"]
    tarball = bookworm_rootfs(cache, arch)          # debootstrap --arch=arm64, cached for a week
    load_base(client, arch, tarball, tag)           # a `docker save` archive whose config says arm64
    seconds = build(client, tag, base, arch)        # docker build --platform linux/arm64 --network host
    files, machines = export(client, tag)           # every path, and every ELF file's e_machine

What differs between architectures is only data (`Arch`): the debootstrap and Docker name, the ELF
machine, the triplet in extension names, and whether the kernel runs it through qemu (binfmt_misc).

`docker import` would label an arm64 rootfs amd64 whatever `--platform` says, and `docker build
--platform linux/arm64` then refuses it; `docker load` of an archive whose config names the
architecture does not, so every base is loaded that way (x86-64 too: one path for both).

Builds take long (on two busy cores with the vfs driver: 13 minutes for arm64 under emulation, 8 for
x86-64), so each image (and the build stage the compiler check looks at) is kept as a `docker save`
archive, keyed by everything that goes into it (`image_key`): the build context's files and the base
image id (the base changes whenever debootstrap runs again, at least weekly).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parents[2]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = os.environ.get("AZAION_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBOOTSTRAP_ARGS = ["--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm"]
ROOTFS_LABEL = "org.azaion.test.rootfs"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# Debian point releases and security updates move on; an older tarball is rebuilt.
CACHE_MAX_AGE = 7 * 24 * 3600
DEFAULT_CACHE = "/var/cache/azaion-loader-tests"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The tag a cached image archive carries (`docker load -i` restores it); stage: "" or "-build".
CACHED_NAME = "azaion-loader-test:{arch}{stage}"


@functools.cache
def native_arch() -> str:
    """This machine's architecture by its Debian (and Docker) name: amd64, arm64, ..."""
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


@dataclass(frozen=True)
class Arch:
    name: str  # Debian's and Docker's name
    elf_machine: int  # e_machine in the ELF header
    triplet: str  # in extension names: main.cpython-311-aarch64-linux-gnu.so
    qemu: str  # the binfmt_misc entry that runs it on another machine
    variant: str = ""  # Docker's platform variant

    @property
    def platform(self) -> str:
        return f"linux/{self.name}"

    @property
    def emulated(self) -> bool:
        return self.name != native_arch()

    def __str__(self) -> str:
        return self.name


ARCHES = {
    "amd64": Arch("amd64", 0x3E, "x86_64-linux-gnu", "qemu-x86_64"),
    "arm64": Arch("arm64", 0xB7, "aarch64-linux-gnu", "qemu-aarch64", variant="v8"),
}


def emulation_problem(arch: Arch) -> str | None:
    """Why this machine cannot run `arch`'s programs, or None when it can (natively or through qemu).

    Containers and chroots need the fix-binary flag (F): the kernel then opens the interpreter here,
    once, instead of looking for it inside their filesystem."""
    if not arch.emulated:
        return None
    entry = BINFMT / arch.qemu
    how = "scripts/system-deps installs qemu-user-static and binfmt-support and registers it, as root"
    if not (BINFMT / "register").exists():
        return f"binfmt_misc is not mounted at {BINFMT}, so {arch} programs cannot run here ({how})"
    try:
        lines = entry.read_text().splitlines()
    except OSError:
        return f"{arch.qemu} is not registered in binfmt_misc, so {arch} programs cannot run here ({how})"
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags:")), "")
    if "enabled" not in lines:
        return f"{entry} is disabled ({how})"
    if "F" not in flags:
        return f"{entry} lacks the fix-binary flag (F): containers cannot find its interpreter ({how})"
    return None


def elf_machine(head: bytes) -> int | None:
    """e_machine of an ELF file from its first 20 bytes, or None when it is not ELF."""
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    return struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)[0]


# --- the cache --------------------------------------------------------------------------------------


def cache_dir(fallback: Callable[[], Path]) -> Path:
    """Where cached tarballs and images outlive the session (and the clone): $AZAION_TEST_CACHE, else
    /var/cache/azaion-loader-tests, else `fallback()` (a temp dir: nothing is kept)."""
    for candidate in (os.environ.get("AZAION_TEST_CACHE"), DEFAULT_CACHE):
        if candidate:
            try:
                Path(candidate).mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(candidate, os.W_OK):
                return Path(candidate)
    return fallback()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock: two sessions on one machine make one tarball or image, and the
    second uses it."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fresh(path: Path) -> bool:
    return path.exists() and time.time() - path.stat().st_mtime < CACHE_MAX_AGE


def _unmount_under(root: Path) -> None:
    # An interrupted debootstrap leaves /proc and /sys mounted in the chroot; rmtree would descend into them.
    prefix = str(root.resolve()) + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


class BuildError(RuntimeError):
    """debootstrap or docker build failed; the message carries their output."""


# --- the base ---------------------------------------------------------------------------------------


def bookworm_rootfs(cache: Path, arch: Arch, log: Callable[[str], None] = print) -> Path:
    """A tar of `debootstrap --arch=<arch> --variant=minbase` bookworm with python3 and venv, carrying
    the host's CA bundle (the package registries' TLS certificates are only trusted by it). Cached for
    CACHE_MAX_AGE; a foreign architecture's second stage runs through qemu (about 4 minutes for arm64)."""
    key = hashlib.sha256(
        json.dumps([DEBOOTSTRAP_ARGS, DEBIAN_MIRROR, arch.name]).encode() + CA_BUNDLE.read_bytes()
    ).hexdigest()[:16]
    tarball = cache / f"bookworm-minbase-{arch}-{key}.tar"
    with locked(cache / f"bookworm-minbase-{arch}"):
        if _fresh(tarball):
            log(f"debootstrap {arch}: cached {tarball}")
            return tarball
        for stale in cache.glob(f"bookworm-minbase-{arch}-*.tar"):
            stale.unlink(missing_ok=True)
        for abandoned in cache.glob(".debootstrap-*"):
            # Left by a killed session; a live one finishes within debootstrap's timeout.
            if time.time() - abandoned.stat().st_mtime > 3 * 3600:
                _unmount_under(abandoned)
                shutil.rmtree(abandoned, ignore_errors=True)
        # Debootstrap needs a real directory with device nodes; the tmp dir is next to the cache so the
        # finished tarball moves into place atomically and a half-written one is never reused.
        work = Path(tempfile.mkdtemp(prefix=".debootstrap-", dir=cache))
        try:
            started = time.monotonic()
            rootfs = work / "rootfs"
            result = subprocess.run(
                ["debootstrap", f"--arch={arch}", *DEBOOTSTRAP_ARGS, str(rootfs), DEBIAN_MIRROR],
                capture_output=True,
                text=True,
                timeout=3600 if arch.emulated else 1200,
                check=False,
            )
            if result.returncode != 0:
                raise BuildError(
                    f"debootstrap --arch={arch} failed ({result.returncode}):\n{result.stdout[-3000:]}"
                    f"\n{result.stderr[-3000:]}"
                )
            log(f"debootstrap {arch}: {time.monotonic() - started:.0f} s")
            shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
            partial = work / "rootfs.tar"
            subprocess.run(
                ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], check=True
            )
            os.replace(partial, tarball)
        finally:
            _unmount_under(work)
            shutil.rmtree(work, ignore_errors=True)
    return tarball


def _tar_member(name: str, size: int, chunks: Iterator[bytes]) -> Iterator[bytes]:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    yield info.tobuf(format=tarfile.GNU_FORMAT)
    yield from chunks
    yield b"\0" * (-size % tarfile.BLOCKSIZE)


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def base_archive(tarball: Path, arch: Arch, tag: str) -> Iterator[bytes]:
    """`tarball` (a root filesystem) as a `docker save` archive of one layer, streamed: its config names
    `arch`, so `docker build --platform` accepts it as a base. Deterministic: one tarball, one image id."""
    layer = _sha256_file(tarball)
    config = {
        "architecture": arch.name,
        **({"variant": arch.variant} if arch.variant else {}),
        "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(tarball.stat().st_mtime)),
        "config": {
            "Env": [f"PATH={PATH}", f"PIP_CERT={CA_BUNDLE}"],
            "Cmd": ["/bin/bash"],
            "Labels": {ROOTFS_LABEL: tarball.name},
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer}"]},
        "history": [{"created_by": f"debootstrap --arch={arch} {' '.join(DEBOOTSTRAP_ARGS)}"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{layer}/layer.tar"]}]
    ).encode()
    yield from _tar_member(f"{layer}/layer.tar", tarball.stat().st_size, _file_chunks(tarball))
    yield from _tar_member(config_name, len(config_bytes), iter([config_bytes]))
    yield from _tar_member("manifest.json", len(manifest), iter([manifest]))
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def load_base(client: docker.DockerClient, arch: Arch, tarball: Path, tag: str) -> str:
    """`tag` on the engine: `tarball` loaded as an `arch` image, unless it is already there (a shared
    engine keeps it, and loading again would cost the transfer). Returns the image id."""
    with contextlib.suppress(docker.errors.ImageNotFound):
        present = client.images.get(tag)
        if present.labels.get(ROOTFS_LABEL) == tarball.name and present.attrs["Architecture"] == arch.name:
            return present.id
    client.images.load(base_archive(tarball, arch, tag))
    loaded = client.images.get(tag)
    assert loaded.attrs["Architecture"] == arch.name, loaded.attrs["Architecture"]
    return loaded.id


# --- the image --------------------------------------------------------------------------------------


def context_files() -> list[Path]:
    """The build context: what `.dockerignore` (an allow-list: `*`, then `!pattern` lines) lets through."""
    patterns = [
        line.strip()[1:]
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip().startswith("!")
    ]
    return sorted({path for pattern in patterns for path in ROOT.glob(pattern) if path.is_file()})


def image_key(arch: Arch, base_id: str) -> str:
    """What an image built now from this checkout would be made of: the base image and the context."""
    digest = hashlib.sha256(f"{arch.platform}\0{base_id}\0".encode())
    for path in context_files():
        digest.update(f"{path.relative_to(ROOT)}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(
    client: docker.DockerClient,
    tag: str,
    base: str,
    arch: Arch,
    target: str | None = None,
    log: Callable[[str], None] = print,
) -> float:
    """`docker build --network host --platform <arch>` of the repository (the SDK honours .dockerignore)
    on `base`; returns seconds."""
    started = time.monotonic()
    output: list[str] = []
    chunks = client.api.build(
        path=str(ROOT),
        tag=tag,
        target=target,
        buildargs={"BASE_IMAGE": base},
        platform=arch.platform,
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
                log(f"{arch} {time.monotonic() - started:6.0f} s  {chunk['stream'].strip()[:100]}")
        if "error" in chunk:
            raise BuildError(f"docker build failed: {chunk['error']}\n{''.join(output)[-6000:]}")
    return time.monotonic() - started


def cached_build(
    client: docker.DockerClient,
    tag: str,
    base: str,
    arch: Arch,
    cache: Path,
    target: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """`build` (of `target`, a stage of the Dockerfile, or the image), or the image a build of the same
    context on the same base made before (`image_key`), loaded from its `docker save` archive in `cache`.
    Returns the sidecar: build seconds, when, whether it came from the cache."""
    stage = target or "image"
    base_id = client.images.get(base).id
    archive = cache / f"azaion-loader-{arch}-{stage}-{image_key(arch, base_id)}.tar"
    sidecar = archive.with_suffix(".json")
    # Saved under a name of its own, so `docker load -i <archive>` by hand gives a usable tag.
    name = CACHED_NAME.format(arch=arch, stage="" if target is None else f"-{target}")
    with locked(cache / f"azaion-loader-{arch}-{stage}"):
        if _fresh(archive) and sidecar.exists():
            started = time.monotonic()
            try:
                loaded = client.images.load(_file_chunks(archive))
                if len(loaded) != 1:
                    raise docker.errors.ImageLoadError(f"{len(loaded)} images in the archive")
            except docker.errors.DockerException as exc:
                log(f"{archive.name} does not load ({exc}): building again")
            else:
                loaded[0].tag(*tag.rsplit(":", 1))
                info = json.loads(sidecar.read_text())
                log(
                    f"docker build {arch} {stage}: cached {archive.name} (built in"
                    f" {info['build_seconds']:.0f} s on {info['built']}), loaded in"
                    f" {time.monotonic() - started:.0f} s"
                )
                return {**info, "cached": True}
        seconds = build(client, tag, base, arch, target=target, log=log)
        for stale in cache.glob(f"azaion-loader-{arch}-{stage}-*"):
            stale.unlink(missing_ok=True)
        client.images.get(tag).tag(*name.split(":"))
        partial = archive.with_name(f".{archive.name}.{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                for chunk in client.api.get_image(name, chunk_size=1 << 20):
                    f.write(chunk)
            os.replace(partial, archive)
        finally:
            partial.unlink(missing_ok=True)
        info = {"build_seconds": round(seconds), "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        sidecar.write_text(json.dumps(info))
        return {**info, "cached": False}


# --- what is in it ----------------------------------------------------------------------------------


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


def export(client: docker.DockerClient, image: str) -> tuple[dict[str, tarfile.TarInfo], dict[str, int]]:
    """Every path in `image` (a `docker export` of a created, never started container, read as it
    streams), and the ELF machine of every regular file that is ELF."""
    created = client.containers.create(image, command=["/none"])
    files: dict[str, tarfile.TarInfo] = {}
    machines: dict[str, int] = {}
    try:
        stream = io.BufferedReader(_IterStream(created.export()), buffer_size=1 << 20)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                files[name] = member
                if member.isreg() and member.size >= 20:
                    machine = elf_machine(tar.extractfile(member).read(20))
                    if machine is not None:
                        machines[name] = machine
    finally:
        created.remove(force=True, v=True)
    return files, machines


# --- by hand ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Builds the image for one architecture as the tests do, on the engine at DOCKER_HOST."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tests.support.container_image",
        description="Build the loader's image for ARCH from this checkout's Dockerfile on a Debian bookworm"
        " base made with debootstrap (no registry pull), on the Docker Engine at DOCKER_HOST (default:"
        " /var/run/docker.sock), sharing the test suite's cache. Needs root (debootstrap), and for a"
        " foreign ARCH qemu registered in binfmt_misc (scripts/system-deps).",
    )
    parser.add_argument("arch", nargs="?", default="arm64", choices=sorted(ARCHES))
    parser.add_argument("--tag", help="default: azaion-loader:ARCH")
    args = parser.parse_args(argv)
    arch = ARCHES[args.arch]
    tag = args.tag or f"azaion-loader:{arch}"
    problem = emulation_problem(arch)
    if problem:
        print(problem)
        return 1
    client = docker.from_env(timeout=3600)
    cache = cache_dir(lambda: Path(tempfile.mkdtemp(prefix="azaion-image-cache-")))
    try:
        tarball = bookworm_rootfs(cache, arch)
        base = f"azaion-loader-base:bookworm-{arch}"
        load_base(client, arch, tarball, base)
        info = cached_build(client, tag, base, arch, cache)
    except BuildError as exc:
        print(exc)
        return 1
    image = client.images.get(tag)
    print(
        f"{tag}: {image.attrs['Architecture']}, {image.attrs['Size'] / 1e6:.0f} MB, built in"
        f" {info['build_seconds']} s{' (from the cache)' if info['cached'] else ''}\n"
        f"try it: docker run -d --platform {arch.platform} -p 127.0.0.1:8080:8080 {tag}"
        " && curl -s http://127.0.0.1:8080/health"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
