"""Shared test setup: the compiled modules live at the repository root (built in place by `make test`)."""

import shutil

import pytest


@pytest.fixture(scope="session")
def openssl():
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("openssl is required (scripts/system-deps installs it)")
    return path


pytest_plugins = ["tests.support.docker_fixtures"]
