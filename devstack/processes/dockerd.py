"""A Docker Engine for the test suite: the one already running, or a private `dockerd` we start as root.

A private daemon must never touch the host's Docker state, and two of them (two test sessions, or one
next to the system's own dockerd) must be able to run side by side. So every path it writes to lives
under one directory of its own, and its flags are the ones found to work in a VM or an unprivileged-ish
CI container:

    --storage-driver=vfs           no overlayfs-on-overlayfs or kernel-module questions; slow but portable
    --iptables=false --ip-masq=false --bridge=none
                                   no host firewall or bridge changes; run containers with
                                   network_mode="host" (or "none")
    --containerd-namespace / --containerd-plugins-namespace
                                   dockerd 20.10 adopts a *system* containerd when /run/containerd has one;
                                   a namespace of our own keeps our containers apart from its others
    --config-file (an empty one)   a host /etc/docker/daemon.json must not clash with our flags

Use:

    with Dockerd() as engine:           # or engine.start() ... engine.stop()
        client = engine.client()
        import_image(client, "example/hello:1", {"hello.txt": b"hi"})
        engine.restart()                # same socket and data root; images survive
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import docker
from docker.errors import DockerException

from devstack.wait import until

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
START_TIMEOUT = 60.0
# dockerd gives running containers 15 s (its --shutdown-timeout) before it exits on SIGTERM.
STOP_TIMEOUT = 30.0
# sun_path is 108 bytes on Linux; a longer socket path fails inside dockerd with an obscure bind error.
_MAX_SOCKET_PATH = 107


class DockerdError(RuntimeError):
    """A Docker Engine could not be reached or started; the message says why."""


def ping(host: str, timeout: float = 3.0) -> bool:
    """True when the Docker Engine at `host` (a DOCKER_HOST URL) answers /_ping."""
    try:
        client = docker.DockerClient(base_url=host, timeout=timeout)
    except (DockerException, OSError):
        return False
    try:
        return bool(client.ping())
    except (DockerException, OSError):
        return False
    finally:
        client.close()


def running_engine() -> str | None:
    """DOCKER_HOST when set (and nothing else, so a user's choice is never second-guessed), else the
    default socket - whichever answers a ping; None when no engine is reachable."""
    host = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    return host if ping(host) else None


def _dockerd_major_version(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"version (\d+)\.", out)
    return int(match.group(1)) if match else 0


class ExternalEngine:
    """An engine someone else runs (DOCKER_HOST or the default socket): used as it is, never stopped."""

    owned = False

    def __init__(self, host: str):
        self.host = host

    @property
    def running(self) -> bool:
        return ping(self.host)

    def start(self) -> ExternalEngine:
        if not ping(self.host):
            raise DockerdError(f"the Docker Engine at {self.host} does not answer")
        return self

    def stop(self) -> None:
        """Not ours to stop."""

    cleanup = stop

    def restart(self) -> ExternalEngine:
        raise DockerdError(f"the Docker Engine at {self.host} is not ours to restart")

    def client(self, timeout: int = 300) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=timeout)

    def __repr__(self) -> str:
        return f"ExternalEngine(host={self.host!r})"


class Dockerd:
    """A private dockerd: everything it writes lives under `root` (a new temp dir by default, deleted by
    cleanup()); start(), stop() and restart() keep the same socket and data root."""

    owned = True

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        binary: str = "dockerd",
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ):
        self._remove_root = root is None
        # Short /tmp paths keep the unix sockets (ours and containerd's) under the sun_path limit.
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="azaion-dockerd-"))
        self.binary = binary
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.log_path = self.root / "dockerd.log"
        # Stable per root, so a restart finds its own containers again.
        self.namespace = "azaion-test-" + hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    def start(self) -> Dockerd:
        if self.running:
            return self
        self._check_can_start()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        (self.root / "exec").mkdir(exist_ok=True)
        self._write_config()
        # dockerd refuses to start while its pidfile names a live process; after a SIGKILL it is stale.
        (self.root / "docker.pid").unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop(), after dockerd is gone
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C meant for pytest must not kill the daemon before we stop it in order.
            start_new_session=True,
        )
        try:
            until(self._answers, self.start_timeout, every=0.25)
        except TimeoutError:
            self.stop()
            raise DockerdError(
                f"dockerd did not answer within {self.start_timeout:.0f} s:\n{self.log_tail()}"
            ) from None
        return self

    def _answers(self) -> bool:
        """Whether the starting dockerd answers yet; an error when it has exited instead."""
        if self._proc.poll() is not None:
            code = self._proc.returncode
            self._close_log()
            self._proc = None
            raise DockerdError(f"dockerd exited with code {code} while starting:\n{self.log_tail()}")
        return ping(self.host, timeout=2.0)

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL. Containers are stopped by dockerd itself on SIGTERM."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                # A killed dockerd cannot stop the containerd it started; that one is ours too.
                self._kill_pidfile(self.root / "exec" / "containerd" / "containerd.pid", "containerd")
        self._close_log()

    def restart(self) -> Dockerd:
        """Stop and start again on the same socket and data root (tests stop dockerd mid-unlock)."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop, then delete the root directory if we created it."""
        self.stop()
        if self._remove_root and self.root.exists():
            _unmount_under(self.root)
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- use -------------------------------------------------------------------------------------

    def client(self, timeout: int = 300) -> docker.DockerClient:
        """A client for this engine; builds and imports stream for minutes, hence the long timeout."""
        return docker.DockerClient(base_url=self.host, timeout=timeout)

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config-file={self.root / 'daemon.json'}",
            f"--host={self.host}",
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'docker.pid'}",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            f"--containerd-namespace={self.namespace}",
            f"--containerd-plugins-namespace={self.namespace}-plugins",
        ]

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no dockerd log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"Dockerd(host={self.host!r}, pid={self.pid})"

    # -- internals -------------------------------------------------------------------------------

    def _check_can_start(self) -> None:
        if shutil.which(self.binary) is None:
            raise DockerdError(f"{self.binary} not found (Debian package docker.io; scripts/system-deps)")
        if os.geteuid() != 0:
            raise DockerdError("no Docker Engine answers and starting a private dockerd needs root")
        if len(str(self.socket)) > _MAX_SOCKET_PATH:
            raise DockerdError(f"socket path too long for a unix socket: {self.socket}")

    def _write_config(self) -> None:
        config: dict[str, str] = {}
        if _dockerd_major_version(self.binary) < 23:
            # dockerd 20.10 otherwise writes its trust key to the host's /etc/docker/key.json.
            config["deprecated-key-path"] = str(self.root / "key.json")
        (self.root / "daemon.json").write_text(json.dumps(config))

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _kill_pidfile(pidfile: Path, name: str) -> None:
        try:
            pid = int(pidfile.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return
        if comm == name:  # the pid may have been reused by then
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _unmount_under(root: Path) -> None:
    """Lazily unmount whatever dockerd left mounted below `root` (shm, netns), so it can be deleted."""
    prefix = str(root.resolve()) + "/"
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[4] for line in mounts if line.split()[4].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def import_image(
    client: docker.DockerClient, tag: str, files: dict[str, bytes], changes: list[str] | None = None
) -> str:
    """`docker import` an image whose filesystem is exactly `files` (path -> content); returns its id.

    No registry and no base image needed. The tar is spooled (memory, then disk past 64 MiB), so a
    test can import a gigabyte-sized layer without holding it twice. Files starting with `#!` or an
    ELF header are made executable. `changes` are Dockerfile instructions (e.g. 'CMD ["/run"]').
    """
    repository, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
        with tarfile.open(fileobj=spool, mode="w") as tar:
            for path, content in sorted(files.items()):
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size = len(content)
                info.mode = 0o755 if content.startswith((b"#!", b"\x7fELF")) else 0o644
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(content))
        spool.seek(0)
        raw = client.api.import_image(src=spool, repository=repository, tag=version, changes=changes)
    for line in str(raw).splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if "error" in message:
                raise DockerdError(f"docker import of {tag} failed: {message['error']}")
    return client.images.get(f"{repository}:{version}").id


def remove_images(client: docker.DockerClient, tags: list[str]) -> None:
    """Remove images by tag; an image that is not there is what the caller wants anyway."""
    for tag in tags:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(tag, force=True)
