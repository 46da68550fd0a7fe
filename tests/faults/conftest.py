"""Fault and hostile-input tests reuse the integration fixtures: one devstack (SeaweedFS + the reference
Resource API), the fault proxy in front of the CDN, fresh accounts, and the loader as ``python main.py``.

Helpers here start loader variants (other limits, another cache directory) and watch what a loader
leaves behind: its files and its memory.
"""

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from devstack.loader import LoaderProcess
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


def model_name(prefix="f"):
    return f"{prefix}-{os.urandom(4).hex()}.bin"


def start_loader(workdir, stack, **env):
    """A loader against the devstack; ``env`` overrides its configuration (API_TIMEOUT, limits...)."""
    env.setdefault("RESOURCE_API_URL", stack.api_url)
    env.setdefault("API_TIMEOUT", 5)
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
