"""The loader as a real process (``python main.py``) on a free loopback port, or on the Unix socket
LOADER_SOCKET names, for integration tests."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter

from devstack.ports import free_port
from devstack.wait import until

ROOT = Path(__file__).resolve().parents[2]  # devstack/processes/loader.py -> the repository


def proc_field(pid, name, file="status"):
    """An integer field of /proc/<pid>/<file> (status: VmHWM in kB; io: write_bytes in bytes)."""
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


class _UnixConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection to a Unix socket (the Host header stays the pool's: localhost)."""

    def __init__(self, *args, socket_path, **kw):
        super().__init__(*args, **kw)
        self.socket_path = socket_path

    def _new_conn(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if isinstance(self.timeout, int | float) else None)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            message = f"cannot connect to {self.socket_path}: {exc}"
            raise urllib3.exceptions.NewConnectionError(self, message) from exc
        return sock


class UnixSocketAdapter(HTTPAdapter):
    """requests over the Unix socket at ``path``, whatever the URL's host (mount it on http://localhost)."""

    def __init__(self, path):
        super().__init__()
        self._pool = urllib3.HTTPConnectionPool("localhost", maxsize=16)
        self._pool.ConnectionCls = _UnixConnection
        self._pool.conn_kw["socket_path"] = str(path)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self._pool

    def close(self):
        self._pool.close()
        super().close()


class LoaderProcess:
    """``env`` overrides the configuration; with LOADER_SOCKET the loader serves on that socket instead of
    TCP, and ``url``, ``get`` and ``post`` go through it (``url`` is then http://localhost)."""

    def __init__(self, workdir, **env):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / f"loader-{self.port}.log"
        self.env = {
            **os.environ,
            "LOADER_HOST": "127.0.0.1",
            "LOADER_PORT": str(self.port),
            "MODEL_CACHE_DIR": str(self.workdir / "cache"),
            "IMAGES_PATH": str(self.workdir / "images.enc"),
            "LOG_LEVEL": "INFO",
            "ALLOWED_HOSTS": "",  # not the test session's own (see tests/support/docker_fixtures.py)
            "LOADER_SOCKET": "",
            **{k: str(v) for k, v in env.items()},
        }
        self.socket = self.env["LOADER_SOCKET"] or None
        self.http = requests  # the module: its get and post, as every TCP loader has always been called
        if self.socket:
            self.url = "http://localhost"
            self.http = requests.Session()
            self.http.trust_env = False  # no proxy from the environment for a socket
            self.http.mount("http://localhost", UnixSocketAdapter(self.socket))
        self.proc = None

    def start(self, timeout=20):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py")],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        started = time.monotonic()
        until(self._healthy, timeout, "loader did not answer /health in time", every=0.05)
        self.started_in = time.monotonic() - started
        return self

    def _healthy(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"loader exited with {self.proc.returncode}: {self.log()[-2000:]}")
        try:
            return self.http.get(self.url + "/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        if self.http is not requests:
            self.http.close()

    def kill(self):
        self.stop(signal.SIGKILL)

    @property
    def pid(self):
        return self.proc.pid

    def peak_rss_mb(self):
        return proc_field(self.pid, "VmHWM") / 1024

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post(self, path, **kw):
        kw.setdefault("timeout", 120)
        return self.http.post(self.url + path, **kw)  # noqa: S113 - the timeout is set above

    def get(self, path, **kw):
        kw.setdefault("timeout", 30)
        return self.http.get(self.url + path, **kw)  # noqa: S113 - the timeout is set above

    def wait_unlock(self, timeout=600, done=lambda status: status["state"] in ("ready", "error"), every=0.1):
        """Poll /unlock/status until ``done(status)`` (by default: the unlock is ready or in error); that
        status."""
        seen = [None]

        def finished():
            seen[0] = self.get("/unlock/status").json()
            return seen[0] if done(seen[0]) else None

        return until(finished, timeout, lambda: f"unlock not done after {timeout}s: {seen[0]}", every)

    def cached_big_part(self, folder, name, timeout=30):
        """Path of the committed cache file of ``name``'s big part, once its sidecar is written (a download
        whose reader went away still finishes and commits on its own)."""
        path = Path(self.env["MODEL_CACHE_DIR"]) / folder / (name + ".big")
        meta = path.with_name(path.name + ".meta")
        until(meta.exists, timeout, f"{path} was not committed within {timeout}s", every=0.02)
        return path

    def login(self, email, password):
        return self.post("/login", json={"email": email, "password": password})

    def load(self, name, folder, **kw):
        return self.post(f"/load/{name}", json={"folder": folder}, **kw)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
