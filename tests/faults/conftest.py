"""Fault and hostile-input tests reuse the integration fixtures: one devstack (SeaweedFS + the reference
Resource API), the fault proxy in front of the CDN, fresh accounts, and the loader as ``python main.py``.

Helpers here start loader variants (other limits, another cache directory) and watch what a loader
leaves behind: its files and its memory.
"""

import contextlib
import hashlib
import json
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

from devstack.processes.loader import LoaderProcess
from devstack.wait import until
from tests.integration import conftest as integration
from tests.support.docker_fixtures import unavailable

# The integration fixtures, re-exported: pytest finds a conftest's fixtures by its attributes.
stack = integration.stack
cdn_proxy = integration.cdn_proxy
proxy = integration.proxy
user = integration.user
uploader = integration.uploader
loader = integration.loader
PASSWORD = integration.PASSWORD

MiB = 1024 * 1024
BLOCK = 4 * MiB  # a manifest's blockSize (contract section 7)
TAIL = 32  # the bytes at a big part's end a load checks first: the loader fetches their block first


def model_name(prefix="f"):
    return f"{prefix}-{os.urandom(4).hex()}.bin"


def start_loader(workdir, stack, **env):
    """A loader against the devstack; ``env`` overrides its configuration (API_TIMEOUT, limits...). It
    trusts the stack's publisher key: models published with ``signer=stack.publisher`` load, unsigned too."""
    env.setdefault("RESOURCE_API_URL", stack.api_url)
    env.setdefault("API_TIMEOUT", 5)
    env.setdefault("TRUSTED_PUBLISHERS", stack.publisher_key_files[1])
    return LoaderProcess(workdir, **env)


def files_under(root):
    """Every regular file below ``root``, as paths relative to it."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def api_faults(stack):
    """The reference API with fresh call counters, and its injected faults cleared after the test."""
    stack.clear_faults()
    stack.reset_counters()
    yield stack
    stack.clear_faults()


class Tmpfs:
    """A size-limited tmpfs, so "the disk is full" is a real ENOSPC from the kernel."""

    def __init__(self, path, size):
        self.path = Path(path)
        self.size = size

    def mount(self):
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)], check=True
        )
        return self

    def resize(self, size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)
        self.size = size

    def used(self):
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def umount(self):
        """Unmount once nothing holds it open any more (a loader just stopped may still), lazily at last."""
        try:
            until(self._unmounted, 5, every=0.1)
        except TimeoutError:
            subprocess.run(["umount", "-l", str(self.path)], check=False)

    def _unmounted(self):
        return subprocess.run(["umount", str(self.path)], capture_output=True).returncode == 0


@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of ``size`` mounted at ``path`` for the block (root needed: skipped without, failed in CI)."""
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs for a small disk needs root")
    disk = Tmpfs(path, size)
    try:
        disk.mount()
    except subprocess.CalledProcessError as exc:
        unavailable(f"cannot mount a tmpfs here: {exc}")
    try:
        yield disk
    finally:
        disk.umount()


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB cache disk."""
    with tmpfs(tmp_path / "cache", "8m") as disk:
        yield disk


# --- field transfers (contract section 8): what a download leaves on the disk, and what it shows ---------


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def tail_start(size):
    """Where a big part's tail segment starts (the block holding its last TAIL bytes), fetched first."""
    return max(0, size - TAIL) // BLOCK * BLOCK


def block_span(index, size):
    """The byte range ``(start, end)`` of block ``index`` of a big part of ``size`` bytes."""
    return index * BLOCK, min(size, (index + 1) * BLOCK)


def cdn_object(stack, folder, name):
    """``(size, ETag without quotes)`` of the CDN's big part of ``name``."""
    head = stack.s3_admin_client().head_object(Bucket=folder, Key=name + ".big")
    return head["ContentLength"], head["ETag"].strip('"')


def resume_files(cache, folder, name, suffix):
    """A download's ``<key>.<32 hex>.part`` (suffix "part") or ``.record`` files of ``name``'s big part."""
    pattern = re.compile(re.escape(name + ".big") + r"\.[0-9a-f]{32}\." + suffix)
    folder = Path(cache) / folder
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))


def the_one(paths, what):
    assert len(paths) == 1, f"expected one {what}, found {[p.name for p in paths]}"
    return paths[0]


def recorded_blocks(record):
    """The blocks a download's record claims: a JSON header line, then one block index per line (a line
    cut short by the kill, without its newline, is not counted; a line of another kind, such as
    ``prefetch``, names no block)."""
    try:
        text = Path(record).read_text()
    except FileNotFoundError:
        return set()
    lines = text.split("\n")[:-1]  # complete lines only
    if not lines:
        return set()
    json.loads(lines[0])  # the header is JSON
    return {int(line) for line in lines[1:] if line.isdigit()}


def files_of(cache, folder, name):
    """Every file in the cache that belongs to ``name``'s big part (the part, its sidecar, a download's)."""
    folder = Path(cache) / folder
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(name + ".big"))


def download_of(loader, folder, name):
    """``name``'s entry in GET /downloads (the last one when it shows more), or None."""
    r = loader.get("/downloads")
    assert r.status_code == 200, (r.status_code, r.text[:300])
    found = [d for d in r.json()["downloads"] if d["folder"] == folder and d["name"] == name]
    return found[-1] if found else None


def wait_download(loader, folder, name, state="cached", timeout=120):
    """Poll GET /downloads until ``name``'s download is in ``state``; its status then. A download that
    failed (when another state is awaited) fails the wait at once."""
    last = [None]

    def reached():
        last[0] = download_of(loader, folder, name)
        if last[0] is not None and last[0]["state"] == "failed" and state != "failed":
            raise AssertionError(f"the download of {folder}/{name} failed: {last[0]}")
        return last[0] if last[0] is not None and last[0]["state"] == state else None

    return until(reached, timeout, lambda: f"{folder}/{name} not {state} after {timeout} s: {last[0]}", 0.05)


def fetched_ranges(proxy, path, size):
    """The byte ranges of the object at ``path`` the CDN was asked for (GETs), merged."""
    spans = []
    for seen in proxy.seen():
        if seen.method == "GET" and seen.path == path:
            first, _, last = seen.headers.get("range", "bytes=0-").removeprefix("bytes=").partition("-")
            spans.append((int(first), int(last) + 1 if last else size))
    merged = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def covered(ranges, start, end):
    return any(first <= start and end <= last for first, last in ranges)


def metric(loader, name):
    """The value of an unlabelled sample of GET /metrics."""
    for line in loader.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"/metrics has no {name}")


class Stream(threading.Thread):
    """A /load read to its end on a thread of its own (or until the connection breaks): its status, the
    bytes it got and their SHA-256, and the exception that ended it early, if any."""

    def __init__(self, loader, name, folder="models", timeout=120):
        super().__init__(daemon=True, name=f"load-{name}")
        self.loader, self.name, self.folder, self.timeout = loader, name, folder, timeout
        self.status = None
        self.size = 0
        self.digest = None
        self.error = None

    def run(self):
        h = hashlib.sha256()
        try:
            with self.loader.load(self.name, self.folder, stream=True, timeout=self.timeout) as r:
                self.status = r.status_code
                for chunk in r.iter_content(MiB):
                    h.update(chunk)
                    self.size += len(chunk)
        except Exception as exc:  # noqa: BLE001 - a broken transfer is what some tests want to see
            self.error = exc
        self.digest = h.hexdigest()

    def result(self, timeout=300):
        self.join(timeout)
        assert not self.is_alive(), f"the load of {self.name} did not end within {timeout} s"
        return self
