"""pytest fixtures that hand tests a Docker Engine. Enabled in tests/conftest.py with
`pytest_plugins = ["tests.support.docker_fixtures"]`.

- `dockerd`: the engine already running (DOCKER_HOST or the default socket), else a private one.
- `private_dockerd`: always a private dockerd (root needed) - for tests that stop or restart the engine,
  which must never be done to someone else's.

Both are session-scoped and share one private daemon. Outside CI a test that cannot get an engine is
skipped; in CI it fails, so a broken CI machine can never pass by skipping.
"""

from __future__ import annotations

import os

import pytest

from devstack.processes.dockerd import Dockerd, DockerdError, ExternalEngine, running_engine


def in_ci() -> bool:
    # Woodpecker sets CI=woodpecker, GitHub and GitLab CI=true.
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    """Skip the test, or fail it when running in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


class _PrivateEngine:
    """Starts at most one private dockerd per session, and remembers why when it could not."""

    def __init__(self) -> None:
        self.engine: Dockerd | None = None
        self.error: str | None = None

    def get(self) -> Dockerd:
        if self.engine is None and self.error is None:
            engine = Dockerd()
            try:
                self.engine = engine.start()
            except DockerdError as exc:
                engine.cleanup()
                self.error = f"cannot start a private dockerd: {exc}"
        if self.engine is None:
            unavailable(self.error or "no private dockerd")
        if not self.engine.running:
            # A test stopped it (stop-mid-unlock) and failed before restarting it.
            self.engine.start()
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.cleanup()


@pytest.fixture(scope="session")
def _private_engine():
    holder = _PrivateEngine()
    yield holder
    holder.close()


@pytest.fixture(scope="session")
def private_dockerd(_private_engine) -> Dockerd:
    return _private_engine.get()


@pytest.fixture(scope="session")
def dockerd(_private_engine) -> Dockerd | ExternalEngine:
    host = running_engine()
    if host is not None:
        return ExternalEngine(host)
    return _private_engine.get()
